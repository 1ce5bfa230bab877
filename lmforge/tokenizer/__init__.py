"""Tokenizer stage: train a byte-level BPE (HF ``tokenizers``) and pack documents into token shards."""
