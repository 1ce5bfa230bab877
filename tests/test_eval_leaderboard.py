"""The leaderboard compares models only over the tasks they all ran: the aggregate and the ranking use the common
tasks, every row says how many tasks it ran, rows with another task set are marked."""

import shutil
from pathlib import Path

import pytest

from lmforge.eval import leaderboard
from lmforge.eval.leaderboard import Row
from test_cli import lmforge

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "tasks" / "core"


def _task(score: float, n: int = 8, fewshot: int = 0) -> dict:
    return {"metric": "acc", "score": score, "ci": [score - 0.1, score + 0.1], "n": n, "num_fewshot": fewshot,
            "centered": 2 * score - 1}


def test_aggregate_and_ranking_use_only_the_common_tasks():
    # a ran an easy extra task: its own aggregate is higher, yet on the shared task b is better
    a = Row("a", "a", tasks={"shared": _task(0.6), "easy": _task(1.0)}, own_aggregate=0.6)
    b = Row("b", "b", tasks={"shared": _task(0.8)}, own_aggregate=0.6)
    ranked = leaderboard.compare([a, b])
    assert [r.model for r in ranked] == ["b", "a"]
    assert b.aggregate == pytest.approx(0.6) and a.aggregate == pytest.approx(0.2)
    assert b.comparable and not a.comparable
    header, cells = leaderboard.table(ranked)
    assert header[-2:] == ["tasks run", "aggregate (1 common)"]
    assert cells[0][0] == "b" and cells[1][0] == "a *" and cells[1][-2:] == ["2/2", "0.200"]
    assert "left out" in leaderboard.caption(ranked) and "easy" in leaderboard.caption(ranked)


def test_same_task_on_other_items_is_not_common():
    a = Row("a", "a", tasks={"t": _task(0.9, n=8)})
    b = Row("b", "b", tasks={"t": _task(0.5, n=100)})
    c = Row("c", "c", tasks={"t": _task(0.5, n=8, fewshot=5)})
    rows = leaderboard.compare([a, b, c])
    assert all(r.aggregate is None and not r.comparable for r in rows)
    assert "no scored task was run by every model" in leaderboard.caption(rows)
    assert leaderboard.table(rows)[1][0][-1] == "-"


def test_leaderboard_cli_over_models_evaluated_on_different_task_sets(tiny_model_dir, tmp_path, lmforge_home):
    from lmforge.eval import stage as eval_stage

    other = tmp_path / "other_model"
    shutil.copytree(tiny_model_dir, other)
    both = [str(SUITE / "minimal_pairs.yaml"), str(SUITE / "chatterbot_mc.yaml")]
    ra = eval_stage.run(eval_stage.Config(model=str(tiny_model_dir), tasks=both, task_limit=8), tmp_path / "eval_a")
    eval_stage.run(eval_stage.Config(model=str(other), tasks=both[:1], task_limit=8), tmp_path / "eval_b")
    rows = leaderboard.collect()
    assert len(rows) == 2
    mp = {r.path: r.tasks["minimal_pairs"]["centered"] for r in rows}
    for r in rows:  # the aggregate is the shared task's centred score, not the run's own mean over its tasks
        assert r.aggregate == pytest.approx(mp[r.path])
    a = next(r for r in rows if r.path == str(Path(tiny_model_dir).resolve()))
    assert a.own_aggregate == pytest.approx(ra.metrics["aggregate_centered"], abs=1e-4) and not a.comparable

    md = tmp_path / "board.md"
    proc = lmforge("leaderboard", "--markdown", str(md), home=lmforge_home)
    assert proc.returncode == 0, proc.stderr
    said = " ".join((proc.stdout + proc.stderr).split())
    assert "1 task(s) every model ran" in said and "chatterbot_mc" in said
    text = md.read_text()
    assert "aggregate (1 common)" in text and "| 2/2 |" in text and "| 1/2 |" in text and " * |" in text


def test_eval_reports_requests_cut_to_the_context(tiny_model_dir, tmp_path, capsys):
    """Eval tasks never drop items, but over-long ones are cut to their last tokens: counted, printed, recorded."""
    from lmforge.eval import stage as eval_stage

    task = str(SUITE / "cloze_shakespeare.yaml")
    m = eval_stage.run(eval_stage.Config(model=str(tiny_model_dir), tasks=[task], task_limit=4, task_max_len=16),
                       tmp_path / "short")
    said = " ".join(capsys.readouterr().err.split())
    cut = m.metrics["cloze_shakespeare.truncated_requests"]
    assert cut > 0 and f"cloze_shakespeare: {cut} request(s) longer than the 16-token context" in said
    m = eval_stage.run(eval_stage.Config(model=str(tiny_model_dir), tasks=[task], task_limit=4), tmp_path / "full")
    assert "cloze_shakespeare.truncated_requests" not in m.metrics
