"""Agent traces: the records ``Agent`` writes (``trace.jsonl``), read back and printed as a tree::

    step 1  model 0.41 s, 728 prompt + 69 completion tokens
    ├─ calculator({"expression": "17 * 23"})  → 391  (0.001 s)
    step 2  model ...
    answer: ...
"""

from __future__ import annotations

import json
import os
from pathlib import Path

TRACE = "trace.jsonl"


def read_trace(path: str | os.PathLike) -> list[dict]:
    """The records of ``trace.jsonl`` (or of a run folder holding one); a bad line is an error naming file and line."""
    p = Path(path)
    if p.is_dir():
        p = p / TRACE
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no agent trace (run `lmforge agent ... --out DIR` to write one)")
    out = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as err:
            raise ValueError(f"{p}:{n}: not a JSON record ({err.msg})") from None
        if not isinstance(rec, dict) or "type" not in rec:
            raise ValueError(f"{p}:{n}: a trace record needs a 'type'")
        out.append(rec)
    return out


def _short(text: str | None, width: int) -> str:
    text = (text or "").replace("\n", " ")
    return text if len(text) <= width else text[:width - 1] + "…"


def format_trace(records: list[dict], width: int = 100) -> str:
    """A readable tree of an agent run: each model call with its tokens and time, its tool calls under it."""
    lines: list[str] = []
    turn = None
    for rec in records:
        kind = rec["type"]
        if rec.get("role") and kind in ("model", "tool") and (rec.get("round"), rec["role"]) != turn:
            turn = (rec.get("round"), rec["role"])  # a team run: a header per role's turn
            lines.append(f"round {rec.get('round')}  {rec['role']}")
        if kind == "message":
            text = json.dumps(rec.get("content"), ensure_ascii=False)
            lines.append(f"message from {rec.get('role')}: {_short(text, width)}")
        elif kind == "persona":
            lines.append(f"persona {rec.get('persona')} (user {rec.get('user')})")
        elif kind == "retrieval":
            lines.append(f"retrieved {len(rec.get('passages') or [])} passage(s), best score {rec.get('best_score')}")
        elif kind == "memory":
            lines.append(f"recalled {len(rec.get('recalled') or [])} earlier message(s)")
        elif kind == "model":
            if rec.get("error"):
                lines.append(f"step {rec['step']}  model failed: {_short(rec['error'], width)}")
            else:
                lines.append(f"step {rec['step']}  model {rec.get('seconds', 0):.3f} s, {rec.get('prompt_tokens', 0)} "
                             f"prompt + {rec.get('completion_tokens', 0)} completion tokens"
                             + (f", {rec['finish_reason']}" if rec.get("finish_reason") else "")
                             + (f" (prefill {rec['prefill_seconds']:.3f} s, {rec.get('cached_tokens', 0)} cached; "
                                f"decode {rec.get('decode_seconds', 0):.3f} s)" if rec.get("prefill_seconds") is not None
                                else ""))
                if rec.get("content") and rec.get("tool_calls"):
                    lines.append(f"│  text: {_short(rec['content'], width)}")
        elif kind == "tool":
            outcome = f"✗ {rec['error']}" if rec.get("error") else f"→ {rec.get('result')}"
            lines.append(f"├─ {rec.get('name')}({_short(rec.get('arguments'), width // 2)})  "
                         f"{_short(outcome, width)}  ({rec.get('seconds', 0):.3f} s)")
        elif kind == "answer":
            how = f" ({rec['guardrail']})" if rec.get("guardrail") else ""
            lines.append(f"answer{how}: {_short(rec.get('content'), width)}")
        elif kind == "stop":
            lines.append(f"stopped ({rec.get('reason')}): {_short(rec.get('message'), width)}")
    return "\n".join(lines)
