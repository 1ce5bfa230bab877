"""The unit of work of the data stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Document:
    """One document: ``{"id", "text", "meta"}``.

    ``meta`` always holds ``source`` (the input file) and, where known, ``url`` and a locator (``line`` or
    ``offset``).  A step that drops a document sets ``meta["drop_reason"]`` and ``meta["drop_step"]``; later steps
    pass dropped documents through untouched.
    """

    id: str
    text: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def dropped(self) -> bool:
        return "drop_reason" in self.meta

    def drop(self, step: str, reason: str) -> "Document":
        self.meta["drop_reason"] = reason
        self.meta["drop_step"] = step
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text, "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Document":
        return cls(id=str(d["id"]), text=d["text"], meta=dict(d.get("meta") or {}))
