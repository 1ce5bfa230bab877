"""Teaching a model to call tools: `lmforge sft` reads OpenAI function-calling conversations, renders them in the
served tool-call format, trains on the assistant turns (calls included) and not on tool results, and rejects a call
that does not fit its tool with file:line:field."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest

from lmforge.align.chat_data import ChatDataError, ChatTokenizer, encode_file
from lmforge.serve.tools import format_call

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                   "required": ["city"]}}}


def conversation(city: str = "Paris", args: object = None) -> dict:
    args = {"city": city} if args is None else args
    return {"tools": [WEATHER], "messages": [
        {"role": "user", "content": f"Weather in {city}?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps(args)}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "18 C, sunny"},
        {"role": "assistant", "content": f"It is 18 C and sunny in {city}."}]}


def write(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_tool_conversations_train_on_calls_not_on_results(tiny_model_dir, tmp_path):
    data = tmp_path / "tools.jsonl"
    write(data, [conversation("Paris"), conversation("Oslo")])
    tok = ChatTokenizer.from_folder(tiny_model_dir)
    ex = encode_file(tok, data, max_len=2048)[0]
    trained = tok.decode([t for t in ex.labels if t != -100], skip_special_tokens=False)
    assert format_call("get_weather", {"city": "Paris"}) in trained  # the call is a target
    assert "It is 18 C and sunny in Paris." in trained
    assert "18 C, sunny" not in trained and "Weather in Paris?" not in trained  # results and questions are not
    everything = tok.decode(ex.input_ids, skip_special_tokens=False)
    assert "<tool_response>\n18 C, sunny\n</tool_response>" in everything and '"name": "get_weather"' in everything


@pytest.mark.parametrize("record, field", [
    (conversation(args={"town": "Paris"}), "messages[1].tool_calls[0].function.arguments: 'city' is a required"),
    (conversation(args={"city": "Paris", "unit": "k"}), "messages[1].tool_calls[0].function.arguments['unit']"),
    ({**conversation(), "tools": []}, "messages[1].tool_calls[0].function.name: 'get_weather' is not one of"),
    ({**conversation(), "tools": [{"type": "function", "function": {"parameters": {}}}]}, "tools[0].function.name"),
])
def test_bad_calls_name_file_line_and_field(tiny_model_dir, tmp_path, record, field):
    data = tmp_path / "bad.jsonl"
    write(data, [conversation(), record])
    with pytest.raises(ChatDataError) as err:
        encode_file(ChatTokenizer.from_folder(tiny_model_dir), data, max_len=2048)
    assert f"{data}:2: " in str(err.value) and field in str(err.value)


def test_bad_tool_message_id(tiny_model_dir, tmp_path):
    rec = conversation()
    rec["messages"][2]["tool_call_id"] = "zz"
    data = tmp_path / "bad.jsonl"
    write(data, [rec])
    with pytest.raises(ChatDataError, match=r"bad\.jsonl:1: messages\[2\]\.tool_call_id 'zz' matches no"):
        encode_file(ChatTokenizer.from_folder(tiny_model_dir), data, max_len=2048)


def test_sft_cli_on_tool_conversations(tmp_path):
    from test_serve import _build_serve_model

    model = tmp_path / "tiny"
    _build_serve_model(model, ctx=1024)  # the tools' system prompt needs room
    data = tmp_path / "tools.jsonl"
    write(data, [conversation(c) for c in ("Paris", "Oslo", "Rome", "Lima", "Bern", "Kyiv", "Riga", "Oulu")])
    out = tmp_path / "sft"
    proc = subprocess.run([sys.executable, "-m", "lmforge.cli", "sft", "--model", str(model), "--data",
                           str(data), "--out", str(out), "--full", "--max-steps", "2", "--batch-size", "2",
                           "--seq-len", "1024", "--val-fraction", "0.25", "--threads", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "model.safetensors").exists()


def test_bundled_tool_set_is_rebuilt_exactly_and_validates():
    import importlib.util
    from pathlib import Path

    from lmforge.align.chat_data import DataStats, read_conversations

    root = Path(__file__).resolve().parents[1] / "data" / "tools"
    spec = importlib.util.spec_from_file_location("build_stdlib_tools", root / "build_stdlib_tools.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    rebuilt = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in builder.build())
    assert rebuilt == (root / "stdlib_tools.jsonl").read_text()  # results really come from the functions
    stats = DataStats()
    convs = read_conversations(root / "stdlib_tools.jsonl", "raise", stats)
    assert len(convs) == stats.kept == 480
    records = [json.loads(line) for line in (root / "stdlib_tools.jsonl").read_text().splitlines()]
    assert set(builder.KINDS) == {r["kind"] for r in records}
    for r in records:
        msgs = r["messages"]
        assert msgs[-1]["role"] == "assistant" and msgs[-1]["content"] and not msgs[-1].get("tool_calls")
        for i, m in enumerate(msgs[:-1]):  # after the last tool result comes a text answer, not another call
            if m["role"] == "tool" and msgs[i + 1]["role"] != "tool":
                assert msgs[i + 1]["role"] == "assistant" and msgs[i + 1]["content"]
        if r["kind"] in ("none", "unavailable", "near_miss"):
            assert not any(m.get("tool_calls") for m in msgs)
        if r["kind"] == "persona":  # a persona system prompt before the tools, a call, then a text answer
            assert msgs[0]["role"] == "system" and msgs[0]["content"].startswith("You are ")
            assert msgs[2].get("tool_calls") and msgs[3]["role"] == "tool" and msgs[4]["content"]
    # an unavailable question is one a tool answers, but not one of the offered tools
    def asked(question: str) -> set[str]:
        return {t.name for t in builder.TOOLS for q in t.questions
                if re.fullmatch(re.sub(r"\\\{\w+\\\}", ".+", re.escape(q)), question)}
    for r in (r for r in records if r["kind"] == "unavailable"):
        names = {t["function"]["name"] for t in r["tools"]}
        assert asked(r["messages"][0]["content"]) and not asked(r["messages"][0]["content"]) & names
    # a near miss offers tools on the question's topic (gcd for an LCM, sha256 for an MD5, ...), none the right one
    near = [r for r in records if r["kind"] == "near_miss"]
    assert len(near) > 50 and all(any(t["function"]["name"] in builder.DECOYS or t["function"]["name"] in
                                      {n for nm in builder.NEAR_MISSES for n in nm.near} for t in r["tools"])
                                  for r in near)
    lcm = next(r for r in near if "lcm" in (q := r["messages"][0]["content"]) or "least common" in q)
    a, b = map(int, re.findall(r"\d+", lcm["messages"][0]["content"]))
    assert "gcd" in {t["function"]["name"] for t in lcm["tools"]}
    assert str(math.lcm(a, b)) in lcm["messages"][1]["content"]
