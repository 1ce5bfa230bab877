"""``lmforge feedback export``: recorded answers + human feedback → the JSONL ``lmforge sft`` / ``lmforge dpo`` read.

What counts, per choice of a recorded chat answer: each annotator's newest feedback (an anonymous one counts as one
annotator); the answer is *good* when it has more thumbs up than down, *bad* when more down than up.

- ``--format sft``: ``{"messages": prompt + [answer]}`` for every choice with a correction (the newest correction is
  the answer) or a good answer.
- ``--format dpo``: ``{"prompt": messages, "chosen", "rejected"}`` for every correction (chosen) against the answer it
  corrects (rejected), and for good against bad answers to the same messages (several choices of one request, or the
  same conversation asked twice), at most ``max_pairs_per_prompt`` of them per conversation.

Every record carries ``meta`` (response ids, serve run, the model's lineage id, annotators, feedback ids).  The stage
is a recorded run whose inputs are the serve runs that gave the answers (by run id) and the recordings file (by a
hash of the rows exported), so ``lmforge lineage`` of a model trained on the export leads to the serve runs, the
served model and its data.  Answers that cannot become training data are counted per reason (``skipped``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from lmforge.artifacts import InputRef, Manifest, write_text
from lmforge.config import StageConfig
from lmforge.progress import console
from lmforge.stages import begin, finished

STAGE = "feedback_export"
VERSION = "1"


class Config(StageConfig):
    """Export feedback on answers recorded by `lmforge serve --record` as SFT or DPO JSONL."""

    format: Literal["sft", "dpo"] = Field("dpo", description="sft: chat records of good and corrected answers; dpo: "
                                                             "chosen/rejected pairs.")
    db: str | None = Field(None, description="Recordings file [default: $LMFORGE_HOME/feedback.sqlite].")
    serve_runs: list[str] = Field(default_factory=list, description="Only answers of these serve run ids.")
    annotators: list[str] = Field(default_factory=list, description="Only feedback from these annotators.")
    max_pairs_per_prompt: int = Field(16, ge=1, description="dpo: at most this many up-vs-down pairs per conversation "
                                                            "(an often-asked question would otherwise dominate).")


def _choice_verdicts(response: dict[str, Any], annotators: set[str]) -> dict[int, dict[str, Any]]:
    """Per choice: ``{score, correction, annotators, feedback_ids}`` from each annotator's newest feedback."""
    newest: dict[tuple[int, str], dict[str, Any]] = {}
    for f in response["feedback"]:  # oldest first: later rows replace earlier ones
        who = f["annotator"] or ""
        if annotators and who not in annotators:
            continue
        newest[(f["choice"], who)] = f
    out: dict[int, dict[str, Any]] = {}
    for (choice, who), f in sorted(newest.items(), key=lambda kv: kv[1]["id"]):
        v = out.setdefault(choice, {"score": 0, "correction": None, "annotators": [], "feedback_ids": []})
        v["score"] += 1 if f["rating"] == "up" else -1 if f["rating"] == "down" else 0
        if f["correction"]:
            v["correction"] = f["correction"]  # the newest correction wins
        v["annotators"].append(who or None)
        v["feedback_ids"].append(f["id"])
    return out


def _prompt(response: dict[str, Any]) -> tuple[list[dict[str, str]] | None, str | None]:
    """The plain chat messages of a recorded request, or ``(None, reason)``."""
    from lmforge.align.chat_data import ChatDataError, validate_messages

    if response["endpoint"] != "chat":
        return None, "completion_endpoint"
    request = response["request"]
    if request.get("tools"):
        return None, "tool_request"
    try:
        messages = [{"role": m.get("role"), "content": m.get("content")} for m in request["messages"]]
        messages = validate_messages(messages, response["id"], "messages", require_assistant_last=False)
    except (ChatDataError, KeyError, TypeError, AttributeError):
        return None, "prompt_not_plain_chat"
    if messages[-1]["role"] != "user":
        return None, "prompt_not_plain_chat"
    return messages, None


def build(responses: list[dict[str, Any]], fmt: str, annotators: set[str] | None = None,
          max_pairs_per_prompt: int = 16) -> tuple[list[dict[str, Any]], Counter, set[str]]:
    """``(records, skipped per reason, serve runs used)`` for ``fmt`` ("sft" or "dpo")."""
    records: list[dict[str, Any]] = []
    skipped: Counter = Counter()
    used: set[str] = set()
    groups: dict[str, dict[str, Any]] = {}  # prompt → good and bad answers (dpo)
    for r in sorted(responses, key=lambda r: r["created"]):
        verdicts = _choice_verdicts(r, annotators or set())
        if not verdicts:
            continue
        messages, why = _prompt(r)
        if messages is None:
            skipped[why] += len(verdicts)
            continue
        for choice, v in sorted(verdicts.items()):
            answer = r["choices"][choice] if choice < len(r["choices"]) else None
            if answer is None:
                skipped["unknown_choice"] += 1
                continue
            meta = {"source": "feedback", "response_id": r["id"], "choice": choice, "serve_run": r["serve_run"],
                    "model": r["model_lineage"], "annotators": v["annotators"], "feedback_ids": v["feedback_ids"]}
            text = answer.get("text") or ""
            usable = bool(text.strip()) and not answer.get("tool_calls")
            if fmt == "sft":
                target = v["correction"] or (text if v["score"] > 0 and usable else None)
                if target is None:
                    skipped["not_good" if usable else "empty_or_tool_answer"] += 1
                    continue
                records.append({"messages": messages + [{"role": "assistant", "content": target}],
                                "meta": {**meta, "corrected": bool(v["correction"])}})
                used.add(r["serve_run"])
                continue
            if v["correction"] and usable and v["correction"].strip() != text.strip():
                records.append({"prompt": messages, "chosen": v["correction"], "rejected": text,
                                "meta": {**meta, "pair": "correction"}})
                used.add(r["serve_run"])
            if not usable:
                skipped["empty_or_tool_answer"] += 1
                continue
            if v["score"] != 0:
                key = json.dumps(messages, sort_keys=True, ensure_ascii=False)
                g = groups.setdefault(key, {"messages": messages, "good": [], "bad": []})
                g["good" if v["score"] > 0 else "bad"].append((text, meta))
            elif not v["correction"]:
                skipped["tied_votes"] += 1
    for g in groups.values():
        # diagonal order (i + j): the first pairs spread over every good and every bad answer, then the cap cuts
        order = sorted(((i, j) for i in range(len(g["good"])) for j in range(len(g["bad"]))),
                       key=lambda ij: (ij[0] + ij[1], ij[0]))
        kept = 0
        for i, j in order:
            (good, gm), (bad, bm) = g["good"][i], g["bad"][j]
            if good.strip() == bad.strip():
                skipped["same_text_up_and_down"] += 1
                continue
            if kept == max_pairs_per_prompt:
                skipped["over_max_pairs_per_prompt"] += 1
                continue
            kept += 1
            records.append({"prompt": g["messages"], "chosen": good, "rejected": bad,
                            "meta": {"source": "feedback", "pair": "up_vs_down", "chosen": gm, "rejected": bm}})
            used.update((gm["serve_run"], bm["serve_run"]))
    return records, skipped, used


def run(config: Config, out_dir: str | os.PathLike, force: bool = False) -> Manifest:
    from contextlib import closing

    from lmforge.feedback.store import default_path, load, read_only

    db = Path(config.db) if config.db else default_path()
    with closing(read_only(db)) as con:
        responses = load(con, config.serve_runs or None)
        serve_paths = {row["run_id"]: row["path"] for row in con.execute("SELECT run_id, path FROM serve_runs")}
    records, skipped, used = build(responses, config.format, set(config.annotators), config.max_pairs_per_prompt)
    if not records:
        n_feedback = sum(len(r["feedback"]) for r in responses)
        need = ("a thumbs-up or a correction" if config.format == "sft" else
                "a correction, or a thumbs-up and a thumbs-down answer to the same messages")
        why = ", ".join(f"{reason} {n}" for reason, n in sorted(skipped.items()))
        raise ValueError(f"nothing to export from {db}: {len(responses)} recorded answers, {n_feedback} feedback "
                         f"rows{' (not usable: ' + why + ')' if why else ''}; {config.format} needs {need}")
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    inputs: dict[str, Any] = {"recordings": InputRef(path=str(db.resolve()),
                                                     fingerprint="sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16])}
    for i, run_id in enumerate(sorted(used)):  # by run id: a recording server's run may still be running
        inputs["serve" if len(used) == 1 else f"serve_{i + 1}"] = InputRef(path=serve_paths.get(run_id, run_id),
                                                                           fingerprint=f"run:{run_id}")
    out = Path(out_dir)
    run_ = begin(STAGE, VERSION, out, config.model_dump(), inputs=inputs, force=force)
    if run_ is None:
        return finished(out)
    with run_:
        path = out / f"{config.format}.jsonl"
        write_text(path, text)
        run_.metrics.update(records=len(records), responses=len(responses), serve_runs=len(used),
                            skipped=dict(skipped))
        console.print(f"  {len(records)} {config.format} records → {path}"
                      + (f"  [dim](skipped: {dict(skipped)})[/]" if skipped else ""))
    return finished(out)
