"""`lmforge synth --mode tools`: function-calling conversations from tool schemas through a real `lmforge serve`
(tools, tool_choice and response_format requests); every kept record passes the SFT reader's checks."""

from __future__ import annotations

import json

import pytest
from test_serve import _build_serve_model

from lmforge.align import synth
from lmforge.align.chat_data import DataStats, read_conversations
from lmforge.serve.engine import Engine
from lmforge.serve.smoke import running_server

pytest.importorskip("xgrammar")
TOOLS = [{"type": "function", "function": {"name": n, "description": d, "parameters": {
    "type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["x"]}}}
    for n, d in (("square", "x squared"), ("half", "x / 2"), ("negate", "-x"), ("double", "2 x"))]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("synth-tools") / "tiny"
    _build_serve_model(folder, ctx=2048)
    engine = Engine.from_folder(folder, max_num_seqs=4, max_model_len=None)
    with running_server(engine, "tiny") as url:
        yield url
    engine.shutdown()


def test_synth_tools_mode_writes_sft_ready_conversations(server, tmp_path):
    tools = tmp_path / "tools.jsonl"
    tools.write_text("".join(json.dumps(t) + "\n" for t in TOOLS))
    cfg = synth.Config(base_url=server, model="tiny", mode="tools", tools=str(tools), num_tasks=4, concurrency=2,
                       max_tokens=48, min_words=1, temperature=1.0)
    m = synth.run(cfg, tmp_path / "out").metrics
    assert m["kept"] + m["rejected"] == 4
    kept = (tmp_path / "out" / "synth.jsonl").read_text().splitlines()
    stats = DataStats()
    convs = read_conversations(tmp_path / "out" / "synth.jsonl", "raise", stats)  # calls validate, ids match
    assert len(convs) == len(kept) == m["kept"]
    for line in kept:
        rec = json.loads(line)
        assert [m["role"] for m in rec["messages"]][:2] == ["user", "assistant"]
        assert rec["messages"][1]["tool_calls"] and rec["messages"][-1]["role"] == "assistant"
        assert 3 <= len(rec["tools"]) <= 4
    for line in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines():
        assert json.loads(line)["reason"]  # every rejected task says why


def test_synth_tools_bad_tool_file_names_the_line(tmp_path):
    bad = tmp_path / "tools.jsonl"
    bad.write_text(json.dumps(TOOLS[0]) + "\n" + json.dumps({"type": "function", "function": {}}) + "\n")
    cfg = synth.Config(base_url="http://127.0.0.1:9/v1", model="m", mode="tools", tools=str(bad))
    with pytest.raises(ValueError, match=r"tools\.jsonl:2: .*function\.name is required"):
        synth.run(cfg, tmp_path / "out")
