"""Rebuild ``chatterbot_en.jsonl`` from the installed ``chatterbot-corpus`` package (BSD-3-Clause, see LICENSE).

Each corpus conversation is a question followed by one or more alternative answers; we keep the question and its first
answer as one user/assistant exchange (OpenAI ``messages`` JSONL), in file order, skipping exact duplicate questions.
Run: ``python data/chat/build_chatterbot.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml


def main() -> None:
    import chatterbot_corpus

    root = Path(chatterbot_corpus.__file__).parent / "data" / "english"
    out = Path(__file__).with_name("chatterbot_en.jsonl")
    seen: set[str] = set()
    lines = []
    for path in sorted(root.glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conv in data.get("conversations") or []:
            if not isinstance(conv, list) or len(conv) < 2:
                continue
            q, a = (str(x).strip() for x in conv[:2])
            if not q or not a or q.lower() in seen:
                continue
            seen.add(q.lower())
            rec = {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                   "source": f"chatterbot-corpus/english/{path.name}"}
            lines.append(json.dumps(rec, ensure_ascii=False))
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(lines)} conversations to {out}")


if __name__ == "__main__":
    main()
