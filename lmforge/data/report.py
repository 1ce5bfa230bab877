"""``report.html``: one static page with the per-step counts, drop reasons, read errors and example dropped docs."""

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


def render(stats: dict[str, Any], title: str = "lmforge data report") -> str:
    t = stats["totals"]
    rows = []
    for st in stats["steps"]:
        dropped = sum(st["dropped"].values())
        ok = st["in"] == st["kept"] + dropped
        reasons = ", ".join(f"{escape(k)}: {v:,}" for k, v in st["dropped"].items()) or "–"
        rows.append(
            f"<tr><td>{escape(st['name'])}</td>{_n(st['in'])}{_n(st['kept'])}{_n(dropped)}<td>{reasons}</td>"
            f"<td class={'ok' if ok else 'bad'}>{'✓' if ok else '✗'}</td></tr>"
        )
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
<table><tr><th>step</th><th>in</th><th>kept</th><th>dropped</th><th>drop reasons</th><th>in = kept + dropped</th></tr>
{''.join(rows)}</table>
<h2>Read errors</h2>
<table><tr><th>reason</th><th>count</th></tr>{errors or '<tr><td colspan=2>none</td></tr>'}</table>
<h2>Skipped (not documents)</h2>
<table><tr><th>reason</th><th>count</th></tr>{skipped or '<tr><td colspan=2>none</td></tr>'}</table>
<h2>Examples</h2>
{''.join(examples) or '<p>none</p>'}
</body></html>
"""
