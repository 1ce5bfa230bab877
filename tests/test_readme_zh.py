"""README.zh-CN.md is kept in step with README.md: both list the same commands (every command line of the ```bash
blocks, comments left out, and every inline `lmforge ...` / `make ...` / `torchrun ...` code span)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_FENCE = re.compile(r"^```(\w*)\s*$")
_INLINE = re.compile(r"`((?:\.venv/bin/)?(?:lmforge|make|torchrun) [^`]*)`")
_COMMENT = re.compile(r"(^|\s+)#(\s.*)?$")  # a shell comment: '#' at the start or after a space ('#rep' is no comment)


def commands(markdown: str) -> set[str]:
    """The commands a README shows: bash-block lines without their comments, and inline command spans."""
    found: set[str] = set()
    in_bash = in_block = False
    for line in markdown.splitlines():
        m = _FENCE.match(line.strip())
        if m:
            if in_block:
                in_block = in_bash = False
            else:
                in_block, in_bash = True, m.group(1) == "bash"
            continue
        if in_bash:
            cmd = " ".join(_COMMENT.sub("", line).split())
            if cmd:
                found.add(cmd)
        elif not in_block:
            found.update(" ".join(c.split()) for c in _INLINE.findall(line))
    return found


def test_commands_extracted_from_both_kinds_of_markup():
    md = ("Run `lmforge runs` or `make demo`.\n```bash\nlmforge serve DIR   # comment\n# only a comment\n"
          "torchrun -m lmforge.cli pretrain --x 1\n```\n```python\nlmforge = 1\n```\n")
    assert commands(md) == {"lmforge runs", "make demo", "lmforge serve DIR", "torchrun -m lmforge.cli pretrain --x 1"}


def test_chinese_readme_lists_the_same_commands_as_the_english_one():
    en = commands((ROOT / "README.md").read_text(encoding="utf-8"))
    zh = commands((ROOT / "README.zh-CN.md").read_text(encoding="utf-8"))
    assert len(en) > 50
    missing, extra = sorted(en - zh), sorted(zh - en)
    assert not missing and not extra, (
        "README.zh-CN.md is out of step with README.md:\n  only in README.md:\n    " + "\n    ".join(missing)
        + "\n  only in README.zh-CN.md:\n    " + "\n    ".join(extra))
