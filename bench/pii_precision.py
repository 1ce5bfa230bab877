"""Precision (and recall) of PII redaction on real technical text: a hand-labelled set of lines.

    PYTHONPATH=. python bench/pii_precision.py [--rev GIT_REV]

``bench/data/pii_technical_lines.jsonl``: 204 real lines that the old patterns flagged or that hold timestamps,
version / section numbers or 3-3-4 digit runs - from the bundled corpus (data/demo, data/kb: Python and Django docs,
pip logs, books), 25 Debian changelogs (/usr/share/doc/*/changelog.Debian.gz) and 120 man pages (/usr/share/man) of
this machine, sampled with seed 0.  Each line lists its true PII (``email`` / ``ip``; the set holds no real phone or
card number), labelled by hand.  A redaction is a true positive when its text is one of the line's true PII of that
kind (ipv4 / ipv6 count as ``ip``).  ``--rev`` measures the patterns of an older commit for comparison.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import types
from collections import Counter
from pathlib import Path

SET = Path(__file__).with_name("data") / "pii_technical_lines.jsonl"


def load_checks(rev: str | None):
    if rev is None:
        from lmforge.data import pii
        return pii.CHECKS
    src = subprocess.run(["git", "show", f"{rev}:lmforge/data/pii.py"], capture_output=True, text=True, check=True)
    mod = types.ModuleType("pii_old")
    exec(compile(src.stdout, "pii_old", "exec"), mod.__dict__)
    return mod.CHECKS


def scan(text: str, checks) -> list[tuple[str, str]]:
    found = []
    for kind, pattern, ok in checks:
        def sub(m, kind=kind, ok=ok):
            try:
                good = ok(m.group(), m.string[max(0, m.start() - 24):m.start()], m.string[m.end():m.end() + 24])
            except TypeError:  # an older check takes the match only
                good = ok(m.group())
            if good:
                found.append((kind, m.group()))
                return "<PII>"
            return m.group()
        text = pattern.sub(sub, text)
    return found


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rev", default=None)
    ap.add_argument("--show", action="store_true", help="print every false positive")
    args = ap.parse_args()
    checks = load_checks(args.rev)
    tp, fp, fn = Counter(), Counter(), Counter()
    rows = [json.loads(line) for line in SET.read_text().splitlines()]
    for row in rows:
        truth = Counter((p["kind"], p["text"]) for p in row["pii"])
        for kind, text in scan(row["line"], checks):
            k = "ip" if kind in ("ipv4", "ipv6") else kind
            hit = next((t for t in truth if t[0] == k and truth[t] > 0 and (text in t[1] or t[1] in text)), None)
            if hit:
                truth[hit] -= 1
                tp[kind] += 1
            else:
                fp[kind] += 1
                if args.show:
                    print(f"  FP {kind}: {text!r} in {row['line'][:100]!r}")
        for (k, _), n in truth.items():
            fn[k] += n
    print(f"{len(rows)} lines, {sum(len(r['pii']) for r in rows)} labelled PII; patterns of {args.rev or 'this tree'}")
    print("| kind | redactions | true | false | precision |")
    print("|---|---|---|---|---|")
    for kind in sorted(set(tp) | set(fp)):
        n = tp[kind] + fp[kind]
        print(f"| {kind} | {n} | {tp[kind]} | {fp[kind]} | {tp[kind] / n:.3f} |")
    n = sum(tp.values()) + sum(fp.values())
    print(f"| all | {n} | {sum(tp.values())} | {sum(fp.values())} | {sum(tp.values()) / n:.3f} |")
    print(f"recall on the labelled PII: email {1 - fn['email'] / max(1, fn['email'] + tp['email']):.3f}, "
          f"ip {1 - fn['ip'] / max(1, fn['ip'] + tp['ipv4'] + tp['ipv6']):.3f}")


if __name__ == "__main__":
    main()
