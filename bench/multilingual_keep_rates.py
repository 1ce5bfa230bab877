"""Per-language keep rates of the data stage's default rules on data/multilingual (real translated text).

    PYTHONPATH=. python bench/multilingual_keep_rates.py OUT_DIR [--config key=value ...]

Runs ``lmforge data`` with default settings (plus the given overrides) on data/multilingual, then prints, per gold
language (``meta.gold_lang``): documents, kept share, and the drop reasons; language-ID accuracy (detected
``meta.lang`` vs the gold language, over the single-language files) and mixed-document detection (recall on
mixed.jsonl, false alarms on the rest).  Run it with PYTHONPATH pointing at another checkout to measure that code
(e.g. main's rules, before per-language profiles).
"""

from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

import zstandard


def read_all(out: Path) -> list[dict]:
    docs = []
    for sub in ("docs", "dropped"):
        for f in sorted((out / sub).glob("*.jsonl.zst")):
            with zstandard.open(f, "rt", encoding="utf-8") as fh:
                docs.extend(json.loads(line) for line in fh)
    return docs


def main() -> None:
    out = Path(sys.argv[1])
    overrides = {}
    for kv in sys.argv[2:]:
        k, v = kv.split("=", 1)
        overrides[k] = json.loads(v) if v[:1] in "0123456789[{tf" and v not in ("true", "false") else (
            v == "true" if v in ("true", "false") else v)
    from lmforge.data.stage import Config, run

    corpus = Path(__file__).resolve().parent.parent / "data" / "multilingual"
    run(Config(inputs=[str(corpus / "*.jsonl")], shards=1, **overrides), out, force=True)
    docs = read_all(out)
    # split pieces (id#lang) are not input documents: count each input document once, by its own id
    by_lang: dict[str, Counter] = defaultdict(Counter)
    lid_ok = lid_n = whole_ok = 0
    mixed_hit = mixed_n = false_alarm = single_n = 0
    share_err: list[float] = []
    for d in docs:
        m = d["meta"]
        if m.get("split_from"):
            continue
        gold = m.get("gold_lang")
        src = m.get("corpus_source", "")
        key = "zh (classical poems)" if gold == "zh" and "fortunes" in src else gold
        reason = m.get("drop_reason")
        by_lang[key]["docs"] += 1
        by_lang[key]["kept" if reason is None else f"{m.get('drop_step', '?').rsplit('_v', 1)[0]}:{reason}"] += 1
        if gold == "mixed":
            mixed_n += 1
            mixed_hit += bool(m.get("mixed"))
            other = next(k for k in m["gold_shares"] if k != "en")
            share_err.append(abs((m.get("lang_shares") or {}).get(other, 0.0) - m["gold_shares"][other]))
        elif "lang" in m:
            lid_n += 1
            lid_ok += m["lang"] == gold
            whole_ok += m.get("lang_whole", m["lang"]) == gold
            single_n += 1
            false_alarm += bool(m.get("mixed"))
    print(f"{'language':22s} {'docs':>5s} {'kept':>6s}  drop reasons")
    for key in sorted(by_lang):
        c = by_lang[key]
        reasons = ", ".join(f"{k} {v}" for k, v in c.most_common() if k not in ("docs", "kept"))
        print(f"{key:22s} {c['docs']:5d} {c['kept'] / c['docs']:6.0%}  {reasons}")
    if lid_n:
        print(f"language ID accuracy (single-language documents): whole document {whole_ok}/{lid_n} = "
              f"{whole_ok / lid_n:.3f}; final meta.lang (largest paragraph share for mixed ones) {lid_ok}/{lid_n} = "
              f"{lid_ok / lid_n:.3f}")
    if mixed_n and any("mixed" in d["meta"] or "lang_shares" in d["meta"] for d in docs):
        print(f"mixed detection: {mixed_hit}/{mixed_n} mixed documents flagged; "
              f"{false_alarm}/{single_n} single-language documents flagged; second-language share off by "
              f"{sum(share_err) / len(share_err):.3f} on average (max {max(share_err):.3f})")


if __name__ == "__main__":
    main()
