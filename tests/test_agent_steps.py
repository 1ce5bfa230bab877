"""Per-step timing of agent model calls on the in-process engine: prefill and decode seconds and the prompt tokens
the prefix cache already held (later steps of a growing conversation reuse the earlier ones), in the trace and in
`lmforge agent trace`."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from lmforge.agent import Agent, EngineBackend, calculator
from lmforge.cli import app

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_engine_steps_record_prefill_decode_and_cached_tokens(tmp_path):
    from test_serve import _build_serve_model

    from lmforge.serve.engine import Engine

    _build_serve_model(tmp_path / "tiny", ctx=2048)
    engine = Engine.from_folder(tmp_path / "tiny", max_num_seqs=1, max_model_len=None)
    try:
        agent = Agent(EngineBackend(engine, max_tokens=8), tools=[calculator], max_steps=3, tool_choice="required",
                      out_dir=tmp_path / "run")
        result = agent.run("2+2?")
    finally:
        engine.shutdown()
    steps = [r for r in result.trace if r["type"] == "model" and "error" not in r]
    assert len(steps) >= 2, result.trace
    for r in steps:
        assert r["prefill_seconds"] > 0 and r["decode_seconds"] >= 0
        assert r["prefill_seconds"] + r["decode_seconds"] <= r["seconds"]
    assert steps[0]["cached_tokens"] == 0
    assert 0 < steps[1]["cached_tokens"] < steps[1]["prompt_tokens"]  # the conversation so far came from the cache
    printed = CliRunner().invoke(app, ["agent", "trace", str(tmp_path / "run")])
    assert printed.exit_code == 0 and "prefill" in printed.stdout and "cached; decode" in printed.stdout


def test_a_call_cut_off_inside_its_tag_is_a_cut_off_call():
    from test_agent import _FakeEngine, _NoGrammar

    from lmforge.agent import FunctionTool

    decl = [FunctionTool.from_function(calculator).to_openai()]
    cut = list(EngineBackend(_FakeEngine("Sure. <tool_ca", "length"), structured=_NoGrammar())
               .stream([{"role": "user", "content": "q"}], decl))[-1]
    assert cut.content == "Sure." and len(cut.calls) == 1 and not cut.calls[0].complete
    done = list(EngineBackend(_FakeEngine("Use <b>bold</b> and <", "stop"), structured=_NoGrammar())
                .stream([{"role": "user", "content": "q"}], decl))[-1]
    assert done.content == "Use <b>bold</b> and <" and done.calls == []  # ended by itself: an answer
