"""Export: GGUF (read back with gguf's reader: metadata, tokenizer, tensor values, q/k permutation, quantised types)
and an HF folder that transformers loads with the same logits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_serve import _build_serve_model

gguf = pytest.importorskip("gguf")

from lmforge.export import export_gguf, export_hf  # noqa: E402
from lmforge.export.to_gguf import permute_for_llama_cpp  # noqa: E402
from lmforge.model.hf import load_model  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export") / "tiny"
    _build_serve_model(folder)
    return folder


def _field(reader, key):
    f = reader.fields[key]
    if len(f.types) == 1 and f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(f.parts[-1]).decode()
    if f.types[0] == gguf.GGUFValueType.ARRAY:
        return [bytes(f.parts[i]).decode() if f.types[-1] == gguf.GGUFValueType.STRING else f.parts[i][0]
                for i in f.data]
    return f.parts[-1][0]


def test_gguf_f32_reads_back_exactly(model_dir, tmp_path):
    path = export_gguf(model_dir, tmp_path / "tiny-f32.gguf", "f32")
    r = gguf.GGUFReader(str(path))
    model = load_model(model_dir)
    cfg = model.config
    assert _field(r, "general.architecture") == "llama"
    assert _field(r, "llama.block_count") == cfg.num_hidden_layers
    assert _field(r, "llama.attention.head_count_kv") == cfg.num_key_value_heads
    assert _field(r, "llama.rope.freq_base") == pytest.approx(cfg.rope_theta)
    assert _field(r, "tokenizer.ggml.model") == "gpt2" and _field(r, "tokenizer.ggml.pre") == "gpt-2"
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    tokens = _field(r, "tokenizer.ggml.tokens")
    assert len(tokens) == cfg.vocab_size
    assert all(tokens[i] == t for t, i in tok["model"]["vocab"].items())
    eos = tokens.index("<|endoftext|>")
    assert _field(r, "tokenizer.ggml.eos_token_id") == eos
    assert _field(r, "tokenizer.ggml.token_type")[eos] == 3  # CONTROL
    assert len(_field(r, "tokenizer.ggml.merges")) == len(tok["model"]["merges"])
    assert "<|im_start|>" in _field(r, "tokenizer.chat_template")
    t = {x.name: x for x in r.tensors}
    assert "output.weight" not in t  # tied embeddings
    sd = model.state_dict()
    np.testing.assert_array_equal(t["token_embd.weight"].data, sd["model.embed_tokens.weight"].numpy())
    np.testing.assert_array_equal(t["blk.1.ffn_down.weight"].data, sd["model.layers.1.mlp.down_proj.weight"].numpy())
    k = sd["model.layers.0.self_attn.k_proj.weight"]
    np.testing.assert_array_equal(t["blk.0.attn_k.weight"].data, permute_for_llama_cpp(k, cfg.num_key_value_heads))
    assert not torch.equal(permute_for_llama_cpp(k, cfg.num_key_value_heads), k)


@pytest.mark.parametrize("dtype,tol", [("f16", 1e-3), ("q8_0", 0.02), ("q4_0", 0.2)])
def test_gguf_quantised_types(model_dir, tmp_path, dtype, tol):
    path = export_gguf(model_dir, tmp_path / f"tiny-{dtype}.gguf", dtype)
    r = gguf.GGUFReader(str(path))
    t = {x.name: x for x in r.tensors}
    w = load_model(model_dir).state_dict()["model.layers.0.mlp.gate_proj.weight"].numpy()
    got = t["blk.0.ffn_gate.weight"]
    assert got.tensor_type.name == dtype.upper()
    deq = gguf.quants.dequantize(got.data, got.tensor_type)
    assert deq.shape == w.shape
    assert np.abs(deq - w).max() <= tol * np.abs(w).max()
    assert t["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32  # norms stay f32


def test_gguf_rejects_bad_dtype(model_dir, tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        export_gguf(model_dir, tmp_path / "x.gguf", "q5_k")


def test_export_hf_loads_in_transformers(model_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = export_hf(model_dir, tmp_path / "hf", dtype="bfloat16")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert (out / name).exists(), name
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = torch.tensor([tok("The with statement").input_ids])
    ours = load_model(model_dir).to(torch.bfloat16).float()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=1e-3, atol=1e-3)


def test_pretrained_stage_turns_a_gguf_into_a_model_artifact(model_dir, tmp_path):
    """The `pretrained` recipe stage: a GGUF becomes an HF-layout artifact folder (same logits), fingerprinted by the
    file's content, skipped when re-run."""
    from lmforge.artifacts import read_manifest
    from lmforge.model import pretrained_stage

    gguf_path = export_gguf(model_dir, tmp_path / "tiny-f32.gguf", "f32")
    out = tmp_path / "base"
    m = pretrained_stage.run(pretrained_stage.Config(gguf=str(gguf_path)), out)
    assert m.status == "done" and m.metrics["layers"] == 2 and m.metrics["source"] == "tiny-f32.gguf"
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        torch.testing.assert_close(load_model(out)(ids), load_model(model_dir)(ids), rtol=1e-5, atol=1e-5)
    again = pretrained_stage.run(pretrained_stage.Config(gguf=str(gguf_path)), out)
    assert again.run_id == m.run_id  # up to date: skipped
    assert read_manifest(out).inputs["gguf"].fingerprint.startswith("sha256:")
    with pytest.raises(Exception, match="is not a file"):
        pretrained_stage.run(pretrained_stage.Config(gguf=str(tmp_path / "missing.gguf")), tmp_path / "x")


def test_pretrained_cli_converts_a_gguf_and_names_a_missing_file(model_dir, tmp_path):
    import subprocess
    import sys

    gguf_path = export_gguf(model_dir, tmp_path / "tiny-q8.gguf", "q8_0")
    run = lambda *a: subprocess.run([sys.executable, "-m", "lmforge.cli", "pretrained", *a], capture_output=True,  # noqa: E731
                                    text=True, timeout=120)
    ok = run("--gguf", str(gguf_path), "-o", str(tmp_path / "base"))
    assert ok.returncode == 0, ok.stderr
    assert load_model(tmp_path / "base").config.num_hidden_layers == 2
    bad = run("--gguf", str(tmp_path / "nope.gguf"), "-o", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "gguf:" in bad.stdout + bad.stderr and "Traceback" not in bad.stderr
