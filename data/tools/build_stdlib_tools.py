"""Build ``stdlib_tools.jsonl``: function-calling conversations over real tools — Python standard-library functions —
whose results are computed by calling those functions.

Each record is OpenAI's function-calling layout (``tools`` + ``messages`` with assistant ``tool_calls`` and ``tool``
results) as ``lmforge sft`` reads it.  Three kinds, mixed:

* single: a question one tool answers → one call → its real result → an answer that states it;
* parallel: two questions in one turn → two calls in one assistant turn → two results → one answer;
* no tool: a question none of the offered tools answers (a real question/answer pair from the bundled
  chatterbot corpus) → a plain answer;
* unavailable: a question one of these tools would answer, but that tool is not among the offered ones (e.g. a
  median asked with only ``mean`` offered) → a plain answer saying the offered tools do not cover it, no call;
* follow-up: a single call and its answer, then a second user turn — another tool question (→ a call, its result,
  an answer) or a chat question (→ a plain answer), so the model learns to stop after a result and to call again
  only when a new question needs it.

Every conversation offers 3–5 tools, the right one among them, so the model learns to choose.  The tools wrap real
standard-library functions (named in each description); descriptions, questions and answer sentences are written for
lmforge.  Deterministic: ``python data/tools/build_stdlib_tools.py`` rebuilds the
same file.  None of these tools or questions come from BFCL, the evaluation set.
"""

from __future__ import annotations

import calendar
import colorsys
import datetime
import hashlib
import json
import math
import random
import statistics
import unicodedata
import zlib
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
OUT = HERE / "stdlib_tools.jsonl"
CHAT = HERE.parent / "chat" / "chatterbot_en.jsonl"


def _schema(props: dict[str, dict], required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": props, "required": required if required is not None else list(props)}


INT, NUM, STR = {"type": "integer"}, {"type": "number"}, {"type": "string"}
DATE = {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$", "description": "A date, YYYY-MM-DD."}


class Tool:
    def __init__(self, name: str, fn: Callable, description: str, params: dict, run: Callable[..., Any],
                 questions: list[str], answer: str, make_args: Callable[[random.Random], dict]) -> None:
        self.name, self.fn, self.params, self.run = name, fn, params, run
        self.description = description
        self.questions, self.answer, self.make_args = questions, answer, make_args

    def spec(self) -> dict:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.params}}


def _date(rng: random.Random) -> str:
    return (datetime.date(1990, 1, 1) + datetime.timedelta(days=rng.randrange(0, 15000))).isoformat()


WORDS = ["banana", "mississippi", "bookkeeper", "parallel", "committee", "assessment", "balloon", "coffee"]
CHARS = ["é", "ß", "€", "Ω", "ñ", "ø", "½", "©", "→", "中"]
TOOLS = [
    Tool("gcd", math.gcd, "Greatest common divisor of two integers (math.gcd).", _schema({"a": INT, "b": INT}), lambda a, b: math.gcd(a, b),
         ["What is the greatest common divisor of {a} and {b}?", "Find gcd({a}, {b}).",
          "Which is the largest number dividing both {a} and {b}?"],
         "The greatest common divisor of {a} and {b} is {r}.",
         lambda r: {"a": r.randrange(12, 2000), "b": r.randrange(12, 2000)}),
    Tool("factorial", math.factorial, "n! for an integer n from 0 to 20 (math.factorial).", _schema({"n": {"type": "integer", "minimum": 0, "maximum": 20}}),
         lambda n: math.factorial(n), ["What is {n} factorial?", "Compute {n}!.", "How much is the factorial of {n}?"],
         "{n}! = {r}.", lambda r: {"n": r.randrange(0, 21)}),
    Tool("hypot", math.hypot, "Euclidean length sqrt(x*x + y*y) (math.hypot).", _schema({"x": NUM, "y": NUM}), lambda x, y: round(math.hypot(x, y), 4),
         ["How long is the hypotenuse of a right triangle with legs {x} and {y}?",
          "What is the distance from the origin to the point ({x}, {y})?"],
         "It is {r}.", lambda r: {"x": r.randrange(1, 100), "y": r.randrange(1, 100)}),
    Tool("mean", statistics.mean, "Arithmetic mean of a list of numbers (statistics.mean).",
         _schema({"values": {"type": "array", "items": NUM, "minItems": 1}}),
         lambda values: round(statistics.mean(values), 4),
         ["What is the average of {values}?", "Compute the mean of these numbers: {values}."],
         "The mean is {r}.", lambda r: {"values": [r.randrange(0, 100) for _ in range(r.randrange(2, 7))]}),
    Tool("median", statistics.median, "Median (middle value) of a list of numbers (statistics.median).",
         _schema({"values": {"type": "array", "items": NUM, "minItems": 1}}),
         lambda values: statistics.median(values),
         ["What is the median of {values}?", "Find the middle value of {values}."],
         "The median is {r}.", lambda r: {"values": [r.randrange(0, 100) for _ in range(r.randrange(3, 8))]}),
    Tool("is_leap_year", calendar.isleap, "Whether a year is a leap year in the Gregorian calendar (calendar.isleap).", _schema({"year": INT}), lambda year: calendar.isleap(year),
         ["Is {year} a leap year?", "Was {year} a leap year?", "Does February {year} have 29 days?"],
         "{year} is {yesno} a leap year.", lambda r: {"year": r.randrange(1800, 2400)}),
    Tool("days_in_month", calendar.monthrange, "Number of days in a month of a year (calendar.monthrange).",
         _schema({"year": INT, "month": {"type": "integer", "minimum": 1, "maximum": 12}}),
         lambda year, month: calendar.monthrange(year, month)[1],
         ["How many days are in month {month} of {year}?", "How many days does {month_name} {year} have?"],
         "{month_name} {year} has {r} days.", lambda r: {"year": r.randrange(1900, 2100), "month": r.randrange(1, 13)}),
    Tool("weekday", datetime.date.fromisoformat, "Day of the week of a date (datetime.date).", _schema({"date": DATE}),
         lambda date: datetime.date.fromisoformat(date).strftime("%A"),
         ["What day of the week was {date}?", "Which weekday is {date}?"],
         "{date} is a {r}.", lambda r: {"date": _date(r)}),
    Tool("days_between", datetime.date.fromisoformat, "Days from a start date to an end date (datetime.date subtraction).",
         _schema({"start": DATE, "end": DATE}),
         lambda start, end: (datetime.date.fromisoformat(end) - datetime.date.fromisoformat(start)).days,
         ["How many days are there from {start} to {end}?", "Count the days between {start} and {end}."],
         "There are {r} days from {start} to {end}.", lambda r: {"start": _date(r), "end": _date(r)}),
    Tool("count_substring", str.count, "Non-overlapping occurrences of a substring in a text (str.count).", _schema({"text": STR, "sub": STR}),
         lambda text, sub: text.count(sub),
         ["How many times does '{sub}' occur in '{text}'?", "Count '{sub}' in the word '{text}'."],
         "'{sub}' occurs {r} times in '{text}'.",
         lambda r: (lambda w: {"text": w, "sub": r.choice(sorted(set(w)))})(r.choice(WORDS))),
    Tool("unicode_name", unicodedata.name, "The Unicode name of a character (unicodedata.name).", _schema({"char": {"type": "string", "minLength": 1,
                                                                              "maxLength": 1}}),
         lambda char: unicodedata.name(char), ["What is the Unicode name of the character {char}?",
                                               "What is {char} called in Unicode?"],
         "{char} is {r}.", lambda r: {"char": r.choice(CHARS)}),
    Tool("crc32", zlib.crc32, "CRC-32 checksum of a text's UTF-8 bytes (zlib.crc32).", _schema({"text": STR}), lambda text: zlib.crc32(text.encode()),
         ["What is the CRC-32 checksum of '{text}'?"], "The CRC-32 of '{text}' is {r}.",
         lambda r: {"text": r.choice(WORDS)}),
    Tool("sha256", hashlib.sha256, "SHA-256 hex digest of a text's UTF-8 bytes (hashlib.sha256).", _schema({"text": STR}),
         lambda text: hashlib.sha256(text.encode()).hexdigest(),
         ["What is the SHA-256 hash of '{text}'?", "Hash '{text}' with SHA-256."],
         "SHA-256('{text}') = {r}.", lambda r: {"text": r.choice(WORDS)}),
    Tool("rgb_to_hsv", colorsys.rgb_to_hsv, "Convert an RGB color (components 0-1) to HSV (colorsys).",
         _schema({c: {"type": "number", "minimum": 0, "maximum": 1} for c in "rgb"}),
         lambda r, g, b: [round(v, 3) for v in colorsys.rgb_to_hsv(r, g, b)],
         ["Convert the RGB color ({r_}, {g_}, {b_}) to HSV."], "In HSV it is {r}.",
         lambda r: {c: round(r.random(), 2) for c in "rgb"}),
    Tool("log", math.log, "Logarithm of x in a given base (math.log).", _schema({"x": {"type": "number", "exclusiveMinimum": 0},
                                             "base": {"type": "number", "exclusiveMinimum": 1}}),
         lambda x, base: round(math.log(x, base), 4), ["What is the logarithm of {x} in base {base}?",
                                                       "Compute log base {base} of {x}."],
         "log_{base}({x}) = {r}.", lambda r: {"x": r.randrange(2, 5000), "base": r.choice([2, 3, 10])}),
]
BY_NAME = {t.name: t for t in TOOLS}


def fill(template: str, args: dict, result: Any = None) -> str:
    extra = {"r": result, "yesno": "" if result else "not", "r_": args.get("r"), "g_": args.get("g"),
             "b_": args.get("b")}
    if "month" in args:
        extra["month_name"] = calendar.month_name[args["month"]]
    text = template.format(**{**args, **extra})
    return " ".join(text.split())  # "is  a leap year" when yesno is empty


def call(tool: Tool, args: dict, cid: str) -> tuple[dict, dict, str]:
    result = tool.run(**args)
    return ({"id": cid, "type": "function", "function": {"name": tool.name, "arguments": json.dumps(args)}},
            {"role": "tool", "tool_call_id": cid, "content": json.dumps({"result": result})}, fill(tool.answer, args,
                                                                                                  result))


def offered(rng: random.Random, must: list[Tool]) -> list[dict]:
    others = [t for t in TOOLS if t not in must]
    pick = must + rng.sample(others, rng.randrange(3, 6) - len(must))
    rng.shuffle(pick)
    return [t.spec() for t in pick]


UNAVAILABLE = ["None of the available tools can answer that: they are {names}.",
               "I can't do that with the tools I have ({names}), so I won't call any of them.",
               "That needs a tool I don't have here; the offered ones ({names}) do something else."]
KINDS, WEIGHTS = ["single", "parallel", "none", "unavailable", "followup"], [4, 2, 2, 2, 2]


def _names(tools: list[dict]) -> str:
    names = [t["function"]["name"] for t in tools]
    return ", ".join(names[:-1]) + " and " + names[-1]


def calling_turns(rng: random.Random, tools: list[Tool], cid: str) -> list[dict]:
    """A user question for ``tools`` (one, or two asked together), the call(s), their real results, the answer."""
    calls, results, answers, questions = [], [], [], []
    for j, t in enumerate(tools):
        args = t.make_args(rng)
        c, res, ans = call(t, args, f"{cid}_{j}")
        calls.append(c)
        results.append(res)
        answers.append(ans)
        questions.append(fill(rng.choice(t.questions), args))
    question = questions[0] if len(questions) == 1 else f"{questions[0]} Also, {questions[1][0].lower()}" \
                                                         f"{questions[1][1:]}"
    return [{"role": "user", "content": question}, {"role": "assistant", "content": None, "tool_calls": calls},
            *results, {"role": "assistant", "content": " ".join(answers)}]


def build(n: int = 400, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    chat = [json.loads(line)["messages"] for line in CHAT.read_text().splitlines()]
    records = []
    for i in range(n):
        kind = rng.choices(KINDS, weights=WEIGHTS)[0]
        if kind == "none":
            user, assistant = chat[rng.randrange(len(chat))][-2:]
            records.append({"tools": offered(rng, []), "messages": [user, assistant], "kind": kind})
        elif kind == "unavailable":
            asked = rng.choice(TOOLS)
            others = [t for t in TOOLS if t is not asked]
            specs = [t.spec() for t in rng.sample(others, rng.randrange(3, 6))]
            question = fill(rng.choice(asked.questions), asked.make_args(rng))
            records.append({"tools": specs, "kind": kind, "messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": rng.choice(UNAVAILABLE).format(names=_names(specs))}]})
        elif kind == "followup":
            first, second = rng.sample(TOOLS, 2)
            messages = calling_turns(rng, [first], f"call_{i}_a")
            if rng.random() < 0.5:
                messages += calling_turns(rng, [second], f"call_{i}_b")
                must = [first, second]
            else:
                messages += chat[rng.randrange(len(chat))][-2:]
                must = [first]
            records.append({"tools": offered(rng, must), "kind": kind, "messages": messages})
        else:
            tools = rng.sample(TOOLS, 1 if kind == "single" else 2)
            messages = calling_turns(rng, tools, f"call_{i}")
            records.append({"tools": offered(rng, tools), "kind": kind, "messages": messages})
    return records


def main() -> None:
    records = build()
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    kinds = {k: sum(r["kind"] == k for r in records) for k in KINDS}
    print(f"wrote {OUT} ({len(records)} conversations: {kinds})")


if __name__ == "__main__":
    main()
