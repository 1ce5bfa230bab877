"""RL tasks and rewards: generated tasks are deterministic with a held-out split, task files report bad lines, rewards
score what they claim and a failing reward never stops scoring."""

import json

import pytest

from lmforge.rl import rewards as R
from lmforge.rl import tasks as T


@pytest.mark.parametrize("name", sorted(T.GENERATORS))
def test_builtin_tasks_are_deterministic_and_held_out_is_disjoint(name):
    a, b = T.generate(name, 300, 40, seed=3), T.generate(name, 300, 40, seed=3)
    assert [i.prompt for i in a.train] == [i.prompt for i in b.train]
    assert [i.fields for i in a.test] == [i.fields for i in b.test]
    assert len(a.test) == 40
    assert not {i.key() for i in a.train} & {i.key() for i in a.test}
    c = T.generate(name, 300, 40, seed=4)
    assert [i.prompt for i in c.train] != [i.prompt for i in a.train]
    # every item carries what its default reward needs
    need = R.required_fields(R.parse_spec(a.reward))
    assert all(set(need) <= set(i.fields) for i in a.train + a.test)


def test_builtin_answers_score_one_with_their_reward():
    for item in T.generate("arithmetic", 50, 0).train:
        assert R.numeric_match(item.prompt, f"Let me think.\nAnswer: {item.fields['answer']}", **item.fields) == 1
        assert R.numeric_match(item.prompt, f"Answer: {item.fields['answer'] + 1}", **item.fields) == 0
    for item in T.generate("json_format", 50, 0).train:
        text = json.dumps(item.fields["expected"])
        assert R.json_schema(item.prompt, text, **item.fields) == 1
        assert R.json_fields(item.prompt, f"```json\n{text}\n```", **item.fields) == 1
        assert R.json_schema(item.prompt, '{"name": 3}', **item.fields) == 0
    cd = T.generate("countdown", 20, 0).train[0].fields
    assert R.countdown("", "Answer: 1 + 1", numbers=[1, 2], target=2) == 0  # 1 used twice, only one given
    assert R.countdown("", "Answer: (3 + 4) * 2 = 14", numbers=[2, 3, 4], target=14) == 1
    assert R.countdown("", "Answer: __import__('os')", **cd) == 0


def test_tool_call_reward_uses_the_servers_parser():
    good = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    want = {"name": "get_weather", "arguments": {"city": "Oslo"}}
    assert R.tool_call("", good, expected_call=want) == 1
    assert R.tool_call("", good.replace("Oslo", "Rome"), expected_call=want) == 0.5
    assert R.tool_call("", "It is sunny.", expected_call=want) == 0


def test_spec_weights_module_functions_and_unknown_names(tmp_path, monkeypatch):
    (tmp_path / "myrewards.py").write_text("def short(prompt, completion, *, limit):\n    return float(len(completion) <= limit)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    comps = R.parse_spec("numeric_match:2, myrewards:short:0.5")
    assert [(n, w) for n, _, w in comps] == [("numeric_match", 2.0), ("myrewards:short", 0.5)]
    assert R.required_fields(comps) == {"answer": "numeric_match", "limit": "myrewards:short"}
    s = R.Reward(comps).score("q", "Answer: 4", {"answer": 4, "limit": 100})
    assert s.total == 2.5 and not s.failed
    with pytest.raises(R.RewardError, match="unknown reward 'nope'"):
        R.parse_spec("nope")
    with pytest.raises(R.RewardError, match="no 'missing'"):
        R.parse_spec("myrewards:missing")


def test_a_raising_or_nan_reward_gives_zero_and_is_counted(tmp_path, monkeypatch, caplog):
    (tmp_path / "badrw.py").write_text(
        "def boom(prompt, completion, **kw):\n    raise RuntimeError('broken')\n"
        "def nan(prompt, completion, **kw):\n    return float('nan')\n"
        "def none(prompt, completion, **kw):\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rw = R.Reward.from_spec("answer_format,badrw:boom,badrw:nan,badrw:none")
    for _ in range(3):
        s = rw.score("q", "Answer: 1", {})
        assert s.failed and s.total == 0 and s.parts["answer_format"] == 1
    assert rw.failures == {"badrw:boom": 3, "badrw:nan": 3, "badrw:none": 3}
    assert sum("broken" in r.message for r in caplog.records) == 1  # warned once, then counted


def test_task_file_errors_name_file_line_and_field(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text('{"prompt": "2+2?", "answer": 4}\n\n{"prompt": "3+3?"}\n')
    with pytest.raises(T.TaskError, match=r"t\.jsonl:3: answer: missing \(the reward numeric_match reads it\)"):
        T.load(str(f), "numeric_match")
    f.write_text('{"answer": 4}\n')
    with pytest.raises(T.TaskError, match=r"t\.jsonl:1: prompt: missing"):
        T.load(str(f), "numeric_match")
    f.write_text('{"prompt": [{"role": "assistant", "content": "hi"}], "answer": 1}\n')
    with pytest.raises(T.TaskError, match=r"t\.jsonl:1: prompt: the messages must end with a user turn"):
        T.load(str(f), "numeric_match")
    f.write_text("not json\n")
    with pytest.raises(T.TaskError, match=r"t\.jsonl:1: invalid JSON"):
        T.load(str(f), "numeric_match")
    with pytest.raises(T.TaskError, match="needs a reward"):
        T.load(str(f))
    with pytest.raises(T.TaskError, match="neither a built-in task"):
        T.load(str(tmp_path / "nope.jsonl"), "numeric_match")
    f.write_text("".join(json.dumps({"prompt": f"{i}+1?", "answer": i + 1}) + "\n" for i in range(20)))
    t = T.load(str(f), "numeric_match", test_fraction=0.25)
    assert len(t.train) == 15 and len(t.test) == 5
    assert not {i.key() for i in t.train} & {i.key() for i in t.test}
