"""The bilingual demo (recipes/demo_zh.yaml), scaled down, end to end through the CLI: English + Chinese pages mixed
by language → BPE → tiny Llama → bits per byte per language → the server answering a Chinese prompt."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from lmforge.tokenizer.stage import is_val

ROOT = Path(__file__).resolve().parents[1]


def shortened(tmp: Path) -> Path:
    """recipes/demo_zh.yaml with the English input, model, steps and eval cut down (the stages, mixing by language and
    the Chinese input unchanged)."""
    recipe = yaml.safe_load((ROOT / "recipes" / "demo_zh.yaml").read_text(encoding="utf-8"))
    st = recipe["stages"]
    # a fifth of the English input (the 79 Python-docs topics) at a 6:4 ratio keeps the test's data stage short; the
    # mixing (each Chinese page written twice, English down-sampled to the ratio) is what the full recipe does
    st["data"].update(shards=2, inputs=["data/demo/jsonl", "data/kb_zh/docs"], mix_targets={"en": 0.6, "zh": 0.4})
    st["tokenizer"]["vocab_size"] = 512
    st["pretrain"].update(hidden_size=48, num_layers=2, seq_len=64, batch_size=8, max_steps=20, warmup_steps=2,
                          eval_every=10, checkpoint_every=10, lr=1.0e-2, compile=False, dtype="float32")
    st["eval"].update(tasks=[], max_windows=4, max_new_tokens=6)
    st["serve"]["max_tokens"] = 6
    path = tmp / "demo_zh_short.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def test_mixing_copies_are_held_out_with_their_original():
    ids = [f"data/kb_zh/docs/debian-faq/page{i}.zh-cn.html" for i in range(200)]
    for i in ids:
        assert is_val(f"{i}#rep1", 0.2) == is_val(f"{i}#rep2", 0.2) == is_val(i, 0.2)
    assert 0 < sum(is_val(i, 0.2) for i in ids) < 200


def test_bilingual_demo_end_to_end(tmp_path):
    home = tmp_path / "home"
    env = dict(os.environ, LMFORGE_HOME=str(home), HF_HUB_OFFLINE="1", COLUMNS="200")
    proc = subprocess.run([sys.executable, "-m", "lmforge.cli", "run", str(shortened(tmp_path))], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ws = home / "demo_zh"

    stats = json.loads((ws / "data" / "stats.json").read_text())
    assert stats["profile"]["lang"]["zh"] >= 10  # most Chinese pages survive the cleaning
    mix = next(s for s in stats["steps"] if s["name"] == "mix_v1")
    shares = mix["tallies"]["share_permille"]
    assert set(shares) == {"en", "zh"} and 300 <= shares["zh"] <= 500  # the chosen 6:4 ratio, by documents
    assert mix["tallies"]["group_out"]["zh"] == 2 * mix["tallies"]["group_in"]["zh"]  # each Chinese page twice

    results = json.loads((ws / "eval" / "results.json").read_text())
    m = results["metrics"]
    assert m["val_bpb.lang.en"] > 0 and m["val_bpb.lang.zh"] > 0
    groups = results["bpb_by"]["groups"]
    for lang in ("en", "zh"):  # each language had held-out text for every window asked for (4 x 64 tokens)
        assert groups[lang]["docs"] >= 1 and groups[lang]["val_tokens_scored"] == 4 * 64, groups[lang]

    answers = json.loads((ws / "serve" / "answers.json").read_text())
    assert answers["chat"]["request"] == "什么是 Debian？" and answers["chat"]["answer"] is not None
    assert answers["completion"]["request"] == "Debian 的软件包"


def test_bpb_by_without_held_out_data_is_a_config_error(tmp_path):
    import pytest

    from lmforge.config import ConfigError
    from lmforge.eval.stage import Config, run

    with pytest.raises(ConfigError, match="bpb_by needs `data`"):
        run(Config(model=str(tmp_path), tasks=["tasks/core"], bpb_by="lang"), tmp_path / "eval")
    assert not (tmp_path / "eval").exists()
