"""Evaluation: held-out loss, perplexity and bits-per-byte, plus greedy samples."""
