"""bench/bfcl_table.py: one row per run, runs of the same folder name told apart by their parents, a folder without
items.jsonl a clear error."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bfcl_table  # noqa: E402


def _run(folder: Path, valid: list[bool]) -> Path:
    folder.mkdir(parents=True)
    (folder / "items.jsonl").write_text("".join(json.dumps({"category": "simple_python", "valid": v}) + "\n"
                                                for v in valid))
    return folder


def test_runs_of_the_same_name_get_their_own_rows(tmp_path):
    a = _run(tmp_path / "a" / "bfcl20" / "tuned", [True, False])
    b = _run(tmp_path / "b" / "bfcl20" / "tuned", [True, True, True])
    c = _run(tmp_path / "b" / "base", [False])
    rows = bfcl_table.table([a, b, c]).splitlines()[2:]
    assert [r.split(" | ")[0] for r in rows] == ["| a/bfcl20/tuned", "| b/bfcl20/tuned", "| base"]
    assert "1/2" in rows[0] and "3/3" in rows[1] and "0/1" in rows[2]
    with pytest.raises(SystemExit, match="no items.jsonl"):
        bfcl_table.table([tmp_path / "a"])
