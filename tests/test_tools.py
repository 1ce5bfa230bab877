"""Function calling (lmforge.serve.tools): OpenAI tools rendered into the one documented format, the tool_choice
grammar enforced by a tiny *random* model sampled at temperature 1 (every call parses and validates against its
function's parameters), streaming parse equal to the whole-output parse, and bad tools / tool_choice / tool messages
rejected with the request field named."""

from __future__ import annotations

import json

import jsonschema
import pytest
from test_serve import CTX, _build_serve_model

from lmforge.serve.engine import Engine
from lmforge.serve.sampling import SamplingParams
from lmforge.serve.structured import StructuredOutputs
from lmforge.serve.tools import (
    TAG,
    ToolError,
    format_call,
    parse_tool_calls,
    parse_tool_choice,
    parse_tools,
    render_messages,
    tool_call_grammar,
    ToolCallParser,
)

pytest.importorskip("xgrammar")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city"]}}}
TICKET = {"type": "function", "function": {
    "name": "create_ticket", "parameters": {
        "type": "object", "properties": {"title": {"type": "string", "maxLength": 10},
                                         "priority": {"type": "integer", "minimum": 1, "maximum": 3}},
        "required": ["title", "priority"]}}}
TOOLS = [WEATHER, TICKET]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see conftest


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tools") / "tiny"
    _build_serve_model(folder)
    eng = Engine.from_folder(folder, max_num_seqs=8, max_model_len=CTX)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module", params=["xgrammar", "llguidance"])
def so(request, engine):
    if request.param == "llguidance":
        pytest.importorskip("llguidance")
    s = StructuredOutputs.for_engine(engine, backend=request.param)
    yield s
    s.shutdown()


def _generate(engine, so, choice, parallel=True, seed=0, max_tokens=110):
    tools = parse_tools(TOOLS)
    spec = tool_call_grammar(tools, parse_tool_choice(choice, tools), parallel)
    params = SamplingParams(temperature=1.0, max_tokens=max_tokens, seed=seed, logits_processors=[so.processor(spec)])
    return engine.generate_text("Weather in Paris?", params)


def _check_calls(calls, names=SCHEMAS):
    for c in calls:
        assert c.name in names
        jsonschema.validate(json.loads(c.arguments), SCHEMAS[c.name])
        assert c.id.startswith("call_")


def _finished_calls(res, calls):
    """Every call when the output stopped on its own; those whose closing tag came before max_tokens otherwise."""
    assert res.finish_reason == "length" or all(c.complete for c in calls)
    return [c for c in calls if c.complete]


def test_required_and_named_choice_give_valid_calls_only(engine, so):
    complete = 0
    for seed in range(4):
        res = _generate(engine, so, "required", seed=seed)
        assert res.text.startswith(TAG)  # calls only: no text before them
        content, calls = parse_tool_calls(res.text)
        assert calls and content is None
        _check_calls(_finished_calls(res, calls))
        complete += len(_finished_calls(res, calls))
    assert complete >= 2
    named = {"type": "function", "function": {"name": "create_ticket"}}
    for seed in range(3):
        res = _generate(engine, so, named, parallel=False, seed=seed)
        content, calls = parse_tool_calls(res.text)
        assert [c.name for c in calls] == ["create_ticket"]  # one call: parallel_tool_calls=false
        _check_calls(_finished_calls(res, calls), {"create_ticket"})


def test_auto_allows_text_or_calls_and_never_a_broken_call(engine, so):
    kinds = set()
    for seed in range(8):
        res = _generate(engine, so, "auto", seed=seed, max_tokens=60)
        content, calls = parse_tool_calls(res.text)
        before_calls = res.text.split(TAG)[0]
        assert TAG not in (content or "") and TAG not in before_calls
        _check_calls(_finished_calls(res, calls))
        kinds.add("calls" if calls else "text")
    assert "text" in kinds  # a random model mostly writes text: the text branch is open


def test_streaming_parse_equals_whole_parse():
    text = ("Let me check.\n\n" + format_call("get_weather", {"city": "Paris", "q": {"a": [1, "}"]}}) + "\n"
            + format_call("create_ticket", '{"title": "x}\\n</tool_call>", "priority": 2}'))
    ids = iter(f"call_{i}" for i in range(100))
    content, calls = parse_tool_calls(text, new_id=lambda: next(ids))
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "q": {"a": [1, "}"]}}),
        ("create_ticket", {"title": "x}\n</tool_call>", "priority": 2})]
    for step in (1, 2, 3, 7):  # any chunking gives the same content, names and arguments
        ids = iter(f"call_{i}" for i in range(100))
        p = ToolCallParser(lambda: next(ids))
        events = []
        for i in range(0, len(text), step):
            events += p.feed(text[i:i + step])
        events += p.finish()
        assert "".join(e.content for e in events) == content
        args: dict[int, str] = {}
        starts = [(e.index, e.id, e.name) for e in events if e.name]
        for e in events:
            if e.index is not None:
                args[e.index] = args.get(e.index, "") + e.arguments
        assert starts == [(0, "call_0", "get_weather"), (1, "call_1", "create_ticket")]
        assert [args[0], args[1]] == [c.arguments for c in calls]
    # plain text with a lone '<' and a tag prefix at the end stays text
    assert parse_tool_calls("a < b <tool_ca") == ("a < b <tool_ca", [])


def test_render_messages_with_calls_and_results():
    tools = parse_tools(TOOLS)
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris and Oslo?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "a1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                {"id": "a2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
            {"role": "tool", "tool_call_id": "a1", "content": "18 C"},
            {"role": "tool", "tool_call_id": "a2", "content": "3 C"}]
    out = render_messages(msgs, tools, parse_tool_choice("auto", tools))
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be brief.\n\n# Tools") and '"name": "create_ticket"' in out[0]["content"]
    assert out[2]["content"] == format_call("get_weather", {"city": "Paris"}) + "\n" + \
        format_call("get_weather", {"city": "Oslo"})
    assert out[3]["content"] == "<tool_response>\n18 C\n</tool_response>\n<tool_response>\n3 C\n</tool_response>"
    assert "# Tools" not in render_messages(msgs, tools, parse_tool_choice("none", tools))[0]["content"]


@pytest.mark.parametrize("tools, choice, param", [
    ([{"type": "function", "function": {"description": "x"}}], None, "tools[0].function.name"),
    ([{"type": "function", "function": {"name": "bad name"}}], None, "tools[0].function.name"),
    ([WEATHER, WEATHER], None, "tools[1].function.name"),
    ([{"type": "retrieval"}], None, "tools[0].type"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "a": {"$ref": "#/$defs/missing"}}}}}], None, "tools[0].function.parameters"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}], None,
     "tools[0].function.parameters"),
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice.function.name"),
    ([], "required", "tool_choice"),
    ([WEATHER], "sometimes", "tool_choice"),
])
def test_bad_tools_and_tool_choice_name_the_field(tools, choice, param):
    with pytest.raises(ToolError) as err:
        parse_tool_choice(choice, parse_tools(tools))
    assert err.value.param == param


def test_tool_message_must_answer_a_call():
    tools = parse_tools([WEATHER])
    msgs = [{"role": "user", "content": "hi"},
            {"role": "assistant", "tool_calls": [{"id": "a1", "type": "function",
                                                  "function": {"name": "get_weather", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "zz", "content": "x"}]
    with pytest.raises(ToolError) as err:
        render_messages(msgs, tools)
    assert err.value.param == "messages[2].tool_call_id" and "a1" in str(err.value)
    msgs[1]["tool_calls"][0]["function"]["arguments"] = "{not json"
    with pytest.raises(ToolError) as err:
        render_messages(msgs, tools)
    assert err.value.param == "messages[1].tool_calls[0].function.arguments"
