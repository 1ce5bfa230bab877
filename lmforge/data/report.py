"""``report.html``: one self-contained static page: per-step counts (in / kept / dropped by reason, time per document),
step tallies (languages, PII kinds, removed lines, near-duplicate cluster sizes), histograms of the kept documents
(length, language, language score, quality) as inline SVG bars, read errors and up to 3 example dropped documents per
reason."""

from __future__ import annotations

from html import escape
from typing import Any

_CSS = """
body{font-family:system-ui,sans-serif;margin:2rem;max-width:70rem;color:#222}
table{border-collapse:collapse;margin:0.5rem 0 1.5rem}td,th{border:1px solid #ccc;padding:0.25rem 0.6rem;text-align:left}
th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f7f7f7;padding:0.5rem;white-space:pre-wrap;max-height:12rem;overflow:auto;font-size:0.85em}
.ok{color:#060}.bad{color:#a00}
"""


def _n(x: Any) -> str:
    return f'<td class="n">{x:,}</td>' if isinstance(x, int) else f'<td class="n">{escape(str(x))}</td>'


def bars(counts: dict[str, int], title: str, sort_by_count: bool = True) -> str:
    """A horizontal bar chart as inline SVG (no external files), one bar per key, with count and share."""
    if not counts:
        return ""
    items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if sort_by_count else list(counts.items())
    items = items[:30]
    total = sum(counts.values()) or 1
    top = max(v for _, v in items) or 1
    row, label_w, bar_w = 18, 140, 360
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + bar_w + 150}" height="{row * len(items) + 24}"'
             f' font-size="12" font-family="sans-serif"><text x="0" y="13" font-weight="bold">{escape(title)}</text>']
    for k, (key, v) in enumerate(items):
        y = 20 + k * row
        w = max(1, round(bar_w * v / top))
        parts.append(f'<text x="{label_w - 6}" y="{y + 12}" text-anchor="end">{escape(str(key))[:22]}</text>'
                     f'<rect x="{label_w}" y="{y + 2}" width="{w}" height="{row - 5}" fill="#4a7bb7"/>'
                     f'<text x="{label_w + w + 4}" y="{y + 12}">{v:,} ({100 * v / total:.1f}%)</text>')
    parts.append("</svg>")
    return "".join(parts)


_BIN_ORDER = ("length", "lang_score", "quality")


def _sorted_bins(counts: dict[str, int]) -> dict[str, int]:
    def lo(label: str) -> float:
        return float(label.rstrip("+").split("-")[0])

    return dict(sorted(counts.items(), key=lambda kv: lo(kv[0])))


LANG_TABLES = ("lang_kept", "lang_dropped", "lang_drop_reason")


def lang_step_table(steps: list[dict[str, Any]]) -> str:
    """Kept / in per language per step (from the ``lang_kept`` / ``lang_dropped`` tallies), with the drop reasons
    of each cell as its tooltip and the share dropped in red above 10 %."""
    cols = [st for st in steps if any(t in (st.get("tallies") or {}) for t in LANG_TABLES[:2])]
    if not cols:
        return ""
    langs: dict[str, int] = {}
    for st in cols:
        for table in LANG_TABLES[:2]:
            for lang, n in (st["tallies"].get(table) or {}).items():
                langs[lang] = langs.get(lang, 0) + n
    head = "".join(f"<th>{escape(st['name'])}</th>" for st in cols)
    rows = []
    for lang in sorted(langs, key=lambda k: (-langs[k], k))[:40]:
        cells = []
        for st in cols:
            t = st["tallies"]
            kept = (t.get("lang_kept") or {}).get(lang, 0)
            dropped = (t.get("lang_dropped") or {}).get(lang, 0)
            if kept + dropped == 0:
                cells.append("<td>–</td>")
                continue
            why = ", ".join(f"{k.split(': ', 1)[1]}: {v}" for k, v in (t.get("lang_drop_reason") or {}).items()
                            if k.startswith(lang + ": "))
            share = dropped / (kept + dropped)
            cls = "bad" if share > 0.10 else "ok"
            cells.append(f'<td class="n" title="{escape(why)}">{kept:,}/{kept + dropped:,} '
                         f'<span class={cls}>(−{100 * share:.0f}%)</span></td>')
        rows.append(f"<tr><td>{escape(lang)}</td>{''.join(cells)}</tr>")
    return (f"<table><tr><th>language</th>{head}</tr>{''.join(rows)}</table>"
            "<p><small>kept / in per step once the language is known (hover a cell for its drop reasons)</small></p>")


def mixed_section(steps: list[dict[str, Any]]) -> str:
    """Mixed-language documents found by ``langid_v1``: how many, which language pairs, what was done with them."""
    lid = next((st for st in steps if st["name"].startswith("langid_")), None)
    if lid is None:
        return "<p>no language ID in this run</p>"
    mixed = (lid.get("tallies") or {}).get("mixed") or {}
    n = sum(mixed.values())
    if not n:
        return f"<p>none of {lid['in']:,} documents</p>"
    action = ("dropped (mixed_language)" if lid["dropped"].get("mixed_language")
              else f"split, {lid['added']:,} documents added" if lid.get("added") else "kept (meta.mixed, meta.lang_shares)")
    return (f"<p>{n:,} of {lid['in']:,} documents ({100 * n / max(1, lid['in']):.1f}%) mix languages; {action}.</p>"
            + bars(mixed, "mixed documents by language pair"))


def render(stats: dict[str, Any], title: str = "lmforge data report") -> str:
    t = stats["totals"]
    rows = []
    for st in stats["steps"]:
        dropped = sum(st["dropped"].values())
        added = st.get("added", 0)
        ok = st["in"] + added == st["kept"] + dropped
        reasons = ", ".join(f"{escape(k)}: {v:,}" for k, v in st["dropped"].items()) or "–"
        if st.get("added"):
            reasons += f" (+{st['added']:,} added)"
        us = st.get("us_per_doc")
        rows.append(
            f"<tr><td>{escape(st['name'])}</td>{_n(st['in'])}{_n(st['kept'])}{_n(dropped)}<td>{reasons}</td>"
            f"{_n(f'{us:,.0f}' if us is not None else '–')}"
            f"<td class={'ok' if ok else 'bad'}>{'✓' if ok else '✗'}</td></tr>"
        )
    tallies = []
    for st in stats["steps"]:
        for table, counts in (st.get("tallies") or {}).items():
            if table in LANG_TABLES:
                continue
            label = f"{st['name']}: {table}"
            if st["name"] == "pii_redact_v1" and table == "pii":
                from lmforge.data.pii import precision_note

                label += f" (counts are redactions; {precision_note(counts)})"
            tallies.append(bars(counts, label, sort_by_count=table != "cluster_size"))
    profile = stats.get("profile") or {}
    charts = []
    for key, label in (("length", "kept documents by length (characters)"), ("lang", "kept documents by language"),
                       ("lang_chars", "kept text by language (characters)"),
                       ("lang_score", "kept documents by language score"), ("quality", "kept documents by quality"),
                       ("domain", "kept documents by domain"), ("domain_chars", "kept text by domain (characters)")):
        if key in profile:
            counts = _sorted_bins(profile[key]) if key in _BIN_ORDER else profile[key]
            charts.append(bars(counts, label, sort_by_count=key not in _BIN_ORDER))
    errors = "".join(f"<tr><td>{escape(k)}</td>{_n(v)}</tr>" for k, v in stats["read"]["errors"].items())
    skipped = "".join(f"<tr><td>{escape(k)}</td>{_n(v)}</tr>" for k, v in stats["read"]["records_skipped"].items())
    skipped += "".join(
        f"<tr><td>file: {escape(k)}</td>{_n(v)}</tr>" for k, v in stats["inputs"]["skipped_files"].items()
    )
    examples = []
    for reason, exs in stats.get("examples", {}).items():
        examples.append(f"<h3>{escape(reason)}</h3>")
        for ex in exs:
            where = escape(str(ex.get("url") or ex.get("source") or ""))
            scores = ex.get("scores") or {}
            score_txt = ", ".join(f"{k}={v}" for k, v in scores.items())
            examples.append(
                f"<p><b>{escape(str(ex['id']))}</b> {where}<br><small>{escape(score_txt)}</small></p>"
                f"<pre>{escape(ex.get('snippet') or '')}</pre>"
            )
    timing = stats.get("timing", {})
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{escape(title)}</title><style>{_CSS}</style></head><body>
<h1>{escape(title)}</h1>
<p>{stats['inputs']['files']:,} input files ({stats['inputs']['bytes'] / 1e6:,.2f} MB) →
{t['docs_in']:,} documents read → <b>{t['docs_kept']:,} kept</b> ({t['bytes_kept'] / 1e6:,.2f} MB of text),
{t['docs_dropped']:,} dropped; {t['read_errors']:,} read errors.
{timing.get('seconds', 0):.1f} s, {timing.get('docs_per_s') or 0:,.0f} docs/s.</p>
<h2>Steps</h2>
<table><tr><th>step</th><th>in</th><th>kept</th><th>dropped</th><th>drop reasons</th><th>µs / doc</th>
<th>in (+ added) = kept + dropped</th></tr>
{''.join(rows)}</table>
<h2>Per language</h2>
{lang_step_table(stats["steps"]) or '<p>no language ID in this run</p>'}
<h2>Mixed-language documents</h2>
{mixed_section(stats["steps"])}
<h2>Kept documents</h2>
{'<br>'.join(charts) or '<p>none</p>'}
<h2>Step tallies</h2>
{'<br>'.join(t for t in tallies if t) or '<p>none</p>'}
<h2>Read errors</h2>
<table><tr><th>reason</th><th>count</th></tr>{errors or '<tr><td colspan=2>none</td></tr>'}</table>
<h2>Skipped (not documents)</h2>
<table><tr><th>reason</th><th>count</th></tr>{skipped or '<tr><td colspan=2>none</td></tr>'}</table>
<h2>Examples</h2>
{''.join(examples) or '<p>none</p>'}
</body></html>
"""
