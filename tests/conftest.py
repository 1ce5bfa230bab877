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
