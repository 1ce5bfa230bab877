"""GGUF per family: ``export gguf`` and our importer are inverses (float32 file → the same weights); K-quant files
(Q4_K, Q5_K, Q6_K, Q8_0) load with the values of ``gguf``'s reference dequantiser and the logits ``transformers``
computes from the same file; a GGUF becomes a model folder; bad files fail with clear errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from lmforge.export.to_gguf import export_gguf  # noqa: E402
from lmforge.model.gguf_import import GGUFError, load_gguf, load_gguf_model, open_gguf  # noqa: E402
from lmforge.model.hf import load_model, save_model  # noqa: E402
from lmforge.model.llama import Llama, LlamaConfig  # noqa: E402

Q = gguf.GGMLQuantizationType
# K-quant blocks hold 256 values: every input width here is a multiple of 256
DIMS = dict(hidden_size=256, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
            num_hidden_layers=2, max_position_embeddings=128)
FAMILIES = {
    "llama": dict(model_type="llama", tie_word_embeddings=False),
    "mistral": dict(model_type="mistral"),  # no sliding window: llama.cpp's "llama"
    "qwen2": dict(model_type="qwen2", qkv_bias=True),
    # transformers' GGUF reader assumes Qwen3's and Gemma 3's real head sizes (128, 256) and reads no Phi-3 window
    "qwen3": dict(model_type="qwen3", qk_norm=True, head_dim=128),
    "gemma3_text": dict(model_type="gemma3_text", qk_norm=True, gemma_norms=True, hidden_act="gelu_pytorch_tanh",
                        num_hidden_layers=6, sliding_window=16, rope_local_theta=10_000.0, rope_theta=1e6,
                        head_dim=256, layer_types=["sliding_attention"] * 5 + ["full_attention"]),
    # a window as long as the context: llama.cpp ignores Phi-3's window, a shorter one is refused (see the last test)
    "phi3": dict(model_type="phi3", tie_word_embeddings=False, sliding_window=128),
}


def _model_folder(family: str, tokenizer_dir, folder):
    vocab = json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"]
    eos = json.loads((tokenizer_dir / "config.json").read_text())["eos_token_id"]
    cfg = LlamaConfig(**{**DIMS, **FAMILIES[family]}, vocab_size=vocab, bos_token_id=eos, eos_token_id=eos,
                      pad_token_id=eos)
    model = Llama(cfg)
    model.init_weights(seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.2)
    save_model(model, folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_dir / name, folder / name)
    return model


@pytest.fixture(scope="module", params=list(FAMILIES))
def exported(request, tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"gguf-{request.param}")
    model = _model_folder(request.param, tiny_model_dir, root / "model")
    path = export_gguf(root / "model", root / "model-f32.gguf", dtype="f32")
    return request.param, model.eval(), path


def requantize(src, dst, seed: int = 0) -> dict[str, tuple[np.ndarray, Q]]:
    """Copy ``src`` to ``dst`` with every 2-D tensor replaced by random K-quant / Q8_0 blocks (``gguf`` has no K-quant
    quantiser; any block bytes are a valid block, with the float16 scales set so weights are ~0.05)."""
    rng = np.random.default_rng(seed)
    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(dst), arch)
    for f in reader.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(f.name, f.contents(), f.types[0], sub_type=sub)
    kinds = [Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0]
    # byte offsets of the float16 scales in one block, and the scale that gives weights of ~0.05
    scales = {Q.Q4_K: ([0, 2], 2e-4), Q.Q5_K: ([0, 2], 1e-4), Q.Q6_K: ([208], 2e-5), Q.Q8_0: ([0], 4e-4)}
    raw = {}
    for t in reader.tensors:
        data = np.array(t.data)
        if data.ndim == 1:
            w.add_tensor(t.name, data)
            continue
        qt = kinds[len(raw) % len(kinds)]
        block, size = gguf.GGML_QUANT_SIZES[qt]
        rows, cols = data.shape
        blocks = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
        offsets, s = scales[qt]
        for off in offsets:
            blocks[..., off:off + 2] = (rng.uniform(0.5, 1.0, blocks.shape[:2]) * s).astype(np.float16)[..., None] \
                .view(np.uint8)
        q = blocks.reshape(rows, -1)
        w.add_tensor(t.name, q, raw_dtype=qt)
        raw[t.name] = (q, qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return raw


@torch.no_grad()
def test_f32_export_and_import_are_inverses(exported):
    family, model, path = exported
    ours = load_gguf_model(path)
    assert ours.config.model_type == ("llama" if family == "mistral" else family)
    x = torch.randint(0, model.config.vocab_size, (2, 40))
    torch.testing.assert_close(ours(x), model(x), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_k_quants_match_gguf_reference_and_transformers(exported, tmp_path):
    family, _, path = exported
    kq = tmp_path / "model-kq.gguf"
    raw = requantize(path, kq)
    assert {qt for _, qt in raw.values()} == {Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0}
    cfg, sd = load_gguf(kq)
    ref = torch.from_numpy(gguf.quants.dequantize(*raw["token_embd.weight"]))
    torch.testing.assert_close(sd["model.embed_tokens.weight"], ref, atol=0, rtol=0)
    ref = torch.from_numpy(gguf.quants.dequantize(*raw["blk.1.ffn_down.weight"]))
    torch.testing.assert_close(sd["model.layers.1.mlp.down_proj.weight"], ref, atol=0, rtol=0)

    ours = load_gguf_model(kq)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=kq.name, dtype=torch.float32).eval()
    x = torch.randint(0, cfg.vocab_size, (2, 40))
    torch.testing.assert_close(ours(x), hf(x).logits, atol=2e-4, rtol=2e-4)


def test_gguf_becomes_a_model_folder_with_its_tokenizer(exported, tiny_model_dir, tmp_path):
    from lmforge.model.pretrained import materialize_gguf

    family, model, path = exported
    if family == "gemma3_text":
        pytest.skip("transformers reads a gemma3 GGUF's tokenizer as SentencePiece, the tiny test tokenizer is BPE "
                    "(the real Gemma 3 270M file is the slow test's)")
    if family == "qwen2":  # as a user does it: the pretrained stage from the command line
        folder = tmp_path / "folder"
        r = lmforge_cli("pretrained", "--gguf", str(path), "--out", str(folder), home=tmp_path)
        assert r.returncode == 0, r.stderr
        assert json.loads((folder / "manifest.json").read_text())["metrics"]["model_type"] == "qwen2"
    else:
        folder = materialize_gguf(path, tmp_path / "folder")
    loaded = load_model(folder)
    x = torch.randint(0, model.config.vocab_size, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=1e-5, rtol=1e-5)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert tok.eos_token_id == model.config.eos_token_id
    template = json.loads((tiny_model_dir / "tokenizer_config.json").read_text())["chat_template"]
    assert json.loads((folder / "tokenizer_config.json").read_text())["chat_template"] == template  # via GGUF metadata


def lmforge_cli(*args: str, home) -> subprocess.CompletedProcess:
    env = {**os.environ, "LMFORGE_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "lmforge.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600)


# -- bad input ---------------------------------------------------------------------------------------------------------
def test_truncated_gguf_is_a_clear_error(exported, tmp_path):
    _, _, path = exported
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    with pytest.raises(GGUFError, match="truncated"):
        load_gguf(cut)
    head = tmp_path / "head.gguf"
    head.write_bytes(path.read_bytes()[:100])
    with pytest.raises(GGUFError, match="truncated or corrupt"):
        open_gguf(head)


def test_unsupported_gguf_architecture_names_it_and_the_supported_list(tmp_path):
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match=r"architecture 'gpt2' is not supported \(supported: gemma3, llama, phi3"):
        load_gguf(path)
    r = lmforge_cli("pretrained", "--gguf", str(path), "--out", str(tmp_path / "out"), home=tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "architecture 'gpt2' is not supported (supported: gemma3, llama, phi3, qwen2, qwen3)" in r.stderr


def test_unsupported_hf_folder_and_unknown_rope_scaling(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt_neox", "hidden_size": 64}))
    with pytest.raises(ValueError, match=r"config.json: model_type \(architecture\) 'gpt_neox' is not supported "
                                         r"\(supported: gemma3_text, llama, mistral, phi3, qwen2, qwen3\)"):
        load_model(folder)
    d = transformers.Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1,
                                 intermediate_size=64, vocab_size=32).to_dict()
    d["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    (folder / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="rope_type 'dynamic' is not supported"):
        load_model(folder)


def test_export_refuses_what_llama_cpp_would_compute_differently(tiny_model_dir, tmp_path):
    model = _model_folder("mistral", tiny_model_dir, tmp_path / "m")
    cfg = model.config
    cfg.sliding_window, cfg.layer_types = 16, ["sliding_attention"] * cfg.num_hidden_layers
    save_model(Llama(cfg), tmp_path / "m")
    with pytest.raises(ValueError, match="sliding window"):
        export_gguf(tmp_path / "m", tmp_path / "m.gguf")
    phi = _model_folder("phi3", tiny_model_dir, tmp_path / "phi").config
    phi.sliding_window = 64  # shorter than the context (128): llama.cpp would attend past it
    save_model(Llama(phi), tmp_path / "phi")
    with pytest.raises(ValueError, match=r"phi3 with a sliding window \(64\) shorter than its context \(128\)"):
        export_gguf(tmp_path / "phi", tmp_path / "phi.gguf")
