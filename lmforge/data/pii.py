"""PII redaction: e-mail addresses, phone numbers, IPv4/IPv6 addresses, credit-card numbers (Luhn-checked) and
Chinese resident ID numbers (ISO 7064 checksum), each replaced by a placeholder such as ``<EMAIL>``.

Candidates are found with regexes and then validated, so version numbers, dates and other digit runs are left alone
unless they pass the check for their type.  Types are tried in a fixed order (most specific first) and a redacted
span is never matched again.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Callable

from lmforge.data.documents import Document
from lmforge.data.steps import Step

PLACEHOLDERS = {
    "email": "<EMAIL>",
    "cn_id": "<CN_ID>",
    "credit_card": "<CREDIT_CARD>",
    "ipv6": "<IP>",
    "ipv4": "<IP>",
    "phone": "<PHONE>",
}

_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w-])")
_CN_ID = re.compile(r"(?<![0-9A-Za-z])\d{17}[\dXx](?![0-9A-Za-z])")
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.]*\d)")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
_PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){1,4}(?![\w])")

_CN_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_CN_CHECK = "10X98765432"


def luhn_ok(number: str) -> bool:
    """The Luhn checksum of a card number (digits only)."""
    total = 0
    for i, ch in enumerate(reversed(number)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def cn_id_ok(number: str) -> bool:
    """GB 11643-1999: 6-digit region, 8-digit birth date, 3-digit sequence, ISO 7064 MOD 11-2 check character."""
    month, day = int(number[10:12]), int(number[12:14])
    if not (1 <= month <= 12 and 1 <= day <= 31 and 18 <= int(number[6:8]) <= 20):
        return False
    s = sum(int(c) * w for c, w in zip(number[:17], _CN_WEIGHTS))
    return _CN_CHECK[s % 11] == number[17].upper()


def _card_ok(m: str) -> bool:
    digits = re.sub(r"[ -]", "", m)
    return 13 <= len(digits) <= 19 and len(set(digits)) > 1 and luhn_ok(digits)


def _ipv4_ok(m: str) -> bool:
    return all(int(p) <= 255 and (p == "0" or not p.startswith("0")) for p in m.split("."))


def _ipv6_ok(m: str) -> bool:
    if m.count(":") < 2 or sum(c.isalnum() for c in m) < 2:
        return False
    try:
        ipaddress.IPv6Address(m)
    except ValueError:
        return False
    return True


def _phone_ok(m: str) -> bool:
    digits = sum(c.isdigit() for c in m)
    # a phone number has 9-15 digits (E.164) and some structure: a + prefix, brackets, separators, or a bare mobile
    return 9 <= digits <= 15 and (m.startswith("+") or "(" in m or any(c in m for c in " .-") or digits == 11)


CHECKS: list[tuple[str, re.Pattern[str], Callable[[str], bool]]] = [
    ("email", _EMAIL, lambda m: True),
    ("cn_id", _CN_ID, cn_id_ok),
    ("credit_card", _CARD, _card_ok),
    ("ipv6", _IPV6, _ipv6_ok),
    ("ipv4", _IPV4, _ipv4_ok),
    ("phone", _PHONE, _phone_ok),
]


def redact(text: str, kinds: frozenset[str] | None = None) -> tuple[str, dict[str, int]]:
    """``text`` with the PII of the given kinds (default all) replaced by placeholders, and the count per kind."""
    counts: dict[str, int] = {}
    for kind, pattern, ok in CHECKS:
        if kinds is not None and kind not in kinds:
            continue
        placeholder = PLACEHOLDERS[kind]

        def sub(m: re.Match[str], kind: str = kind, ok: Callable[[str], bool] = ok, ph: str = placeholder) -> str:
            if ok(m.group()):
                counts[kind] = counts.get(kind, 0) + 1
                return ph
            return m.group()

        text = pattern.sub(sub, text)
    return text, counts


class PiiRedact(Step):
    """Redacts PII in place (never drops); per-document counts in ``meta.pii``, totals in the step's tallies."""

    name = "pii_redact_v1"

    def __init__(self, kinds: list[str] | None = None) -> None:
        super().__init__()
        unknown = set(kinds or ()) - set(PLACEHOLDERS)
        if unknown:
            raise ValueError(f"unknown PII kinds {sorted(unknown)}; known: {sorted(PLACEHOLDERS)}")
        self.kinds = frozenset(kinds) if kinds else None

    def process(self, doc: Document) -> Document | str:
        text, counts = redact(doc.text, self.kinds)
        if counts:
            doc.text = text
            doc.meta["pii"] = counts
            for k, n in counts.items():
                self.stats.tally("pii", k, n)
        return doc
