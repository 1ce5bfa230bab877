"""Persona evaluation: a suite of probes (YAML) sent to persona cards, scored by rules, with bootstrap CIs.

``lmforge persona eval --suite examples/personas/suite.yaml --model DIR --out runs/persona-eval``.  The suite names
its personas (a card each, relative to the suite file, with the regexes its rules use) and its probes: one user
message (after an optional ``history``) to one persona, as a fresh user, and the checks in ``expect``:

- ``tool``: the first tool the *model* called (tool records of the trace; the guardrail's own hand-over does not
  count) has this name — the right tool chosen;
- ``handoff``: whether the conversation was handed to a human — a successful ``handoff_to_human`` call in the trace,
  by the model or by the card's ``ungrounded: handoff`` guardrail (refusal when the knowledge base has no answer);
- ``declines``: the card's decline guardrail answered, or the answer matches one of the persona's
  ``decline_markers``;
- ``in_character``: the answer is not empty and matches none of the persona's ``out_of_character`` regexes;
- ``mentions``: the answer contains at least one of the given strings (case-insensitive).

Output: ``items.jsonl`` (per probe: the answer, who answered — the model or a guardrail — the tools called, each
check's verdict), ``results.json`` / ``results.md`` (each check kind's rate, the pass rate of whole probes, overall
and per persona, with 95 % percentile-bootstrap CIs over probes) and the manifest.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from lmforge.artifacts import Manifest, write_json, write_text
from lmforge.config import ConfigError, StageConfig, read_yaml, validate
from lmforge.progress import console
from lmforge.stages import begin, finished

STAGE = "persona_eval"
VERSION = "1"
CHECKS = ("tool", "handoff", "declines", "in_character", "mentions")


class Expect(StageConfig):
    tool: str | None = None
    handoff: bool | None = None
    declines: bool | None = None
    in_character: bool | None = None
    mentions: list[str] | None = None


class Probe(StageConfig):
    id: str
    persona: str
    message: str = Field(min_length=1)
    history: list[dict] = Field(default_factory=list, description="Earlier messages of the conversation.")
    expect: Expect


class SuitePersona(StageConfig):
    card: str
    out_of_character: list[str] = Field(default_factory=list)
    decline_markers: list[str] = Field(default_factory=list)


class Suite(StageConfig):
    personas: dict[str, SuitePersona]
    probes: list[Probe] = Field(min_length=1)


def load_suite(path: str | os.PathLike) -> tuple[Suite, dict[str, dict[str, list[re.Pattern]]]]:
    """The suite and each persona's compiled rule regexes; any problem is a ``ConfigError`` naming the file and
    field."""
    p = Path(path)
    suite = validate(Suite, read_yaml(p), str(p))
    rules: dict[str, dict[str, list[re.Pattern]]] = {}
    for name, sp in suite.personas.items():
        rules[name] = {}
        for key in ("out_of_character", "decline_markers"):
            try:
                rules[name][key] = [re.compile(x, re.I) for x in getattr(sp, key)]
            except re.error as err:
                raise ConfigError(f"{p}: personas.{name}.{key}: bad regex: {err}") from None
    seen: set[str] = set()
    for i, probe in enumerate(suite.probes):
        if probe.persona not in suite.personas:
            raise ConfigError(f"{p}: probes[{i}].persona: {probe.persona!r} is not in personas "
                              f"({', '.join(suite.personas)})")
        if probe.id in seen:
            raise ConfigError(f"{p}: probes[{i}].id: {probe.id!r} is used twice")
        if not probe.expect.model_dump(exclude_none=True):
            raise ConfigError(f"{p}: probes[{i}].expect: nothing to check")
        seen.add(probe.id)
    return suite, rules


def observe(result: Any) -> dict:
    """What the scoring rules look at in one persona answer (an ``AgentResult``)."""
    tools = [r for r in result.trace if r["type"] == "tool"]
    guard = next((r.get("guardrail") for r in result.trace if r["type"] == "answer" and r.get("guardrail")), None)
    model_tools = [r["name"] for r in tools if r.get("id") != "guardrail"]
    handoff = any(r["name"] == "handoff_to_human" and r.get("error") is None for r in tools)
    return {"answer": result.answer or "", "answered_by": guard or "model", "tools": model_tools,
            "handoff": handoff, "stop_reason": result.stop_reason,
            "model_calls": sum(r["type"] == "model" for r in result.trace),
            "prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens}


def check(probe: Probe, seen: dict, rules: dict[str, list[re.Pattern]]) -> dict[str, bool]:
    """Each of the probe's checks: passed or not."""
    e, answer = probe.expect, seen["answer"]
    out: dict[str, bool] = {}
    if e.tool is not None:
        out["tool"] = bool(seen["tools"]) and seen["tools"][0] == e.tool
    if e.handoff is not None:
        out["handoff"] = seen["handoff"] == e.handoff
    if e.declines is not None:
        declined = seen["answered_by"] == "declined" or any(p.search(answer) for p in rules["decline_markers"])
        out["declines"] = declined == e.declines
    if e.in_character is not None:
        ok = bool(answer.strip()) and not any(p.search(answer) for p in rules["out_of_character"])
        out["in_character"] = ok == e.in_character
    if e.mentions is not None:
        out["mentions"] = any(m.lower() in answer.lower() for m in e.mentions)
    return out


def run_suite(suite_path: str | os.PathLike, backend_for: Any, state_dir: str | os.PathLike,
              on_record: Any = None) -> list[dict]:
    """Send every probe to its persona (``backend_for(persona)`` gives the model backend) and score it; each record
    also goes to ``on_record`` as it is made.  Persona state (orders, memory) lives in ``state_dir``."""
    from lmforge.agent.persona import load_persona

    suite, rules = load_suite(suite_path)
    root = Path(suite_path).parent
    personas = {name: load_persona(root / sp.card, state_root=state_dir) for name, sp in suite.personas.items()}
    records = []
    for i, probe in enumerate(suite.probes, 1):
        persona = personas[probe.persona]
        messages = list(probe.history) + [{"role": "user", "content": probe.message}]
        try:
            result = persona.respond(messages, backend_for(persona), user=f"probe-{probe.id}")
        except ValueError as err:  # a malformed history: the probe's fault, said once
            raise ConfigError(f"{suite_path}: probes[{i - 1}] ({probe.id}): {err}") from None
        seen = observe(result)
        verdicts = check(probe, seen, rules[probe.persona])
        records.append({"id": probe.id, "persona": probe.persona, "message": probe.message,
                        "expect": probe.expect.model_dump(exclude_none=True), **seen, "checks": verdicts,
                        "passed": all(verdicts.values())})
        if on_record is not None:
            on_record(records[-1])
        console.print(f"  {i}/{len(suite.probes)} {probe.id}: {'pass' if records[-1]['passed'] else 'FAIL'} "
                      f"({seen['answered_by']}{', tools ' + ','.join(seen['tools']) if seen['tools'] else ''})")
    return records


def summarize(records: list[dict], resamples: int = 1000, seed: int = 0) -> dict:
    """Per check kind and for whole probes: rate, 95 % bootstrap CI, n — overall and per persona."""
    from lmforge.eval.metrics import bootstrap_ci

    def rates(rows: list[dict]) -> dict:
        out = {}
        for kind in CHECKS + ("probe",):
            values = [float(r["passed"] if kind == "probe" else r["checks"][kind]) for r in rows
                      if kind == "probe" or kind in r["checks"]]
            if values:
                lo, hi = bootstrap_ci(values, n_resamples=resamples, seed=seed)
                out[kind] = {"rate": sum(values) / len(values), "ci": [lo, hi], "n": len(values)}
        return out

    return {"overall": rates(records),
            **{p: rates([r for r in records if r["persona"] == p]) for p in sorted({r["persona"] for r in records})}}


class Config(StageConfig):
    """Score persona cards on a probe suite (right tool, hand-over when ungrounded, declines, in character) with
    bootstrap CIs, for a model folder (in-process) or an OpenAI-compatible endpoint."""

    suite: str = Field(description="The suite file (YAML): personas (cards, rule regexes) and probes.")
    model: str | None = Field(None, description="Model folder, run in-process (tool calls grammar-constrained).")
    base_url: str | None = Field(None, description="OpenAI-compatible endpoint (…/v1) instead of a model folder.")
    model_name: str = Field("default", description="Model name sent to the endpoint.")
    api_key: str = Field("EMPTY", description="API key for the endpoint.")
    quantize: Literal["int8", "int4"] | None = Field(None, description="In-process: weight quantization.")
    max_model_len: int = Field(4096, ge=256, description="In-process: context length of the engine.")
    max_tokens: int | None = Field(None, ge=1, description="Tokens per model call (default: each card's).")
    seed: int = Field(0, description="Bootstrap seed.")


def run(config: Config, out_dir: str | os.PathLike, force: bool = False) -> Manifest:
    if (config.model is None) == (config.base_url is None):
        raise ConfigError("persona eval: give exactly one of `model` (a model folder) or `base_url` (an endpoint)")
    suite, _ = load_suite(config.suite)  # a bad suite fails before the model loads
    out = Path(out_dir)
    root = Path(config.suite).parent
    inputs = {"suite": config.suite, **{f"card_{n}": str(root / sp.card) for n, sp in suite.personas.items()}}
    if config.model:
        inputs["model"] = config.model
    run_ = begin(STAGE, VERSION, out, config.model_dump(), inputs=inputs, force=force, execution_fields={"api_key"})
    if run_ is None:
        return finished(out)
    with run_:
        from lmforge.agent.backends import EngineBackend, OpenAIBackend

        engine = None
        if config.model:
            from lmforge.serve.engine import Engine

            engine = Engine.from_folder(config.model, max_num_seqs=1, max_model_len=config.max_model_len,
                                        quantize=config.quantize)

        def backend_for(persona: Any) -> Any:
            c = persona.card
            tokens = config.max_tokens or c.max_tokens
            if engine is not None:
                return EngineBackend(engine, temperature=c.temperature, max_tokens=tokens)
            return OpenAIBackend(config.model_name, base_url=config.base_url, api_key=config.api_key,
                                 temperature=c.temperature, max_tokens=tokens)

        try:
            with open(out / "items.jsonl", "w", encoding="utf-8") as f:  # written as it goes: follow a long run
                records = run_suite(config.suite, backend_for, out / "state",
                                    lambda r: (f.write(json.dumps(r, ensure_ascii=False) + "\n"), f.flush()))
        finally:
            if engine is not None:
                engine.shutdown()
        summary = summarize(records, seed=config.seed)
        write_json(out / "results.json", {"model": config.model or config.base_url, "suite": config.suite,
                                          "rates": summary})
        lines = ["| persona | check | rate | 95% CI | n |", "|---|---|---|---|---|"]
        lines += [f"| {p} | {k} | {v['rate']:.3f} | [{v['ci'][0]:.2f}, {v['ci'][1]:.2f}] | {v['n']} |"
                  for p, kinds in summary.items() for k, v in kinds.items()]
        write_text(out / "results.md", "\n".join(lines) + "\n")
        for k, v in summary["overall"].items():
            run_.metrics[f"{k}.rate"] = round(v["rate"], 5)
        run_.metrics["model_calls"] = sum(r["model_calls"] for r in records)
        console.print("\n".join(lines))
    return finished(out)
