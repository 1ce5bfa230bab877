"""Labelling projects: prompts with candidate answers, rated (1–5 + tags), edited into gold answers and compared
(which of two is better) by annotators, one item at a time; exported as lmforge's SFT and preference JSONL.

A project is a folder ``$LMFORGE_HOME/labelling/<name>/``: ``project.json`` (guidelines, annotators),
``items.jsonl`` (``{"id", "prompt", "answers": [{"model", "text"}, ...]}``: up to four answers, from the file or
generated as candidates by a model, ``candidates.py``) and one append-only
``labels/<annotator>.jsonl`` per annotator (the newest label of an item wins).

Assignments: with ``overlap`` k (default: every annotator), item i goes to k annotators in turn (annotators
``i % A`` … ``(i + k - 1) % A``), so each item gets k labels for the agreement and the work is shared.  Each annotator
has an access token (``access.json``, readable by this user only): on a dashboard that requires ``--token``, an
annotator who opens ``/?annotator_token=T`` sees and labels only their own assignments (``security.py``).
"""

from __future__ import annotations

import hmac
import json
import os
import re
import secrets
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from lmforge.artifacts import write_json, write_text
from lmforge.dashboard.store import PageError

MAX_ANSWERS = 4  # a-d: one key each (e edits)
LETTERS = "abcd"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _name(value: str, what: str) -> str:
    if not NAME.match(value or ""):
        raise PageError(f"{what} {value!r}: use letters, digits, '_', '-', '.' (at most 64)", 400)
    return value


class Labelling:
    def __init__(self, home: Path) -> None:
        self.dir = Path(home) / "labelling"

    def create(self, name: str, items_file: str, guidelines: str, annotators: list[str],
               generate: Callable[[list[str]], list[list[dict[str, Any]]]] | None = None,
               overlap: int | None = None) -> dict[str, Any]:
        """A project from a JSONL of prompts with answers; with ``generate`` (prompts → candidate answers each), the
        prompts may come without answers and every item gets the generated candidates after its own answers."""
        folder = self.dir / _name(name, "project")
        if folder.exists():
            raise PageError(f"project {name} already exists", 409)
        annotators = [_name(a, "annotator") for a in annotators]
        if not annotators:
            raise PageError("name at least one annotator", 400)
        if len(set(annotators)) != len(annotators):
            raise PageError("annotators: a name appears twice", 400)
        overlap = len(annotators) if overlap is None else overlap
        if not 1 <= overlap <= len(annotators):
            raise PageError(f"annotators per item: 1 to {len(annotators)} (got {overlap})", 400)
        items = []
        path = Path(items_file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as err:
            raise PageError(f"cannot read {items_file}: {err.strerror or err}", 400) from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                prompt = rec["prompt"]
                answers = rec.get("answers") or [{"model": k, "text": rec[k]} for k in ("chosen", "rejected", "answer")
                                                 if isinstance(rec.get(k), str)]
                answers = [a if isinstance(a, dict) else {"model": f"answer {i + 1}", "text": str(a)}
                           for i, a in enumerate(answers)]
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                raise PageError(f"{items_file}:{n}: expected {{\"prompt\": str, \"answers\": [str or "
                                f"{{model, text}}, ...]}}", 400) from None
            if not isinstance(prompt, str) or not (answers or generate):
                raise PageError(f"{items_file}:{n}: a prompt and at least one answer are needed (or generate "
                                "candidate answers with a model)", 400)
            items.append({"id": str(rec.get("id", n)), "prompt": prompt, "answers": answers})
        if not items:
            raise PageError(f"{items_file} holds no items", 400)
        if generate is not None:
            for item, candidates in zip(items, generate([i["prompt"] for i in items])):
                item["answers"] = item["answers"] + candidates
        for item in items:
            item["answers"] = item["answers"][:MAX_ANSWERS]
        write_text(folder / "items.jsonl", "".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items))
        project = {"name": name, "guidelines": guidelines, "annotators": annotators, "overlap": overlap,
                   "created_at": time.time()}
        write_json(folder / "project.json", project)
        access = folder / "access.json"
        write_json(access, {a: secrets.token_urlsafe(18) for a in annotators})
        os.chmod(access, 0o600)
        return project

    def projects(self) -> list[dict[str, Any]]:
        if not self.dir.is_dir():
            return []
        return [self.project(d.name) for d in sorted(self.dir.iterdir()) if (d / "project.json").is_file()]

    def project(self, name: str) -> dict[str, Any]:
        path = self.dir / _name(name, "project") / "project.json"
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise PageError(f"no labelling project {name!r}", 404) from None
        except json.JSONDecodeError as err:
            raise PageError(f"{path} is corrupt: {err}", 500) from None

    def items(self, name: str) -> list[dict[str, Any]]:
        self.project(name)
        return [json.loads(l) for l in (self.dir / name / "items.jsonl").read_text().splitlines() if l.strip()]

    def labels(self, name: str, annotator: str | None = None) -> dict[str, dict[str, dict[str, Any]]]:
        """``{annotator: {item id: newest label}}``."""
        out: dict[str, dict[str, dict[str, Any]]] = {}
        folder = self.dir / name / "labels"
        for f in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
            if annotator and f.stem != annotator:
                continue
            for line in f.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
                out.setdefault(f.stem, {})[rec["item"]] = rec
        return out

    def check_annotator(self, name: str, annotator: str) -> None:
        if annotator not in self.project(name)["annotators"]:
            raise PageError(f"{annotator!r} is not an annotator of project {name}", 403)

    def assigned(self, name: str, annotator: str) -> list[dict[str, Any]]:
        """The items of ``annotator``'s assignment, in order."""
        project = self.project(name)
        people = project["annotators"]
        k = project.get("overlap") or len(people)  # projects made before assignments: everyone labels everything
        me = people.index(annotator)
        return [item for i, item in enumerate(self.items(name)) if (me - i) % len(people) < k]

    def tokens(self, name: str) -> dict[str, str]:
        """``{annotator: access token}`` of a project (none for projects made before tokens)."""
        try:
            return json.loads((self.dir / _name(name, "project") / "access.json").read_text())
        except FileNotFoundError:
            return {}

    def who(self, token: str) -> tuple[str, str] | None:
        """``(project, annotator)`` whose access token is ``token``, or None."""
        if not token or not self.dir.is_dir():
            return None
        for d in sorted(self.dir.iterdir()):
            try:
                tokens = json.loads((d / "access.json").read_text())
            except (OSError, ValueError):
                continue
            for annotator, t in tokens.items():
                if hmac.compare_digest(str(t), token):
                    return d.name, annotator
        return None

    def add(self, name: str, annotator: str, item_id: str, rating: int | None, tags: list[str], edited: str,
            choice: str | None) -> None:
        self.check_annotator(name, annotator)
        if item_id not in {i["id"] for i in self.items(name)}:
            raise PageError(f"no item {item_id!r} in project {name}", 404)
        if item_id not in {i["id"] for i in self.assigned(name, annotator)}:
            raise PageError(f"item {item_id!r} is not in {annotator}'s assignment", 403)
        if rating is not None and not 1 <= rating <= 5:
            raise PageError("rating: 1 to 5", 400)
        answers = next(i["answers"] for i in self.items(name) if i["id"] == item_id)
        if choice is not None and choice not in LETTERS[:len(answers)]:
            raise PageError(f"choice: one of {', '.join(LETTERS[:len(answers)])} (the item has {len(answers)} "
                            "answers)", 400)
        rec = {"item": item_id, "annotator": annotator, "rating": rating, "tags": tags, "edited": edited or None,
               "choice": choice, "time": time.time()}
        folder = self.dir / name / "labels"
        folder.mkdir(exist_ok=True)
        with open(folder / f"{_name(annotator, 'annotator')}.jsonl", "a") as f:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")

    def next_item(self, name: str, annotator: str) -> tuple[dict[str, Any] | None, int, int]:
        """The first item of this annotator's assignment not labelled yet, with ``(done, total)``."""
        done = self.labels(name, annotator).get(annotator, {})
        items = self.assigned(name, annotator)
        todo = [i for i in items if i["id"] not in done]
        return (todo[0] if todo else None), len(items) - len(todo), len(items)

    def export(self, name: str, kind: str) -> str:
        """SFT JSONL (edited answers as chat records) or preference JSONL (chosen/rejected), with annotator + time."""
        items = {i["id"]: i for i in self.items(name)}
        lines = []
        for annotator, labels in self.labels(name).items():
            for item_id, lab in labels.items():
                item = items.get(item_id)
                if item is None:
                    continue
                meta = {"annotator": annotator, "time": lab["time"], "project": name, "item": item_id}
                if kind == "sft" and lab.get("edited"):
                    lines.append({"messages": [{"role": "user", "content": item["prompt"]},
                                               {"role": "assistant", "content": lab["edited"]}], "meta": meta})
                elif kind == "preference" and lab.get("choice") and len(item["answers"]) >= 2:
                    best = LETTERS.index(lab["choice"])  # the best answer against each of the others
                    for k, other in enumerate(item["answers"]):
                        if k != best and other["text"] != item["answers"][best]["text"]:
                            lines.append({"prompt": item["prompt"], "chosen": item["answers"][best]["text"],
                                          "rejected": other["text"], "meta": {**meta, "chosen": LETTERS[best],
                                                                              "rejected": LETTERS[k]}})
        if kind not in ("sft", "preference"):
            raise PageError("kind: sft or preference", 400)
        if not lines:
            what = "edited answers" if kind == "sft" else "choices of a best answer"
            raise PageError(f"nothing to export: project {name} has no {what} yet", 404)
        return "".join(json.dumps(l, ensure_ascii=False) + "\n" for l in lines)

    def agreement(self, name: str) -> dict[str, Any]:
        """Cohen's kappa on ratings and on choices, averaged over annotator pairs, on items both labelled."""
        labels = self.labels(name)
        people = sorted(labels)
        out: dict[str, Any] = {}
        for field in ("rating", "choice"):
            kappas = []
            for i, p in enumerate(people):
                for q in people[i + 1:]:
                    both = [(labels[p][k][field], labels[q][k][field]) for k in labels[p]
                            if k in labels[q] and labels[p][k].get(field) is not None
                            and labels[q][k].get(field) is not None]
                    if len(both) >= 2:
                        kappas.append((cohen_kappa(both), len(both), p, q))
            if kappas:
                out[field] = {"kappa": sum(k[0] for k in kappas) / len(kappas), "pairs": len(kappas),
                              "items": sum(k[1] for k in kappas),
                              "by_pair": [{"annotators": [p, q], "kappa": k, "items": n} for k, n, p, q in kappas]}
        return out


def cohen_kappa(pairs: list[tuple[Any, Any]]) -> float:
    """Cohen's kappa of two raters' labels ``[(a, b), ...]`` (1 = perfect, 0 = chance)."""
    n = len(pairs)
    observed = sum(a == b for a, b in pairs) / n
    ca, cb = Counter(a for a, _ in pairs), Counter(b for _, b in pairs)
    expected = sum(ca[k] * cb.get(k, 0) for k in ca) / (n * n)
    return 1.0 if expected == 1 else (observed - expected) / (1 - expected)
