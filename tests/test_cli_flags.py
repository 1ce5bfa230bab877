"""The command line's surface: --help shows defaults, choices and required flags; list flags take several words;
start-up imports no stage (and no torch) until a stage command runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lmforge.config import spread_list_values

ROOT = Path(__file__).resolve().parents[1]


def lmforge(*args: str, home: Path, columns: int = 250) -> subprocess.CompletedProcess:
    env = dict(os.environ, LMFORGE_HOME=str(home), HF_HUB_OFFLINE="1", COLUMNS=str(columns))
    env.pop("LMFORGE_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "lmforge.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def help_lines(*args: str) -> dict[str, str]:
    """``--help`` of a command as {flag: its help text} (one table row per flag at a wide terminal)."""
    from lmforge.cli import app

    res = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "300"}, terminal_width=300)
    assert res.exit_code == 0, res.output
    rows = {}
    for line in res.output.splitlines():
        cells = line.strip("│ ").split()
        if cells and cells[0].startswith("--"):
            rows[cells[0]] = line
    return rows


@pytest.mark.parametrize("command, expected", [
    (["data", "run"], {"--shards": "[default: 4]", "--inputs": "[default: data/demo]",
                       "--output-format": "jsonl|parquet", "--out": "[default: $LMFORGE_HOME/data]",
                       "--minhash": "[default: false]"}),
    (["pretrain"], {"--tokenizer": "[required: here or in --config]", "--hidden-size": "[default: 256]",
                    "--schedule": "cosine|wsd", "--parallel": "ddp|fsdp"}),
    (["tokenizer", "train"], {"--data": "[required: here or in --config]"}),
    (["rag", "index"], {"--out": "[default: $LMFORGE_HOME/rag]"}),
    (["run"], {"--workspace": "[default: from the recipe]"}),  # hand-written commands too
    (["serve"], {"--port": "[default: 8000]", "--model-name": "[default: the folder name]"}),
    (["export", "gguf"], {"--out": "[default: MODEL-DTYPE.gguf beside it]"}),
])
def test_help_shows_defaults_choices_and_required_flags(command, expected):
    rows = help_lines(*command)
    for flag, text in expected.items():
        assert flag in rows, f"{flag} missing from `lmforge {' '.join(command)} --help`"
        assert text in rows[flag], f"{' '.join(command)} {flag}: {text!r} not in {rows[flag]!r}"


def test_a_choice_outside_the_literal_is_refused(tmp_path):
    proc = lmforge("data", "run", "--output-format", "csv", "--out", str(tmp_path / "d"), home=tmp_path)
    assert proc.returncode == 2 and "'csv' is not one of 'jsonl', 'parquet'" in proc.stderr
    assert not (tmp_path / "d").exists()


def test_list_flags_take_several_words_like_an_unquoted_glob(tmp_path):
    books = sorted((ROOT / "data/demo/books").glob("kjv-*.txt"))
    assert len(books) >= 2
    out = tmp_path / "d"
    # what `--inputs data/demo/books/kjv-*.txt` turns into after the shell expands the glob
    proc = lmforge("data", "run", "--inputs", *map(str, books), "--shards", "1", "--out", str(out), home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["inputs"] == [str(b) for b in books]
    assert manifest["config"]["shards"] == 1  # the next flag ends the list


def test_spreading_list_values_stops_at_flags_and_keeps_numbers():
    import typer
    import typer.main

    app = typer.Typer()

    @app.command()
    def cmd(inputs: list[str] = typer.Option([]), weights: list[float] = typer.Option([]), n: int = 1,
            fast: bool = False) -> None:
        pass

    params = typer.main.get_command(app).params
    assert spread_list_values(params, ["--inputs", "a", "b", "--n", "3", "c"]) == \
        ["--inputs", "a", "--inputs", "b", "--n", "3", "c"]
    assert spread_list_values(params, ["--weights", "-1", "-0.5", "2", "--fast"]) == \
        ["--weights", "-1", "--weights", "-0.5", "--weights", "2", "--fast"]
    assert spread_list_values(params, ["--inputs=a", "b", "--", "c"]) == ["--inputs=a", "--inputs", "b", "--", "c"]


def test_startup_imports_no_stage_and_no_torch(tmp_path):
    """`lmforge --help`, `runs` and `lineage` must answer fast: building them imports no stage module and no torch."""
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "import lmforge.cli as cli\n"
        "for args in (['--help'], ['runs'], ['runs', '--help'], ['lineage', '--help'], ['data', '--help']):\n"
        "    res = CliRunner().invoke(cli.app, args)\n"
        "    assert res.exit_code == 0, (args, res.output)\n"
        "heavy = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('lmforge.train', 'lmforge.data.',\n"
        "               'lmforge.model', 'lmforge.serve', 'lmforge.align', 'lmforge.eval', 'lmforge.rag')))\n"
        "print(heavy)\n"
    )
    env = dict(os.environ, LMFORGE_HOME=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    # and a stage command still builds (and imports its stage) when it is asked for
    assert "--max-steps" in help_lines("pretrain")


def test_smollm2_goes_to_the_user_cache_not_the_current_folder(tmp_path, smollm2_dir):
    """`lmforge smollm2` run from any folder prints one absolute path in the per-user cache (or under LMFORGE_HOME
    when set) and writes nothing into the folder it was run from."""
    cache, elsewhere = tmp_path / "cache", tmp_path / "elsewhere"
    elsewhere.mkdir()
    target = cache / "lmforge" / "models" / "SmolLM2-135M-Instruct"
    target.parent.mkdir(parents=True)
    target.symlink_to(smollm2_dir, target_is_directory=True)  # already converted: the command must reuse it
    env = {k: v for k, v in os.environ.items() if k != "LMFORGE_HOME"}
    env.update(XDG_CACHE_HOME=str(cache), PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "lmforge.cli", "smollm2"], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(target)
    assert list(elsewhere.iterdir()) == []
    # LMFORGE_HOME, even relative, wins, and the printed path is absolute
    (elsewhere / "home" / "models").mkdir(parents=True)
    (elsewhere / "home" / "models" / "SmolLM2-135M-Instruct").symlink_to(smollm2_dir, target_is_directory=True)
    proc = subprocess.run([sys.executable, "-m", "lmforge.cli", "smollm2"], cwd=elsewhere,
                          env=dict(env, LMFORGE_HOME="home"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(elsewhere / "home" / "models" / "SmolLM2-135M-Instruct")
