"""Alignment stages tell the truth, as a user meets them on the command line: the fine-tuning mode is explicit,
skipped inputs are reported per reason, model-writing commands record their lineage, metric names mean one thing."""

import json
import shutil
from pathlib import Path

import pytest

from lmforge.config import ConfigError
from test_cli import lmforge

ROOT = Path(__file__).resolve().parents[1]
CHAT = ROOT / "data" / "chat" / "chatterbot_en.jsonl"
PREFS = ROOT / "data" / "chat" / "preferences.jsonl"


# -- the fine-tuning mode is explicit -------------------------------------------------------------------------------------
def test_lora_rank_zero_or_both_modes_is_a_clear_cli_error(tmp_path):
    proc = lmforge("sft", "--model", "m", "--data", "d.jsonl", "--lora-r", "0", home=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "lora_r" in proc.stderr and "0 is not a LoRA rank" in proc.stderr and "--full" in proc.stderr
    proc = lmforge("dpo", "--model", "m", "--data", "d.jsonl", "--full", "--lora-r", "4", home=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "not both" in proc.stderr and "--full" in proc.stderr and "--lora-r" in proc.stderr


@pytest.mark.parametrize("kw, message", [
    (dict(lora_r=0), "0 is not a LoRA rank"),
    (dict(lora_r=-2), "not a LoRA rank"),
    (dict(full=True, lora_r=8), "not both"),
    (dict(full=False), "full: false needs a LoRA rank"),
])
def test_mode_choice_errors_in_configs(kw, message):
    from lmforge.align import dpo, sft
    from lmforge.config import validate

    for module in (sft, dpo):
        with pytest.raises(ConfigError, match=message):
            validate(module.Config, dict(model="m", data="d", **kw), "recipe.yaml", "stages.x.")
    assert sft.Config(model="m", data="d").lora_r is None  # neither: full fine-tuning (said at the start of the run)
    assert sft.Config(model="m", data="d", lora_r=4).lora_r == 4


def test_recipes_load_and_a_rank_zero_recipe_names_file_and_key(tmp_path):
    from lmforge.recipe import load_recipe

    for recipe in sorted((ROOT / "recipes").glob("*.yaml")):
        load_recipe(recipe, workspace=tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"name: bad\nstages:\n  sft:\n    model: {tmp_path}\n    data: {CHAT}\n    lora_r: 0\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: stages.sft.lora_r: .*--full"):
        load_recipe(bad, workspace=tmp_path)


# -- one name per DPO metric ----------------------------------------------------------------------------------------------
def test_dpo_metric_names_are_the_same_in_log_val_manifest_and_docs(tiny_model_dir, tmp_path):
    from lmforge.align import dpo

    out = tmp_path / "dpo"
    cfg = dpo.Config(model=str(tiny_model_dir), data=str(PREFS), seq_len=256, batch_size=2, max_steps=2, lr=1e-3,
                     beta=0.5, warmup_steps=0, eval_every=2, checkpoint_every=2, val_fraction=0.2, seed=0, threads=1)
    m = dpo.run(cfg, out).metrics
    names = set(dpo.METRICS)
    logged = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert names <= logged[-1].keys() and {f"val_{k}" for k in names} <= logged[-1].keys()
    assert set(m["final"]) == set(m["val_before"]) == set(m["val_after"]) == names
    assert m["preference_loss"] == "sigmoid"
    # reward_margin is beta-scaled, logp_margin is not: at the start (policy == reference) one is 0, the other is not
    assert m["val_before"]["reward_margin"] == pytest.approx(0.0, abs=1e-4)
    assert abs(m["val_before"]["logp_margin"]) > 0.01
    assert m["val_after"]["reward_margin"] == pytest.approx(
        0.5 * (m["val_after"]["logp_margin"] - m["val_before"]["logp_margin"]), abs=1e-3)
    readme = (ROOT / "README.md").read_text()
    assert all(f"`{k}`" in readme for k in names)


# -- skipped inputs are reported: how many, why, where --------------------------------------------------------------------
def _chat_file(path: Path) -> Path:
    """12 lines: 3 short conversations, 7 far over 64 tokens, 1 invalid JSON line, 1 empty answer."""
    long = " ".join(["a long answer that goes on"] * 40)
    lines = []
    for i in range(12):
        if i in (4, 9):
            lines.append("{not json" if i == 4 else json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                                                             {"role": "assistant", "content": " "}]}))
        else:
            answer = "Hello there." if i % 3 == 0 else long
            lines.append(json.dumps({"messages": [{"role": "user", "content": f"Question {i}?"},
                                                  {"role": "assistant", "content": answer}]}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_sft_skips_are_reported_per_reason_with_examples_and_recorded(tiny_model_dir, tmp_path):
    data = _chat_file(tmp_path / "chat.jsonl")
    common = ["sft", "--model", str(tiny_model_dir), "--data", str(data), "--seq-len", "64", "--batch-size", "2",
              "--max-steps", "1", "--val-fraction", "0", "--threads", "1"]
    valid = tmp_path / "valid.jsonl"  # the first 4 records: valid, line 2 too long
    valid.write_text("".join(data.read_text().splitlines(keepends=True)[:4]))
    proc = lmforge(*common, "--data", str(valid), "--out", str(tmp_path / "strict"), home=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    said = " ".join(proc.stderr.split())
    assert f"{valid}:2: conversation is" in said and "over seq_len 64" in said
    assert "--seq-len" in said and "--on-error skip" in said

    out = tmp_path / "sft"
    proc = lmforge(*common, "--on-error", "skip", "--out", str(out), home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    said = " ".join(proc.stderr.split())
    assert "full fine-tuning (the default" in said
    assert f"skipped 9 of 12 conversations in {data}: too_long 7 (e.g. {data}:2, {data}:3, {data}:6)" in said
    assert f"invalid_json 1 (e.g. {data}:5)" in said and f"empty_text 1 (e.g. {data}:10)" in said
    m = json.loads((out / "manifest.json").read_text())["metrics"]
    assert m["data"]["skipped"] == {"too_long": 7, "invalid_json": 1, "empty_text": 1}
    assert m["data"]["skipped_total"] == 9 and m["data"]["kept"] == 3 and m["train_conversations"] == 3
    assert m["data"]["skipped_examples"]["too_long"] == [f"{data}:2", f"{data}:3", f"{data}:6"]


def test_dpo_skips_are_reported_and_the_length_error_names_the_flags(tiny_model_dir, tmp_path, capsys):
    from lmforge.align import dpo
    from lmforge.align.chat_data import ChatDataError

    long = " ".join(["very long"] * 80)
    recs = [{"prompt": f"Q{i}?", "chosen": "Yes." if i % 2 else long, "rejected": "No."} for i in range(6)]
    data = tmp_path / "prefs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in recs) + "\n{bad\n")
    kw = dict(model=str(tiny_model_dir), data=str(data), seq_len=64, batch_size=2, max_steps=1, val_fraction=0,
              threads=1)
    with pytest.raises(ChatDataError, match=r"prefs.jsonl:1: pair is \d+ tokens, over seq_len 64; a larger --seq-len"
                                            r".*--on-error skip"):
        dpo.run(dpo.Config(**kw), tmp_path / "strict")
    m = dpo.run(dpo.Config(on_error="skip", **kw), tmp_path / "dpo").metrics
    said = " ".join(capsys.readouterr().err.split())
    assert f"skipped 4 of 7 preference pairs in {data}: too_long 3 (e.g. {data}:1, {data}:3, {data}:5), " \
           f"invalid_json 1 (e.g. {data}:7)" in said
    assert m["data"]["skipped"] == {"too_long": 3, "invalid_json": 1} and m["train_pairs"] == 3


# -- every command that writes a model folder records a run ---------------------------------------------------------------
def test_merge_and_export_record_runs_so_lineage_leads_back_to_sft_and_base(tiny_model_dir, tmp_path, lmforge_home):
    from lmforge.align import sft

    adapter = tmp_path / "sft_lora"
    sft.run(sft.Config(model=str(tiny_model_dir), data=str(CHAT), on_error="skip", seq_len=256, batch_size=2,
                       max_steps=1, val_fraction=0, threads=1, lora_r=2), adapter)
    merged, exported = tmp_path / "merged", tmp_path / "hf"
    proc = lmforge("merge", str(adapter), "--out", str(merged), home=lmforge_home)
    assert proc.returncode == 0, proc.stderr
    proc = lmforge("export", "hf", str(merged), "--out", str(exported), home=lmforge_home)
    assert proc.returncode == 0, proc.stderr

    proc = lmforge("lineage", str(exported), "--json", home=lmforge_home)
    assert proc.returncode == 0, proc.stderr
    tree = json.loads(proc.stdout)
    assert tree["stage"] == "export_hf" and tree["config"] == {"dtype": "float32"}
    merge = tree["inputs"]["model"]
    assert merge["stage"] == "merge" and merge["path"] == str(merged.resolve())
    assert merge["inputs"]["adapter"]["stage"] == "sft" and merge["inputs"]["adapter"]["path"] == str(adapter.resolve())
    base = merge["inputs"]["adapter"]["inputs"]["model"]
    assert base["raw"] and base["path"] == str(Path(tiny_model_dir).resolve())
    assert merge["inputs"]["base_model"]["path"] == str(Path(tiny_model_dir).resolve())

    proc = lmforge("lineage", str(merged), home=lmforge_home)
    said = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 0 and "merge" in said and "sft" in said and str(Path(tiny_model_dir).resolve()) in said
