"""Does a tool-tuned model stop? Greedy answers (tool_choice auto, unconstrained, as `lmforge serve` gives them) to
three kinds of turns, none from the training set or BFCL: (1) right after a tool result, where a text answer is
right; (2) a question none of the offered tools answers, where a text answer is right; (3) a question an offered
tool answers, where a call is right. Prints each answer and a count per kind.

    python bench/tools_stop_probe.py MODEL_DIR [--quantize int8] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import json

from lmforge.eval.bfcl import Config, engine_answerer, load_engine


def fn(name: str, description: str, props: dict) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": props, "required": list(props)}}}


WEATHER = fn("get_weather", "Current weather in a city.", {"city": {"type": "string"}})
STOCK = fn("get_stock_price", "Latest price of a stock ticker.", {"ticker": {"type": "string"}})
GCD = fn("gcd", "Greatest common divisor of two integers (math.gcd).", {"a": {"type": "integer"}, "b": {"type": "integer"}})
MEAN = fn("mean", "Arithmetic mean of a list of numbers (statistics.mean).",
          {"values": {"type": "array", "items": {"type": "number"}}})
TRI = fn("calculate_triangle_area", "Area of a triangle from its base and height.",
         {"base": {"type": "number"}, "height": {"type": "number"}})
BOOK = fn("book_flight", "Book a flight between two airports on a date.",
          {"origin": {"type": "string"}, "destination": {"type": "string"}, "date": {"type": "string"}})


def after_result(tools: list[dict], question: str, name: str, args: dict, result: object) -> tuple[list, list]:
    call = {"id": "c1", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}
    return tools, [{"role": "user", "content": question}, {"role": "assistant", "content": None, "tool_calls": [call]},
                   {"role": "tool", "tool_call_id": "c1", "content": json.dumps({"result": result})}]


def ask(tools: list[dict], question: str) -> tuple[list, list]:
    return tools, [{"role": "user", "content": question}]


PROBES = {
    "after_result (text is right)": [
        after_result([WEATHER, STOCK], "What's the weather in Lisbon?", "get_weather", {"city": "Lisbon"},
                     "21 C, clear sky"),
        after_result([STOCK, BOOK], "How much is AAPL trading at?", "get_stock_price", {"ticker": "AAPL"}, 187.4),
        after_result([GCD, MEAN], "What is the greatest common divisor of 462 and 1071?", "gcd",
                     {"a": 462, "b": 1071}, 21),
        after_result([TRI, WEATHER], "What is the area of a triangle with base 6 and height 4?",
                     "calculate_triangle_area", {"base": 6, "height": 4}, 12.0),
        after_result([MEAN, STOCK], "What is the average of 3, 9 and 12?", "mean", {"values": [3, 9, 12]}, 8),
        after_result([BOOK, WEATHER], "Book me a flight from SFO to JFK on 2027-03-02.", "book_flight",
                     {"origin": "SFO", "destination": "JFK", "date": "2027-03-02"}, "confirmed, booking ref QX7P2"),
    ],
    "irrelevant (text is right)": [
        ask([WEATHER, STOCK], "Who wrote Pride and Prejudice?"),
        ask([GCD, TRI], "What is the capital of Japan?"),
        ask([BOOK, WEATHER], "Tell me a joke about cats."),
        ask([MEAN, GCD], "What is the derivative of x squared?"),
        ask([TRI, STOCK], "How do I reverse a list in Python?"),
        ask([WEATHER, GCD], "Translate 'good morning' into French."),
        ask([STOCK, MEAN], "Book a table for two at an Italian restaurant tonight."),
        ask([GCD, BOOK], "What is the area of a circle with radius 3?"),
    ],
    "relevant (a call is right)": [
        ask([WEATHER, STOCK], "What's the weather like in Oslo right now?"),
        ask([GCD, TRI], "What is the area of a triangle with base 10 and height 7?"),
        ask([STOCK, BOOK], "What's the current price of MSFT?"),
        ask([MEAN, GCD], "Find the greatest common divisor of 84 and 36."),
    ],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--quantize", default=None)
    ap.add_argument("--max-tokens", type=int, default=64)
    a = ap.parse_args()
    cfg = Config(model=a.model, quantize=a.quantize, constrained=False, max_tokens=a.max_tokens, concurrency=1)
    engine = load_engine(cfg)
    answer, close = engine_answerer(cfg, engine)
    try:
        for kind, probes in PROBES.items():
            called = 0
            for tools, messages in probes:
                out = answer(messages, tools, True)
                called += bool(out["calls"]) or "<tool_call>" in out["text"]
                print(f"[{kind}] {messages[0]['content']!r} -> {out['text']!r} ({out['finish_reason']})", flush=True)
            print(f"== {kind}: {called}/{len(probes)} answers open a call", flush=True)
    finally:
        close()


if __name__ == "__main__":
    main()
