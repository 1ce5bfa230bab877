"""Verifiable tasks for RL: prompts plus the fields their reward checks, generated or read from JSONL.

Built in (generated from a seed, license-free, with a disjoint held-out split):

* ``arithmetic``: two- and three-step word problems with an integer answer (reward ``numeric_match``);
* ``countdown``: reach a target with given numbers and + - * / (reward ``countdown``);
* ``json_format``: fill a small JSON schema from a sentence (rewards ``json_fields`` + ``json_schema``).

A task file is JSONL, one item a line: ``{"prompt": str | [messages], <fields the reward reads>...}``.  The fields a
reward needs are its keyword parameters without defaults (``rewards.required_fields``); a line that lacks one is an
error naming ``file:line: field``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


class TaskError(ValueError):
    """A task name or task file that cannot be used (the message names the file, line and field)."""


@dataclass
class Item:
    prompt: str | list[dict]  # a user message, or chat messages ending with a user turn
    fields: dict[str, Any] = field(default_factory=dict)

    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.prompt}] if isinstance(self.prompt, str) else list(self.prompt)

    def key(self) -> str:
        return json.dumps(self.prompt, sort_keys=True)


@dataclass
class Task:
    name: str
    train: list[Item]
    test: list[Item]
    reward: str  # the default reward spec (rewards.parse_spec)


# -- arithmetic word problems ----------------------------------------------------------------------------------------
_NAMES = ["Anna", "Ben", "Carla", "David", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kira", "Luis", "Mia",
          "Noah", "Olga", "Pedro", "Rosa", "Sam", "Tara", "Umar"]
_ITEMS = ["apples", "pencils", "stickers", "marbles", "cookies", "books", "cards", "stamps", "shells", "coins"]
ANSWER_HINT = "Give the final answer as a number on the last line, like 'Answer: 42'."


def _arithmetic_item(rng: random.Random) -> Item:
    n, it = rng.choice(_NAMES), rng.choice(_ITEMS)
    kind = rng.randrange(5)
    if kind == 0:
        a, b = rng.randint(5, 40), rng.randint(2, 30)
        c = rng.randint(1, a + b - 1)
        text, ans = f"{n} has {a} {it}. {n} buys {b} more and then gives {c} to a friend. How many {it} does {n} have now?", a + b - c
    elif kind == 1:
        a, b = rng.randint(2, 12), rng.randint(2, 9)
        c = rng.randint(1, a * b - 1)
        text, ans = f"A box holds {a} {it}. {n} fills {b} boxes and then loses {c} {it}. How many {it} are left?", a * b - c
    elif kind == 2:
        a, b, c = rng.randint(3, 20), rng.randint(2, 7), rng.randint(1, 30)
        text, ans = f"{n} earns {a} dollars a day for {b} days and then finds {c} dollars. How many dollars does {n} have?", a * b + c
    elif kind == 3:
        b = rng.randint(2, 6)
        a = b * rng.randint(2, 12)
        c = rng.randint(1, 20)
        text, ans = f"{n} shares {a} {it} equally among {b} friends. One friend then gets {c} more. How many {it} does that friend have?", a // b + c
    else:
        a, b, c = rng.randint(10, 50), rng.randint(1, 9), rng.randint(1, 9)
        text, ans = f"{n} has {a} {it}, gives away {b}, then gives away {c} more. How many {it} are left?", a - b - c
    return Item(f"{text} {ANSWER_HINT}", {"answer": ans})


# -- countdown -------------------------------------------------------------------------------------------------------
def _countdown_item(rng: random.Random) -> Item:
    while True:
        nums = [rng.randint(1, 12) for _ in range(rng.choice((3, 4)))]
        vals = nums[:]
        rng.shuffle(vals)
        acc = vals[0]
        for v in vals[1:]:
            op = rng.choice("+-*")
            acc = acc + v if op == "+" else acc - v if op == "-" else acc * v
        if 1 <= acc <= 100:
            break
    prompt = (f"Use the numbers {nums} with + - * / and parentheses to make {acc}. Use each number at most once. "
              f"Write the expression on the last line, like 'Answer: (1 + 2) * 3'.")
    return Item(prompt, {"numbers": nums, "target": acc})


# -- JSON formatting -------------------------------------------------------------------------------------------------
_CITIES = ["Paris", "Lisbon", "Oslo", "Cairo", "Lima", "Tokyo", "Rome", "Dublin", "Quito", "Seoul"]
_JOBS = ["teacher", "baker", "pilot", "nurse", "painter", "farmer", "doctor", "writer", "chef", "engineer"]


def _json_item(rng: random.Random) -> Item:
    name, city, job, age = rng.choice(_NAMES), rng.choice(_CITIES), rng.choice(_JOBS), rng.randint(18, 80)
    text = rng.choice([f"{name} is a {age}-year-old {job} from {city}.",
                       f"{name}, aged {age}, works as a {job} in {city}.",
                       f"Meet {name}: {job}, {age} years old, living in {city}."])
    keys = rng.choice([("name", "age"), ("name", "city"), ("name", "age", "city"), ("name", "job"),
                       ("name", "age", "job"), ("city", "job")])
    types = {"name": "string", "age": "integer", "city": "string", "job": "string"}
    values = {"name": name, "age": age, "city": city, "job": job}
    schema = {"type": "object", "properties": {k: {"type": types[k]} for k in keys}, "required": list(keys),
              "additionalProperties": False}
    blank = {"string": "...", "integer": 0}
    template = "{" + ", ".join(f'"{k}": {json.dumps(blank[types[k]])}' for k in keys) + "}"
    prompt = f"Text: {text}\nFill in this JSON object from the text and reply with the JSON only: {template}"
    return Item(prompt, {"schema": schema, "expected": {k: values[k] for k in keys}})


GENERATORS: dict[str, tuple[Callable[[random.Random], Item], str]] = {
    "arithmetic": (_arithmetic_item, "numeric_match"),
    "countdown": (_countdown_item, "countdown"),
    "json_format": (_json_item, "json_fields:1,json_schema:0.5"),
}


def generate(name: str, n_train: int = 2000, n_test: int = 100, seed: int = 0) -> Task:
    """A built-in task: ``n_train`` items from ``seed`` and ``n_test`` held-out items none of whose prompts is in
    the train split (the same arguments give the same items on every machine)."""
    if name not in GENERATORS:
        raise TaskError(f"unknown task {name!r}: built-in tasks are {sorted(GENERATORS)}, or give a JSONL task file")
    make, reward = GENERATORS[name]
    rng = random.Random(f"{name}-{seed}-train")
    train = [make(rng) for _ in range(n_train)]
    seen = {it.key() for it in train}
    rng, test, tries = random.Random(f"{name}-{seed}-test"), [], 0
    while len(test) < n_test and tries < 100 * n_test:
        tries += 1
        it = make(rng)
        if it.key() not in seen:
            seen.add(it.key())
            test.append(it)
    return Task(name, train, test, reward)


def read_items(path: str | Path, required: dict[str, str] | None = None) -> list[Item]:
    """Items of a JSONL task file; ``required`` maps a field every line must have to who needs it (for the error)."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"{path}: no such task file")
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise TaskError(f"{where}: invalid JSON: {err.msg}") from None
            if not isinstance(rec, dict):
                raise TaskError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            prompt = rec.get("prompt")
            if prompt is None:
                raise TaskError(f"{where}: prompt: missing")
            if isinstance(prompt, list):
                if not prompt or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                         and m.get("role") in ("system", "user", "assistant") for m in prompt):
                    raise TaskError(f"{where}: prompt: expected a string or a list of {{role, content}} messages")
                if prompt[-1]["role"] != "user":
                    raise TaskError(f"{where}: prompt: the messages must end with a user turn")
            elif not isinstance(prompt, str) or not prompt.strip():
                raise TaskError(f"{where}: prompt: expected a non-empty string or a list of messages")
            for name, who in (required or {}).items():
                if name not in rec:
                    raise TaskError(f"{where}: {name}: missing (the reward {who} reads it)")
            items.append(Item(prompt, {k: v for k, v in rec.items() if k != "prompt"}))
    if not items:
        raise TaskError(f"{path}: no items")
    return items


def load(task: str, reward: str | None = None, test_file: str | None = None, n_train: int = 2000, n_test: int = 100,
         seed: int = 0, test_fraction: float = 0.1) -> Task:
    """A built-in task by name, or a JSONL task file (held out: ``test_file``, else a seeded ``test_fraction``).

    ``reward`` (a spec for ``rewards.parse_spec``) overrides the built-in task's default; a task file needs one."""
    from lmforge.rl.rewards import parse_spec, required_fields

    if task in GENERATORS:
        t = generate(task, n_train, n_test, seed)
        if reward:
            t.reward = reward
        return t
    if not Path(task).is_file():
        raise TaskError(f"{task}: neither a built-in task ({', '.join(sorted(GENERATORS))}) nor a JSONL task file")
    if not reward:
        raise TaskError(f"{task}: a task file needs a reward (--reward NAME[:WEIGHT],... or module:function); "
                        f"built-in tasks are {sorted(GENERATORS)}")
    needed = required_fields(parse_spec(reward))
    items = read_items(task, needed)
    if test_file:
        test = read_items(test_file, needed)
        train = items
    else:
        order = list(range(len(items)))
        random.Random(f"split-{seed}").shuffle(order)
        n = int(round(len(items) * test_fraction))
        held = set(order[:n])
        train = [it for i, it in enumerate(items) if i not in held]
        test = [it for i, it in enumerate(items) if i in held]
    if not train:
        raise TaskError(f"{task}: no training items left after holding out {len(test)}")
    return Task(Path(task).stem, train, test, reward)
