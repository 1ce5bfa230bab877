"""Constrained decoding in the engine (lmforge.serve.structured): a tiny *random* model sampled at temperature 1 must
still produce output that parses and validates (or ends with "length"); unconstrained rows of a mixed batch are
untouched; n>1, seed, stop, logprobs, streaming, prefix caching and every weight format compose; bad specs raise a
clear StructuredOutputError."""

from __future__ import annotations

import json
import re
import threading

import pytest
from test_serve import CTX, _build_serve_model

from lmforge.serve.engine import Engine
from lmforge.serve.sampling import SamplingParams
from lmforge.serve.structured import GrammarSpec, StructuredOutputError, StructuredOutputs, make_backend

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")
pytest.importorskip("llguidance")

FORMATS = jsonschema.FormatChecker()
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "member": {"type": "boolean"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
        "address": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                                                     "city": {"$ref": "#/$defs/city"}},
                    "required": ["zip"]},
    },
    "required": ["name", "age", "role", "address"],
    "$defs": {"city": {"enum": ["Paris", "Oslo"]}},
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see conftest


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("structured") / "tiny"
    _build_serve_model(folder)
    return folder


@pytest.fixture(scope="module")
def engine(model_dir):
    eng = Engine.from_folder(model_dir, max_num_seqs=8, max_model_len=CTX)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module", params=["xgrammar", "llguidance"])
def so(request, engine):
    s = StructuredOutputs.for_engine(engine, backend=request.param)
    yield s
    s.shutdown()


def _params(proc, **kw) -> SamplingParams:
    kw.setdefault("temperature", 1.0)
    kw.setdefault("max_tokens", 100)
    return SamplingParams(logits_processors=[proc], **kw)


def _check_json(res, schema) -> None:
    """Valid JSON that validates, or cut off by max_tokens."""
    if res.finish_reason == "length":
        return
    assert res.finish_reason == "stop", res
    jsonschema.validate(json.loads(res.text), schema, format_checker=FORMATS)


# -- the spec kinds ------------------------------------------------------------------------------------------------
def test_json_schema_nested_objects_arrays_enums_required(engine, so):
    stopped = 0
    for seed in range(3):
        res = engine.generate_text("A person:", _params(so.processor(GrammarSpec.json_schema(PERSON)), seed=seed))
        _check_json(res, PERSON)
        stopped += res.finish_reason == "stop"
    assert stopped >= 2  # the schema is bounded: a random model still closes it within max_tokens


def test_json_object_regex_choice_and_grammars(engine, so):
    res = engine.generate_text("x", _params(so.processor(GrammarSpec.json_object()), seed=1))
    assert res.finish_reason == "length" or isinstance(json.loads(res.text), dict)
    pattern = r"[a-c]{2,4}@(x|yz)\.(com|org)"
    for seed in range(3):
        res = engine.generate_text("x", _params(so.processor(GrammarSpec.regex(pattern)), seed=seed))
        assert res.finish_reason == "stop" and re.fullmatch(pattern, res.text), res
    choices = ["yes", "no", "maybe so"]
    got = {engine.generate_text("x", _params(so.processor(GrammarSpec.choice(choices)), seed=s)).text
           for s in range(6)}
    assert got <= set(choices) and got
    gbnf = 'root ::= "(" item ("," item)* ")"\nitem ::= [0-9] | "x"'
    res = engine.generate_text("x", _params(so.processor(GrammarSpec.grammar(gbnf)), seed=3))
    assert res.finish_reason == "length" or re.fullmatch(r"\((?:[0-9]|x)(?:,(?:[0-9]|x))*\)", res.text), res
    lark = 'start: "[" NUM (", " NUM)* "]"\nNUM: /[1-9]/'
    res = engine.generate_text("x", _params(so.processor(GrammarSpec.grammar(lark, "lark")), seed=3))
    assert res.finish_reason == "length" or re.fullmatch(r"\[[1-9](, [1-9])*\]", res.text), res


def test_enum_values_that_contradict_their_type_are_never_emitted(engine, so):
    # as in BFCL's live schemas: an integer / boolean parameter whose enum holds the string "dontcare"
    schema = {"type": "object", "properties": {"year": {"type": "integer", "enum": [2019, "dontcare"]},
                                               "kids": {"type": "boolean", "enum": ["True", "dontcare"]}},
              "required": ["year"]}
    for seed in range(3):
        res = engine.generate_text("x", _params(so.processor(GrammarSpec.json_schema(schema)), seed=seed))
        assert json.loads(res.text) == {"year": 2019}


def test_required_properties_that_are_not_declared_are_still_produced(engine, so):
    # as in BFCL: {"type": "dict", "required": ["adults", ...]} with no "properties"
    schema = {"type": "object", "properties": {"pop": {"type": "object", "required": ["adults"]}}, "required": ["pop"]}
    for seed in range(2):
        res = engine.generate_text("x", _params(so.processor(GrammarSpec.json_schema(schema)), seed=seed))
        _check_json(res, schema)
    assert not _accepts(so, engine, schema, '{"pop": {}}')


def test_greedy_constrained_request(engine, so):
    res = engine.generate_text("x", _params(so.processor(GrammarSpec.choice(["alpha", "beta"])), temperature=0.0))
    assert res.text in ("alpha", "beta") and res.finish_reason == "stop"


# -- composing with the engine ---------------------------------------------------------------------------------------
def test_mixed_batch_leaves_unconstrained_rows_untouched(engine, so):
    bias = {i: -100 for i in engine.eos_token_ids}
    plain = [SamplingParams(temperature=1.0, seed=7, max_tokens=30, logit_bias=bias),
             SamplingParams(temperature=0.0, max_tokens=30, logit_bias=bias)]
    alone = [engine.generate_text("The with statement", p).token_ids for p in plain]
    results: dict[int, object] = {}

    def constrained(i):
        results[i] = engine.generate_text(f"Person {i}:", _params(so.processor(GrammarSpec.json_schema(PERSON)),
                                                                   seed=i))

    threads = [threading.Thread(target=constrained, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    mixed = [engine.generate_text("The with statement", p).token_ids for p in plain]
    for t in threads:
        t.join()
    assert mixed == alone
    for res in results.values():
        _check_json(res, PERSON)


def test_seed_reproduces_and_n_choices_share_one_compile(engine, so):
    spec = GrammarSpec.json_schema({"type": "object", "properties": {"v": {"type": "integer", "maximum": 99,
                                                                          "minimum": -9}}, "required": ["v"]})
    before = so.compiles
    procs = [so.processor(spec) for _ in range(4)]  # n=4: one processor (matcher) per choice, one compile
    assert so.compiles - before <= 1
    outs: dict[int, str] = {}

    def run(i):
        outs[i] = engine.generate_text("v:", _params(procs[i], seed=100 + i % 2)).text

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outs[0] == outs[2] and outs[1] == outs[3]  # same seed, same output, whatever ran beside it
    for text in outs.values():
        jsonschema.validate(json.loads(text), spec.value)
    with pytest.raises(Exception, match="one per request"):  # a processor is per request
        engine.generate_text("v:", _params(procs[0], seed=1))


def test_streaming_stop_strings_logprobs_and_prefix_cache(engine, so):
    spec = GrammarSpec.json_schema(PERSON)
    prompt = "A shared header for the prefix cache. Person:"
    full = engine.generate_text(prompt, _params(so.processor(spec), seed=5, logprobs=3))
    hits = engine.prefix_cache_hits
    pieces = list(engine.generate(prompt, _params(so.processor(spec), seed=5, logprobs=3)))
    assert engine.prefix_cache_hits > hits  # the second run reused the cached prompt
    assert "".join(p.text for p in pieces) == full.text and pieces[-1].finish_reason == full.finish_reason
    _check_json(full, PERSON)
    # logprobs are those of the masked distribution: the first token is forced to '{'-something
    first = full.logprobs[0]
    assert engine.decode([first.token]).startswith("{")
    assert all(engine.decode([t]).startswith("{") for t, _ in first.top)
    assert sum(2.718281828 ** lp for _, lp in first.top) <= 1.0 + 1e-4
    # a stop string ends the request early, as for any request
    res = engine.generate_text("x", _params(so.processor(GrammarSpec.choice(["abc;def"])), stop=[";"]))
    assert (res.text, res.finish_reason) == ("abc", "stop")


@pytest.mark.parametrize("kw", [{"dtype": "bfloat16"}, {"quantize": "int8"}, {"quantize": "int4"}])
def test_every_weight_format(model_dir, kw):
    eng = Engine.from_folder(model_dir, max_num_seqs=2, max_model_len=CTX, **kw)
    so = StructuredOutputs.for_engine(eng)
    try:
        _check_json(eng.generate_text("A person:", _params(so.processor(GrammarSpec.json_schema(PERSON)), seed=0)),
                    PERSON)
        assert eng.generate_text("x", _params(so.processor(GrammarSpec.regex("[0-9]{3}")))).text.isdigit()
    finally:
        so.shutdown()
        eng.shutdown()


def test_compile_runs_off_the_driver_and_is_cached(engine):
    """A grammar still compiling holds back only its own request: another stream runs to the end meanwhile."""
    gate = threading.Event()
    real = make_backend("xgrammar", engine.tokenizer, engine.vocab_size, engine.eos_token_ids)

    class SlowBackend:
        name, vocab_size = "slow", engine.vocab_size

        def compile(self, spec):
            gate.wait(30)
            return real.compile(spec)

    so = StructuredOutputs.for_engine(engine, backend=SlowBackend())
    try:
        fut = so.compile(GrammarSpec.regex("[ab]{4}"))
        other = engine.generate_text("The with statement", SamplingParams(temperature=0.0, max_tokens=8))
        assert other.completion_tokens >= 1 and not fut.done()  # served while the compile is blocked
        gate.set()
        proc = so.processor(GrammarSpec.regex("[ab]{4}"))
        assert so.compile(GrammarSpec.regex("[ab]{4}")) is fut and so.compiles == 1  # cached
        assert re.fullmatch("[ab]{4}", engine.generate_text("x", _params(proc)).text)
    finally:
        gate.set()
        so.shutdown()


# -- bad specs -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, message", [
    (GrammarSpec.json_schema({"type": "object", "properties": {"a": {"type": 5}}}), "#/properties/a/type"),
    (GrammarSpec.json_schema('{"type": "object",'), "not valid JSON"),
    (GrammarSpec.json_schema({"type": "dict"}), "#/type"),
    (GrammarSpec.json_schema({"properties": {"a": {"$ref": "#/$defs/missing"}}}), "#/properties/a/\\$ref"),
    (GrammarSpec.json_schema({"$ref": "https://example.com/s.json"}), "does not resolve"),
    (GrammarSpec.json_schema({"properties": {"xs": {"type": "array", "uniqueItems": True}}}),
     "'uniqueItems' at #/properties/xs/uniqueItems"),
    (GrammarSpec.json_schema({"$defs": {"a": {"oneOf": [{"type": "integer"}, {"type": "number"}]}}}),
     "'oneOf' at #/\\$defs/a/oneOf"),
    (GrammarSpec.json_schema({"items": {"type": "string", "format": "iri"}}), "format 'iri' at #/items/format"),
    (GrammarSpec.json_schema({"properties": {"a": {"type": "string", "pattern": "^x+$", "maxLength": 3}}}),
     "'pattern' with 'maxLength' at #/properties/a/maxLength"),
    (GrammarSpec.json_schema({"properties": {"y": {"type": "integer", "enum": ["any"]}}, "required": ["y"]}),
     "no value satisfies the schema at #/properties/y/enum"),
    (GrammarSpec.regex("(ab"), "invalid regex"),
    (GrammarSpec.grammar('root ::= ("a" | "b"'), "invalid gbnf grammar"),
    (GrammarSpec.grammar('root ::= "a" undefined-rule'), "invalid gbnf grammar"),
    (GrammarSpec.grammar('start: ( "a"', "lark"), "invalid lark grammar"),
    (GrammarSpec.choice([]), "non-empty list"),
])
def test_bad_specs_raise_clear_value_errors(so, spec, message):
    with pytest.raises(StructuredOutputError, match=message) as info:
        so.processor(spec)
    assert isinstance(info.value, ValueError)  # the API layer answers 400


def test_unknown_kind_and_backend():
    with pytest.raises(StructuredOutputError, match="unknown structured-output kind"):
        GrammarSpec("xml", "<a/>")
    with pytest.raises(ValueError, match="unknown grammar backend"):
        make_backend("outlines", None, 10, [0])


# Every supported assertion keyword: the backend rejects a violating document and accepts a conforming one (the
# evidence behind spec.SUPPORTED_KEYWORDS; what neither enforces is rejected up front, tested above).
KEYWORD_CASES = [
    ({"type": "string", "minLength": 3}, '"ab"', '"abc"'),
    ({"type": "string", "maxLength": 2}, '"abc"', '"ab"'),
    ({"type": "string", "maxLength": 4}, '"a\x11"', '"a b"'),  # a raw control character is not JSON
    ({"type": "string", "pattern": "^a+$"}, '"b"', '"aa"'),
    ({"type": "string", "format": "date"}, '"x"', '"2024-01-02"'),
    ({"type": "string", "format": "email"}, '"x"', '"a@b.co"'),
    ({"type": "integer", "minimum": 5}, "3", "7"),
    ({"type": "integer", "exclusiveMaximum": 5}, "5", "4"),
    ({"type": "number", "maximum": 1.5}, "2.0", "1.25"),
    ({"type": "integer", "multipleOf": 3}, "4", "6"),
    ({"type": "array", "items": {"type": "integer"}, "minItems": 2}, "[1]", "[1, 2]"),
    ({"type": "array", "items": {"type": "integer"}, "maxItems": 1}, "[1, 2]", "[1]"),
    ({"type": "array", "prefixItems": [{"type": "string"}], "items": False}, "[1]", '["a"]'),
    ({"type": "object", "additionalProperties": {"type": "integer"}, "minProperties": 1}, "{}", '{"a": 1}'),
    ({"type": "object", "patternProperties": {"^x": {"type": "integer"}}}, '{"x": "s"}', '{"x": 1}'),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}, "{}", '{"a": 1}'),
    ({"type": ["string", "null"]}, "1", "null"),
    ({"anyOf": [{"type": "integer"}, {"type": "string"}]}, "true", "1"),
    ({"const": "x"}, '"y"', '"x"'),
    ({"enum": [1, "a"]}, "2", '"a"'),
    ({"$defs": {"x": {"type": "integer"}}, "$ref": "#/$defs/x"}, '"s"', "1"),
]


def _accepts(so, engine, schema, text) -> bool:
    matcher = so.compile(GrammarSpec.json_schema(schema)).result().matcher()
    ids = engine.encode(text, add_special_tokens=False) + [min(engine.eos_token_ids)]
    return all(matcher.accept_token(t) for t in ids) and matcher.is_terminated()


@pytest.mark.parametrize("schema, bad, good", KEYWORD_CASES)
def test_supported_keywords_are_enforced(engine, so, schema, bad, good):
    jsonschema.validate(json.loads(good), schema, format_checker=FORMATS)
    with pytest.raises((jsonschema.ValidationError, json.JSONDecodeError)):
        jsonschema.validate(json.loads(bad), schema, format_checker=FORMATS)
    assert _accepts(so, engine, schema, good)
    assert not _accepts(so, engine, schema, bad)


def test_apply_bitmask_matches_a_bit_by_bit_reference():
    import torch

    from lmforge.serve.structured import apply_bitmask

    g = torch.Generator().manual_seed(0)
    for vocab in (1, 31, 32, 75):
        logits = torch.randn(vocab, generator=g)
        bits = torch.randint(-2 ** 31, 2 ** 31 - 1, ((vocab + 31) // 32,), dtype=torch.int32, generator=g)
        ref = [float("-inf") if not (int(bits[i // 32]) >> (i % 32)) & 1 else float(logits[i]) for i in range(vocab)]
        assert apply_bitmask(logits.clone(), bits).tolist() == ref
    wide = torch.zeros(40)  # a mask narrower than the logits disallows the tokens past it
    assert torch.isinf(apply_bitmask(wide, torch.tensor([-1], dtype=torch.int32))[32:]).all()


def test_processor_async_for_the_http_layer(engine):
    import asyncio

    so = StructuredOutputs.for_engine(engine)
    try:
        proc = asyncio.run(so.processor_async(GrammarSpec.choice(["on", "off"])))
        assert engine.generate_text("x", _params(proc, seed=0)).text in ("on", "off")
        with pytest.raises(StructuredOutputError, match="invalid regex"):
            asyncio.run(so.processor_async(GrammarSpec.regex("[a-")))
    finally:
        so.shutdown()
