"""Reward functions ``reward(prompt, completion, **fields) -> float`` and their weighted combination.

A reward is any callable taking the prompt text, the completion text and the item's fields as keywords.  The fields
it needs are its keyword parameters without a default (``required_fields``): a task file line that lacks one is an
error naming it.  Rewards are named in a *spec*: ``"numeric_match"``, ``"json_fields:1,json_schema:0.5"`` (weights
after a colon), ``"my_module:my_reward:0.5"`` (any importable ``module:function``) or a reward-model folder written by
``lmforge reward train`` (its scalar score of the prompt + completion as a chat exchange).

Built in (all return values in [0, 1]):

* ``numeric_match`` (field ``answer``): the number after the last ``Answer:`` (else the last number) equals it;
* ``answer_format``: the completion has an ``Answer: <value>`` line; ``regex`` (field ``pattern``): it matches;
* ``json_schema`` (field ``schema``): the JSON object in the completion is valid against the schema (the schema is
  checked with the structured-output checker, ``lmforge.serve.structured.spec.check_json_schema``);
* ``json_fields`` (field ``expected``): share of the expected keys whose values the JSON object has;
* ``countdown`` (fields ``numbers``, ``target``): the expression on the answer line uses each number at most once,
  only + - * / and parentheses, and equals the target;
* ``tool_call`` (field ``expected_call``: ``{"name", "arguments"}``): the first ``<tool_call>`` parsed with the
  server's ``ToolCallParser`` has the expected name (0.5) and arguments (0.5);
* ``token_fraction`` (field ``token``): share of the completion's characters that are occurrences of ``token`` (a
  dense, trivially learnable reward for tests).

``Reward.score`` never lets a bad reward stop a run: a component that raises or returns None / NaN / inf is counted
(``failures``), logged once per component, and the sample's reward is 0 (``failed=True`` so a caller can skip a group
whose samples all failed).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import logging
import math
import operator
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("lmforge.rl")

RewardFn = Callable[..., float]
REWARDS: dict[str, RewardFn] = {}


class RewardError(ValueError):
    """A reward spec that names nothing usable."""


def register(name: str) -> Callable[[RewardFn], RewardFn]:
    def deco(fn: RewardFn) -> RewardFn:
        REWARDS[name] = fn
        return fn

    return deco


# -- parsing helpers ---------------------------------------------------------------------------------------------------
_ANSWER = re.compile(r"answer\s*[:=]\s*(.+)", re.I)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def answer_text(completion: str) -> str:
    """What follows the last ``Answer:`` in the completion, else its last non-empty line."""
    found = _ANSWER.findall(completion)
    if found:
        return found[-1].strip()
    lines = [l.strip() for l in completion.strip().splitlines() if l.strip()]
    return lines[-1] if lines else ""


def extract_number(completion: str) -> float | None:
    for text in (answer_text(completion), completion):
        nums = _NUMBER.findall(text)
        if nums:
            try:
                return float(nums[0 if text is not completion else -1].replace(",", ""))
            except ValueError:
                return None
    return None


def extract_json(completion: str) -> Any:
    """The JSON value in the completion: the whole text, else the span from the first ``{`` to the last ``}``."""
    text = completion.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        return None
    try:
        return json.loads(text[start:end + 1])
    except json.JSONDecodeError:
        return None


# -- built-in rewards ----------------------------------------------------------------------------------------------------
@register("numeric_match")
def numeric_match(prompt: str, completion: str, *, answer: float | int | str, **_: Any) -> float:
    got = extract_number(completion)
    return float(got is not None and math.isclose(got, float(answer), rel_tol=0, abs_tol=1e-6))


@register("answer_format")
def answer_format(prompt: str, completion: str, **_: Any) -> float:
    return float(bool(re.search(r"^\s*answer\s*:\s*\S", completion, re.I | re.M)))


@register("regex")
def regex(prompt: str, completion: str, *, pattern: str, **_: Any) -> float:
    return float(re.search(pattern, completion) is not None)


@register("json_schema")
def json_schema(prompt: str, completion: str, *, schema: dict, **_: Any) -> float:
    import jsonschema

    from lmforge.serve.structured.spec import check_json_schema

    check_json_schema(schema)  # a broken schema is the task's fault: it raises (counted as a failed reward)
    value = extract_json(completion)
    if value is None:
        return 0.0
    return float(jsonschema.Draft202012Validator(schema).is_valid(value))


@register("json_fields")
def json_fields(prompt: str, completion: str, *, expected: dict, **_: Any) -> float:
    value = extract_json(completion)
    if not isinstance(value, dict) or not expected:
        return 0.0
    return sum(k in value and value[k] == v for k, v in expected.items()) / len(expected)


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _eval_arith(node: ast.AST, used: list[int]) -> float:
    if isinstance(node, ast.Expression):
        return _eval_arith(node.body, used)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval_arith(node.left, used), _eval_arith(node.right, used))
    if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
        used.append(node.value)
        return node.value
    raise ValueError("not an arithmetic expression")


@register("countdown")
def countdown(prompt: str, completion: str, *, numbers: list[int], target: int, **_: Any) -> float:
    expr = answer_text(completion).split("=")[0].strip().rstrip(".")
    if not expr or len(expr) > 200:
        return 0.0
    try:
        used: list[int] = []
        value = _eval_arith(ast.parse(expr.replace("×", "*").replace("÷", "/"), mode="eval"), used)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
        return 0.0
    if Counter(used) - Counter(numbers):  # a number not given, or used more often than given
        return 0.0
    return float(math.isclose(value, target, abs_tol=1e-9))


@register("tool_call")
def tool_call(prompt: str, completion: str, *, expected_call: dict, **_: Any) -> float:
    from lmforge.serve.tools import parse_tool_calls

    _, calls = parse_tool_calls(completion)
    if not calls:
        return 0.0
    call = calls[0]
    score = 0.5 * (call.name == expected_call.get("name"))
    try:
        args = json.loads(call.arguments) if call.arguments else {}
    except json.JSONDecodeError:
        return score
    want = expected_call.get("arguments", {})
    if isinstance(want, str):
        want = json.loads(want)
    return score + 0.5 * (args == want)


@register("token_fraction")
def token_fraction(prompt: str, completion: str, *, token: str, **_: Any) -> float:
    if not completion or not token:
        return 0.0
    return completion.count(token) * len(token) / len(completion)


# -- specs and the combined reward -------------------------------------------------------------------------------------
def resolve(name: str) -> RewardFn:
    """A registered reward, or ``module:function`` imported."""
    if name in REWARDS:
        return REWARDS[name]
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except ImportError as err:
            raise RewardError(f"reward {name!r}: cannot import module {module!r}: {err}") from None
        except AttributeError:
            raise RewardError(f"reward {name!r}: module {module!r} has no {attr!r}") from None
        if not callable(fn):
            raise RewardError(f"reward {name!r} is not callable")
        return fn
    if Path(name).is_dir():
        return reward_model(name)
    raise RewardError(f"unknown reward {name!r}: built in are {sorted(REWARDS)}; or give module:function")


def reward_model(folder: str) -> RewardFn:
    """A reward-model folder (``lmforge reward train``) as a reward: its scalar score of the prompt + completion
    rendered as a user/assistant exchange.  The model is loaded once."""
    from lmforge.align.reward import load_reward_model

    try:
        scorer = load_reward_model(folder)
    except (OSError, ValueError) as err:
        raise RewardError(f"reward {folder!r}: not a usable reward model folder: {err}") from None

    def score(prompt: str, completion: str, **_: Any) -> float:
        return scorer.score_completions([prompt], [completion])[0]

    score.__name__ = f"reward_model({folder})"
    return score


def parse_spec(spec: str) -> list[tuple[str, RewardFn, float]]:
    """``"a,b:0.5,pkg.mod:fn:2"`` → ``[(name, function, weight), ...]``."""
    out = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, weight = part, 1.0
        head, sep, tail = part.rpartition(":")
        if sep and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", tail.strip()):
            name, weight = head.strip(), float(tail)
        out.append((name, resolve(name), weight))
    if not out:
        raise RewardError("no reward given")
    return out


def required_fields(components: list[tuple[str, RewardFn, float]]) -> dict[str, str]:
    """``{field: reward name}`` for every keyword parameter without a default of the rewards."""
    need: dict[str, str] = {}
    for name, fn, _ in components:
        try:
            params = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):
            continue
        for p in params:
            if p.kind is p.KEYWORD_ONLY and p.default is p.empty:
                need.setdefault(p.name, name)
    return need


def _accepted(fn: RewardFn, fields: dict[str, Any]) -> dict[str, Any]:
    """The fields ``fn`` takes: all of them when it has ``**kwargs``, else those it names (never ``prompt`` or
    ``completion``, which it gets positionally)."""
    if "prompt" in fields or "completion" in fields:
        fields = {k: v for k, v in fields.items() if k not in ("prompt", "completion")}
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fields
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return fields
    return {k: v for k, v in fields.items() if k in params}


@dataclass
class Scored:
    total: float  # weighted sum (0 when failed)
    parts: dict[str, float]  # per component (0 for a failed one)
    failed: bool  # some component raised or returned None / NaN


@dataclass
class Reward:
    """Weighted sum of reward components; ``failures`` counts failed calls per component."""

    components: list[tuple[str, RewardFn, float]]
    failures: Counter = field(default_factory=Counter)

    @classmethod
    def from_spec(cls, spec: str) -> "Reward":
        return cls(parse_spec(spec))

    @property
    def names(self) -> list[str]:
        return [n for n, _, _ in self.components]

    def score(self, prompt: str, completion: str, fields: dict[str, Any]) -> Scored:
        parts, failed = {}, False
        for name, fn, weight in self.components:
            try:
                value = fn(prompt, completion, **_accepted(fn, fields))
                bad = None if value is not None and math.isfinite(float(value)) else f"returned {value!r}"
            except Exception as err:  # a user's reward must not stop the run
                value, bad = None, f"raised {type(err).__name__}: {err}"
            if bad is not None:
                self.failures[name] += 1
                if self.failures[name] == 1:
                    log.warning("reward %s %s; the sample gets reward 0 (further failures are only counted)",
                                name, bad)
                failed = True
                parts[name] = 0.0
            else:
                parts[name] = float(value)
        total = 0.0 if failed else sum(w * parts[n] for n, _, w in self.components)
        return Scored(total, parts, failed)
