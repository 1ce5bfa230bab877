"""End to end through the CLI, as a user runs it: a scaled-down recipe through every stage, re-runs, lineage."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["data", "tokenizer", "pretrain", "eval", "sft", "serve"]


def lmforge(*args: str, home: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, LMFORGE_HOME=str(home), HF_HUB_OFFLINE="1", COLUMNS="200")
    proc = subprocess.run([sys.executable, "-m", "lmforge.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"lmforge {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def statuses(output: str) -> dict[str, str]:
    """Stage name → 'ran' / 'skipped', read from the summary table."""
    found = {}
    for line in output.splitlines():
        cells = [c.strip() for c in line.split("│")]
        if len(cells) > 3 and cells[1] in STAGES:
            found[cells[1]] = "skipped" if "skipped" in cells[2] else cells[2]
    return found


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    ws = home / "tiny"
    first = lmforge("run", "recipes/tiny.yaml", home=home)
    return home, ws, first.stderr + first.stdout


def test_first_run_goes_through_every_stage(workspace):
    home, ws, out = workspace
    assert statuses(out) == {s: "ran" for s in STAGES}
    stats = json.loads((ws / "data" / "stats.json").read_text())
    assert stats  # conservation is checked in the data tests; here: the file exists and parses
    assert (ws / "tokenizer" / "tokenizer.json").exists() and (ws / "tokenizer" / "tokens" / "index.json").exists()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "loss.png"):
        assert (ws / "pretrain" / name).exists(), name
    results = json.loads((ws / "eval" / "results.json").read_text())
    assert results["metrics"]["val_bpb"] > 0 and len(results["samples"]) == 3
    answers = json.loads((ws / "serve" / "answers.json").read_text())
    assert answers["chat"]["answer"] is not None and answers["completion"]["request"] == "To be, or not to be"
    samples = json.loads((ws / "sft" / "samples.json").read_text())
    assert samples[0]["prompt"] == "What can you do?" and "before" in samples[0] and "after" in samples[0]
    assert "answers before → after fine-tuning" in out
    assert "lmforge chat" in out and "lmforge serve" in out


def test_transformers_loads_the_trained_model_with_identical_logits(workspace):
    transformers = pytest.importorskip("transformers")
    from lmforge.model.hf import load_model

    _, ws, _ = workspace
    ours = load_model(ws / "pretrain")
    hf = transformers.AutoModelForCausalLM.from_pretrained(ws / "pretrain").eval()
    tok = transformers.AutoTokenizer.from_pretrained(ws / "pretrain")
    ids = torch.tensor([tok.encode("O Romeo, Romeo! wherefore art thou Romeo?")])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_second_run_skips_everything_and_deleting_a_stage_reruns_it_and_downstream(workspace):
    home, ws, _ = workspace
    again = lmforge("run", "recipes/tiny.yaml", home=home)
    assert statuses(again.stderr + again.stdout) == {s: "skipped" for s in STAGES}
    assert "up to date" in again.stderr

    shutil.rmtree(ws / "tokenizer")
    third = lmforge("run", "recipes/tiny.yaml", home=home)
    assert statuses(third.stderr + third.stdout) == {"data": "skipped", "tokenizer": "ran", "pretrain": "ran",
                                                    "eval": "ran", "sft": "ran", "serve": "ran"}


def test_runs_and_lineage(workspace):
    home, ws, _ = workspace
    runs = lmforge("runs", home=home)
    for stage in ("data", "tokenizer", "pretrain", "eval", "sft", "serve_smoke"):
        assert stage in runs.stderr + runs.stdout
    tree = json.loads(lmforge("lineage", str(ws / "serve"), "--json", home=home).stdout)
    chain = []
    node = tree
    while not node.get("raw"):
        chain.append(node["stage"])
        inputs = list(node["inputs"].values())
        node = next((i for i in inputs if not i.get("raw")), inputs[0])  # follow the produced inputs upstream
    assert chain == ["serve_smoke", "sft", "pretrain", "tokenizer", "data"]
    assert node["path"].endswith("data/demo")  # the raw corpus the answer traces back to
    text = lmforge("lineage", str(ws / "pretrain"), home=home)
    assert "tokenizer" in text.stderr and "data/demo" in text.stderr
    missing = lmforge("lineage", str(home / "nowhere"), home=home, check=False)
    assert missing.returncode == 1


def test_help_lists_every_option(tmp_path):
    from lmforge.train.pretrain import Config

    top = lmforge("--help", home=tmp_path).stdout
    for cmd in ("run", "data", "tokenizer", "pretrain", "eval", "serve", "chat", "runs", "lineage"):
        assert cmd in top
    helptext = lmforge("pretrain", "--help", home=tmp_path).stdout
    for field in Config.model_fields:
        assert "--" + field.replace("_", "-") in helptext, field


def test_bad_recipe_names_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nstages:\n  data:\n    inputs: [data/demo]\n  tokenizer:\n    data: '@data'\n"
                   "    vocab_sise: 100\n")
    proc = lmforge("run", str(bad), home=tmp_path, check=False)
    assert proc.returncode == 2
    assert "bad.yaml: stages.tokenizer.vocab_sise: unknown key" in proc.stderr
    bad.write_text("name: bad\nstages:\n  tokenizer:\n    data: '@data'\n")
    proc = lmforge("run", str(bad), home=tmp_path, check=False)
    assert proc.returncode == 2 and "'@data' does not name an earlier stage" in proc.stderr
