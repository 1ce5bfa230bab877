"""PII redaction: e-mail addresses, phone numbers, IPv4/IPv6 addresses, credit-card numbers (Luhn-checked),
Chinese resident ID numbers (ISO 7064 checksum), Chinese mobile numbers and UnionPay bank-card numbers (Luhn, or
after 卡号 / 银行卡 / 账号), each replaced by a placeholder such as ``<EMAIL>``.

Candidates are found with regexes and then validated, so version numbers, dates and other digit runs are left alone
unless they pass the check for their type.  Types are tried in a fixed order (most specific first) and a redacted
span is never matched again.

Technical text (changelogs, man pages, API docs) is full of digit runs that look like PII: ISO timestamps
(``2010-07-04 12:15:58``), CVE ids, ZIP codes, decimals, number sequences and ``YYYYMMDD`` build dates are not phones;
version and section numbers (``Standards-Version 4.6.1.0``, ``novas-3.1.1.3.tar.gz``, ``section 3.2.1.4``) are not IP
addresses; long ids in quotes or after ``id``/``uid`` are not card numbers.  Precision on a hand-labelled set of real
technical lines: ``bench/pii_precision.py`` (docs/data.md has the figures).
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
    "cn_bank_card": "<BANK_CARD>",
    "cn_mobile": "<PHONE>",
    "credit_card": "<CREDIT_CARD>",
    "ipv6": "<IP>",
    "ipv4": "<IP>",
    "phone": "<PHONE>",
}

_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w-])")
_CN_ID = re.compile(r"(?<![0-9A-Za-z])\d{17}[\dXx](?![0-9A-Za-z])")
# Chinese mainland mobile numbers: 1[3-9]x xxxx xxxx, optionally +86 / 0086 / 86, grouped 3-4-4; ASCII digits only
# (cjk_normalize_v1 turns full-width digits into ASCII first).  Chinese text glues numbers to words (电话13812345678),
# so only digits may not border the number.
_CN_MOBILE = re.compile(r"(?<![0-9+])(?:(?:\+|00)?86[ -]?)?1[3-9][0-9](?:[ -]?[0-9]{4}){2}(?![0-9])")
# China UnionPay bank cards: 16-19 digits starting with 62, optionally grouped by 4
_CN_BANK = re.compile(r"(?<![0-9-])62[0-9]{2}(?:[ -]?[0-9]{4}){3}(?:[ -]?[0-9]{1,3})?(?![0-9-])")
_BANK_CONTEXT = re.compile(r"(?:卡号|银行卡|銀行卡|账号|帳號|賬號|账户|帳戶|储蓄卡|借记卡|信用卡)[^0-9]{0,6}$")
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.]*\d)")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
_PHONE = re.compile(r"(?<![\w+.,:/-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){1,4}"
                    r"(?![\w]|[.,:/-]\d)")
# context that makes a digit run something else: a version / section / release / CVE / id before it
_NOT_IP_BEFORE = re.compile(r"(?:(?:version|release|section|sect?\.|chapter|§|rfc)\b[^.;\n]{0,16}|v|[A-Za-z][\w+]*-|"
                            r"[=<>~!]=)\s*[:=]?\s*$", re.I)
_NOT_NUMBER_BEFORE = re.compile(r"(?:cve|id|uid|gid|pid|no|isbn|issn|version|ver|#)\s*[-:=#]?\s*['\"]?$", re.I)
_DATE = re.compile(r"(?:19|20)\d\d[-/.]?(?:0[1-9]|1[0-2])[-/.]?(?:0[1-9]|[12]\d|3[01])")

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


def _card_ok(m: str, before: str = "", after: str = "") -> bool:
    digits = re.sub(r"[ -]", "", m)
    if _NOT_NUMBER_BEFORE.search(before) or (before.endswith(("'", '"')) and after.startswith(("'", '"'))
                                            and re.search(r"\w+['\"]?\s*[:=]\s*['\"]$", before)):
        return False  # an id (``deployedModelId: '5251549009234886656'``), not a card
    groups = re.split(r"[ -]+", m)
    if len(groups) > 1 and (len(groups[0]) != 4 or not all(3 <= len(g) <= 6 for g in groups)):
        return False  # cards are printed in groups of 4 (Amex 4-6-5): ``100644 100644 100644`` is three file modes
    return 13 <= len(digits) <= 19 and len(set(digits)) > 1 and luhn_ok(digits)


def _cn_bank_ok(m: str, before: str = "", after: str = "") -> bool:
    """A UnionPay card number: Luhn-valid, or (older debit cards skip the check digit) right after a word such as
    卡号 / 银行卡 / 账号."""
    digits = re.sub(r"[ -]", "", m)
    return 16 <= len(digits) <= 19 and (luhn_ok(digits) or bool(_BANK_CONTEXT.search(before)))


def _ipv4_ok(m: str, before: str = "", after: str = "") -> bool:
    if _NOT_IP_BEFORE.search(before) or re.match(r"\.[A-Za-z]|[-~+]\w", after):
        return False  # a version or section number: ``Standards-Version: 4.6.1.0``, ``pkg-3.1.1.3.tar.gz``, ``1.2.7.2-1``
    return all(int(p) <= 255 and (p == "0" or not p.startswith("0")) for p in m.split("."))


def _ipv6_ok(m: str, before: str = "", after: str = "") -> bool:
    if m.count(":") < 2 or sum(c.isalnum() for c in m) < 2:
        return False
    try:
        ipaddress.IPv6Address(m)
    except ValueError:
        return False
    return True


def _phone_ok(m: str, before: str = "", after: str = "") -> bool:
    digit_str = re.sub(r"\D", "", m)
    digits = len(digit_str)
    # a phone number has 9-15 digits (E.164) and some structure: a + prefix, brackets, separators, or a bare mobile
    if not (9 <= digits <= 15 and (m.startswith("+") or "(" in m or any(c in m for c in " .-") or digits == 11)):
        return False
    if _NOT_NUMBER_BEFORE.search(before) or after.startswith(":") or len(set(digit_str)) <= 2 or "00000" in digit_str:
        return False  # CVE-2021-46828, issue numbers, a time (``12:15``), ``+000000120``
    if _DATE.search(m) and not m.startswith("+"):
        return False  # an ISO date / timestamp or a YYYYMMDD build date
    if re.fullmatch(r"\d+\.\d+", m) or re.fullmatch(r"\d{5}-\d{4}", m):
        return False  # a decimal number; a US ZIP+4 code
    groups = re.split(r"[ .-]+", m.strip("+"))
    if not m.startswith("+") and sum(len(g) >= 5 for g in groups) >= 2:
        return False  # runs of long numbers (``100755 100755``: file modes), not a grouped phone number
    if " " in m and len(groups) >= 3 and not m.startswith(("+", "0", "(")) and all(len(g) <= 3 for g in groups):
        return False  # a list of numbers (``13 21 34 55 89``), not a grouped phone number
    return True


CHECKS: list[tuple[str, re.Pattern[str], Callable[..., bool]]] = [
    ("email", _EMAIL, lambda m, before="", after="": True),
    ("cn_id", _CN_ID, lambda m, before="", after="": cn_id_ok(m)),
    ("cn_bank_card", _CN_BANK, _cn_bank_ok),
    ("credit_card", _CARD, _card_ok),
    ("ipv6", _IPV6, _ipv6_ok),
    ("ipv4", _IPV4, _ipv4_ok),
    ("cn_mobile", _CN_MOBILE, lambda m, before="", after="": True),
    ("phone", _PHONE, _phone_ok),
]


# Precision of each kind on 204 hand-labelled lines of real technical text (bench/pii_precision.py; redactions that
# are true PII / all redactions; None: the set holds no candidate of that kind).  Shown beside the counts in reports.
MEASURED_PRECISION: dict[str, float | None] = {
    "email": 1.0, "ipv4": 0.976, "ipv6": 1.0, "phone": None, "credit_card": None, "cn_id": None,
    "cn_mobile": None, "cn_bank_card": None}


def precision_note(counts: dict[str, int]) -> str:
    """``"precision on technical text: email 1.00, ipv4 0.98, phone not measured"`` for the kinds in ``counts``."""
    parts = []
    for kind in counts:
        p = MEASURED_PRECISION.get(kind)
        parts.append(f"{kind} {p:.2f}" if p is not None else f"{kind} not measured")
    return "precision on technical text (bench/pii_precision.py): " + ", ".join(parts)


CONTEXT_CHARS = 24  # of text before / after a candidate that its check may look at


def find_pii(text: str, kinds: frozenset[str] | None = None) -> tuple[str, list[tuple[str, str]]]:
    """``text`` with the PII of the given kinds (default all) replaced by placeholders, and the ``(kind, matched
    text)`` of every replacement, in the order they were made."""
    found: list[tuple[str, str]] = []
    for kind, pattern, ok in CHECKS:
        if kinds is not None and kind not in kinds:
            continue

        def sub(m: re.Match[str], kind: str = kind, ok: Callable[..., bool] = ok) -> str:
            before = m.string[max(0, m.start() - CONTEXT_CHARS):m.start()]
            if ok(m.group(), before, m.string[m.end():m.end() + CONTEXT_CHARS]):
                found.append((kind, m.group()))
                return PLACEHOLDERS[kind]
            return m.group()

        text = pattern.sub(sub, text)
    return text, found


def redact(text: str, kinds: frozenset[str] | None = None) -> tuple[str, dict[str, int]]:
    """``text`` with the PII of the given kinds (default all) replaced by placeholders, and the count per kind."""
    text, found = find_pii(text, kinds)
    counts: dict[str, int] = {}
    for kind, _ in found:
        counts[kind] = counts.get(kind, 0) + 1
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
