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
  only when a new question needs it;
* near miss: a math, text or science question asked while the offered tools are on the same topic but cannot answer
  it (an LCM with only ``gcd``, an MD5 with only ``sha256``/``crc32``, a circle's area with ``hypot`` and a
  ``circle_circumference`` that is offered but never implemented, ...) → a plain answer, no call: it says why none of
  the tools fits and answers directly (computed here with the standard library, or a written science fact);
* persona: a system prompt naming an assistant, its role and its style comes before the tools; a tool question →
  a call → its result → a text answer in that style (sometimes then a chat question answered without a call), so
  the model learns to stop calling and answer after a result under a persona too.

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


def _decoy(name: str, description: str, props: dict[str, dict]) -> dict:
    """A near-miss tool: offered, never called (so never implemented)."""
    return {"type": "function", "function": {"name": name, "description": description, "parameters": _schema(props)}}


DECOYS = {
    "circle_circumference": _decoy("circle_circumference", "Circumference 2*pi*r of a circle of a given radius.",
                                   {"radius": NUM}),
    "rectangle_diagonal": _decoy("rectangle_diagonal", "Length of the diagonal of a rectangle.",
                                 {"width": NUM, "height": NUM}),
    "celsius_to_kelvin": _decoy("celsius_to_kelvin", "Convert a temperature from degrees Celsius to kelvin.",
                                {"celsius": NUM}),
    "is_even": _decoy("is_even", "Whether an integer is even.", {"n": INT}),
    "string_length": _decoy("string_length", "Number of characters in a text.", {"text": STR}),
    "element_atomic_number": _decoy("element_atomic_number", "Atomic number of a chemical element given its symbol.",
                                    {"symbol": STR}),
    "planet_radius": _decoy("planet_radius", "Mean radius in kilometres of a planet of the solar system.",
                            {"planet": STR}),
    "speed_from_distance": _decoy("speed_from_distance", "Average speed from a distance and a travel time.",
                                  {"distance": NUM, "time": NUM}),
    "body_mass_index": _decoy("body_mass_index", "Body mass index from a weight in kg and a height in m.",
                              {"weight": NUM, "height": NUM}),
    "word_definition": _decoy("word_definition", "Dictionary definition of an English word.", {"word": STR}),
}


def _is_prime(n: int) -> bool:
    return n > 1 and all(n % d for d in range(2, math.isqrt(n) + 1))


def _g(x: float) -> str:
    return f"{x:.4f}".rstrip("0").rstrip(".")


class NearMiss:
    """A question none of ``near`` answers (tool names from TOOLS or DECOYS), and its computed plain answer."""

    def __init__(self, questions: list[str], near: list[str], why: str, make: Callable[[random.Random], dict],
                 answer: str) -> None:
        self.questions, self.near, self.why, self.make, self.answer = questions, near, why, make, answer


NEAR_MISSES = [
    NearMiss(["What is the least common multiple of {a} and {b}?", "Find lcm({a}, {b})."],
             ["gcd", "factorial", "is_even"],
             "gcd gives the greatest common divisor, not the least common multiple",
             lambda r: (lambda a, b: {"a": a, "b": b, "x": math.lcm(a, b)})(r.randrange(4, 60), r.randrange(4, 60)),
             "The least common multiple of {a} and {b} is {x}."),
    NearMiss(["What is the area of a circle with radius {r}?", "How big is the area of a circle of radius {r} cm?"],
             ["circle_circumference", "hypot", "log"], "they give a circumference or a length, not an area",
             lambda r: (lambda v: {"r": v, "x": _g(math.pi * v * v)})(r.randrange(1, 30)),
             "A circle of radius {r} has area pi * {r}^2 = {x}."),
    NearMiss(["What is the perimeter of a rectangle {w} wide and {h} high?"], ["rectangle_diagonal", "hypot", "mean"],
             "they give a diagonal or a length, not a perimeter",
             lambda r: (lambda w, h: {"w": w, "h": h, "x": 2 * (w + h)})(r.randrange(2, 50), r.randrange(2, 50)),
             "The perimeter is 2 * ({w} + {h}) = {x}."),
    NearMiss(["Convert {c} degrees Celsius to Fahrenheit.", "What is {c} °C in Fahrenheit?"],
             ["celsius_to_kelvin", "log", "rgb_to_hsv"], "they convert to kelvin or do something else",
             lambda r: (lambda c: {"c": c, "x": _g(c * 9 / 5 + 32)})(r.randrange(-30, 110)),
             "{c} °C is {x} °F (multiply by 9/5 and add 32)."),
    NearMiss(["Is {n} a prime number?", "Is {n} prime?"], ["gcd", "factorial", "is_even"],
             "none of them tests primality",
             lambda r: (lambda n: {"n": n, "x": "is" if _is_prime(n) else "is not"})(r.randrange(2, 400)),
             "{n} {x} a prime number."),
    NearMiss(["What is {a} to the power of {b}?", "Compute {a}^{b}."], ["log", "factorial", "hypot"],
             "none of them raises a number to a power",
             lambda r: (lambda a, b: {"a": a, "b": b, "x": a ** b})(r.randrange(2, 13), r.randrange(2, 7)),
             "{a}^{b} = {x}."),
    NearMiss(["What is the square root of {n}?"], ["log", "hypot", "factorial"], "none of them takes a square root",
             lambda r: (lambda n: {"n": n, "x": _g(math.sqrt(n))})(r.randrange(2, 1000)),
             "The square root of {n} is {x}."),
    NearMiss(["What is the mode of {v}?", "Which value occurs most often in {v}?"], ["mean", "median"],
             "they give the mean and the median, not the mode",
             lambda r: (lambda v: {"v": v, "x": statistics.mode(v)})(
                 (lambda m: [m, m] + [r.randrange(0, 50) for _ in range(3)])(r.randrange(50, 99))),
             "The mode of {v} is {x}."),
    NearMiss(["What is the range (largest minus smallest) of {v}?"], ["mean", "median"],
             "they give averages, not the range",
             lambda r: (lambda v: {"v": v, "x": max(v) - min(v)})([r.randrange(0, 100) for _ in range(5)]),
             "The range of {v} is {x}."),
    NearMiss(["What is the MD5 hash of '{t}'?"], ["sha256", "crc32"], "they compute SHA-256 and CRC-32, not MD5",
             lambda r: (lambda t: {"t": t, "x": hashlib.md5(t.encode()).hexdigest()})(r.choice(WORDS)),
             "MD5('{t}') = {x}."),
    NearMiss(["Write '{t}' in capital letters.", "What is '{t}' in upper case?"], ["count_substring", "string_length"],
             "they count characters, they do not change case",
             lambda r: (lambda t: {"t": t, "x": t.upper()})(r.choice(WORDS)), "'{t}' in capitals is {x}."),
    NearMiss(["Spell '{t}' backwards."], ["count_substring", "sha256", "string_length"],
             "none of them reverses a text", lambda r: (lambda t: {"t": t, "x": t[::-1]})(r.choice(WORDS)),
             "'{t}' backwards is '{x}'."),
    NearMiss(["What is the Unicode code point of {c}?"], ["unicode_name", "crc32"],
             "unicode_name gives the character's name, not its code point",
             lambda r: (lambda c: {"c": c, "x": f"U+{ord(c):04X}"})(r.choice(CHARS)), "{c} is {x}."),
    NearMiss(["Convert the HSV color ({h}, {s}, {v}) to RGB."], ["rgb_to_hsv"], "rgb_to_hsv converts the other way",
             lambda r: (lambda h, s, v: {"h": h, "s": s, "v": v,
                                         "x": [round(c, 3) for c in colorsys.hsv_to_rgb(h, s, v)]})(
                 round(r.random(), 2), round(r.random(), 2), round(r.random(), 2)), "In RGB it is {x}."),
    NearMiss(["What day of the year is {d}?"], ["weekday", "is_leap_year"],
             "they give a weekday or a leap year, not the day of the year",
             lambda r: (lambda d: {"d": d, "x": datetime.date.fromisoformat(d).timetuple().tm_yday})(_date(r)),
             "{d} is day {x} of its year."),
]
SCIENCE = [  # questions near a decoy's topic; answers are common textbook facts
    ("What is the chemical symbol for gold?", "element_atomic_number", "The chemical symbol for gold is Au."),
    ("Which element has the chemical symbol Fe?", "element_atomic_number", "Fe is iron."),
    ("What is the chemical formula of water?", "element_atomic_number",
     "Water is H2O: two hydrogen atoms and one oxygen atom."),
    ("Which planet is closest to the Sun?", "planet_radius", "Mercury is the planet closest to the Sun."),
    ("Which planet is known as the Red Planet?", "planet_radius", "Mars is known as the Red Planet."),
    ("How many planets are in the solar system?", "planet_radius", "There are eight planets in the solar system."),
    ("What is the boiling point of water at sea level in Celsius?", "celsius_to_kelvin",
     "Water boils at 100 °C at sea level."),
    ("At what temperature in Celsius does water freeze?", "celsius_to_kelvin", "Water freezes at 0 °C."),
    ("What gas do plants take in for photosynthesis?", "element_atomic_number", "Plants take in carbon dioxide (CO2)."),
    ("What is the speed of light in a vacuum?", "speed_from_distance",
     "About 299,792 kilometres per second (exactly 299,792,458 m/s)."),
    ("What organ pumps blood through the human body?", "body_mass_index", "The heart pumps blood through the body."),
    ("How many bones does an adult human have?", "body_mass_index", "An adult human has 206 bones."),
    ("What does the word 'photosynthesis' refer to in biology?", "planet_radius",
     "Photosynthesis is how plants use light to turn carbon dioxide and water into sugar and oxygen."),
    ("What is the opposite of 'ancient'?", "string_length", "The opposite of 'ancient' is 'modern'."),
    ("Who wrote 'Romeo and Juliet'?", "word_definition", "William Shakespeare wrote 'Romeo and Juliet'."),
    ("What is the largest ocean on Earth?", "planet_radius", "The Pacific Ocean is the largest ocean on Earth."),
]
NEAR_ANSWER = ["None of the offered tools fits ({why}), so I'll answer directly. {answer}",
               "I won't call a tool here: {why}. {answer}", "{answer}"]
PERSONAS = [("Nova", "the help desk of a city library"), ("Max", "a maths tutoring service"),
            ("Iris", "an online calendar app"), ("Otto", "a data-analysis team"),
            ("Lena", "a small software shop"), ("Kai", "a school's science club")]
STYLES = [("Keep your answers short and friendly.", "Sure! {a}"), ("Be precise and formal.", "{a}"),
          ("Answer cheerfully, in one or two sentences.", "Happy to help: {a}"),
          ("Be brief.", "{a}")]


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
KINDS = ["single", "parallel", "none", "unavailable", "followup", "near_miss", "persona"]
WEIGHTS = [4, 2, 1, 2, 2, 3, 3]


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


def near_miss(rng: random.Random) -> tuple[list[dict], list[dict]]:
    """Offered near-miss tools (plus 0-2 unrelated ones) and a question none of them answers, answered in text."""
    if rng.random() < 0.3:
        question, decoy, answer = rng.choice(SCIENCE)
        near, why = [DECOYS[decoy]], f"{decoy} does not answer that"
    else:
        nm = rng.choice(NEAR_MISSES)
        args = nm.make(rng)
        question, answer = rng.choice(nm.questions).format(**args), nm.answer.format(**args)
        near = [BY_NAME[n].spec() if n in BY_NAME else DECOYS[n] for n in nm.near]
        why = nm.why
    names = {t["function"]["name"] for t in near}
    extra = [t.spec() for t in TOOLS if t.name not in names]
    specs = near + rng.sample(extra, rng.randrange(0, 3))
    rng.shuffle(specs)
    text = rng.choice(NEAR_ANSWER).format(why=why, answer=answer)
    return specs, [{"role": "user", "content": question}, {"role": "assistant", "content": text}]


def persona(rng: random.Random, chat: list[list[dict]], cid: str) -> tuple[list[Tool], list[dict]]:
    """A persona system prompt, a tool question, the call, its result and an answer in the persona's style."""
    (name, role), (style, shape) = rng.choice(PERSONAS), rng.choice(STYLES)
    system = {"role": "system", "content": f"You are {name}, the assistant of {role}. {style} "
                                           f"Use a tool when one answers the question, then answer the user."}
    tool = rng.choice(TOOLS)
    turns = calling_turns(rng, [tool], cid)
    turns[-1] = {"role": "assistant", "content": shape.format(a=turns[-1]["content"])}
    messages = [system, *turns]
    if rng.random() < 0.4:
        messages += chat[rng.randrange(len(chat))][-2:]
    return [tool], messages


def build(n: int = 480, seed: int = 0) -> list[dict]:
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
        elif kind == "near_miss":
            specs, messages = near_miss(rng)
            records.append({"tools": specs, "kind": kind, "messages": messages})
        elif kind == "persona":
            must, messages = persona(rng, chat, f"call_{i}")
            records.append({"tools": offered(rng, must), "kind": kind, "messages": messages})
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
