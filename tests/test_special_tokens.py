"""A model folder whose special tokens disagree between config.json, generation_config.json, tokenizer.json and
tokenizer_config.json is refused with the file, the field and both values named — by the serving engine and every
other stage that loads the folder's tokenizer — instead of serving with a wrong BOS or a stop token it cannot emit."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from lmforge.serve.engine import Engine
from lmforge.tokenizer.bpe import load_tokenizer


@pytest.fixture
def folder(tiny_model_dir, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(tiny_model_dir, dst)
    return dst


def _edit(path, **changes):
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


def test_consistent_folder_loads(folder):
    tok, cfg = load_tokenizer(folder)
    assert tok.get_vocab_size() > 0


def test_eos_id_outside_the_vocabulary(folder):
    _edit(folder / "config.json", eos_token_id=10**6)
    with pytest.raises(ValueError, match=r"config.json: eos_token_id 1000000 is not a token of tokenizer.json"):
        Engine.from_folder(folder, max_num_seqs=1, max_model_len=64)


def test_bos_that_disagrees_with_tokenizer_config(folder):
    tok, tok_cfg = load_tokenizer(folder)
    bos = json.loads((folder / "config.json").read_text()).get("bos_token_id")
    if bos is None or not tok_cfg.get("bos_token"):
        pytest.skip("the tiny model names no BOS")
    other = (bos + 5) % tok.get_vocab_size()
    _edit(folder / "config.json", bos_token_id=other)
    with pytest.raises(ValueError, match=r"bos_token_id .* disagrees with tokenizer_config.json's bos_token"):
        load_tokenizer(folder)


def test_eos_token_missing_from_tokenizer_is_a_cli_error(folder):
    _edit(folder / "tokenizer_config.json", eos_token="<|no-such-token|>")
    r = subprocess.run([sys.executable, "-m", "lmforge.cli", "chat", str(folder)], input="hi\n",
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "tokenizer_config.json: eos_token '<|no-such-token|>' is not in tokenizer.json" in r.stdout + r.stderr
    assert "Traceback" not in r.stderr
