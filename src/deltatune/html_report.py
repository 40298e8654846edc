"""Pieces of the pages deltatune writes for people (``data_report.html``, compare's ``report.html``): one
page style, numbers as a person reads them (thousands separators, sensible decimals, percentages), plain
labels with the raw key in small type beside them, nested values as small tables, a line per section on
what it means, and SVG plots with both axes ticked and titled. Standard library only (a leaf, like fs.py),
and the pages need nothing else: inline CSS and SVG, no script, no CDN, no font to fetch."""

from __future__ import annotations

import html
import math
from datetime import datetime

STYLE = (
    "body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;margin:2em auto;"
    "max-width:84em;padding:0 1.5em;color:#222;line-height:1.4}"
    "h1{margin-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}"
    "h3{margin:1.2em 0 .3em;font-size:15px}"
    ".meta{color:#555;margin-top:0}.meta span{margin-right:1.6em;white-space:nowrap}"
    "table{border-collapse:collapse;margin:.4em 0 1em}"
    "th,td{border:1px solid #ccc;padding:4px 8px;font-size:13px;text-align:left;vertical-align:top}"
    "th{background:#f6f6f6}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}"
    "table.nested{margin:0}table.nested th,table.nested td{border-color:#e2e2e2;padding:1px 6px;font-size:12px;"
    "background:none;font-weight:normal;color:#444}"
    "code.key{font-size:11px;color:#777;background:#f3f3f3;padding:0 3px;border-radius:3px;margin-left:.4em;"
    "font-weight:normal;white-space:nowrap}"
    ".means{background:#f4f7fb;border-left:4px solid #4c78a8;padding:6px 12px;margin:.4em 0 .8em;max-width:60em}"
    ".banner{background:#fff4e0;border:1px solid #e0a040;border-left:6px solid #e08a00;padding:10px 14px;"
    "margin:1em 0;font-size:15px}"
    ".pick{font-size:15px;background:#eef5ee;padding:8px 12px;border-left:4px solid #54a24b}"
    ".none{color:#888}.small{font-size:12px;color:#555}"
    "svg{font-family:inherit;display:block;margin:.2em 0 .6em;overflow:visible}"
    ".figs{display:flex;flex-wrap:wrap;gap:0 3em;align-items:flex-start}"
    ".legend span{margin-right:1.4em;white-space:nowrap;font-size:13px}"
    ".legend i{display:inline-block;width:14px;height:4px;margin-right:5px;vertical-align:middle}"
)


def esc(value) -> str:
    return html.escape(str(value))


# ----------------------------------------------------------------------------- numbers and words

def count(n) -> str:
    """An integer with thousands separators: 22713986 -> '22,713,986'."""
    return f"{int(n):,}"


def number(x, decimals: int = 4) -> str:
    """A float with thousands separators and a fixed number of decimals; '–' for None or NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:,.{decimals}f}"


def sig(x: float, digits: int = 3) -> str:
    """A value of any size to ``digits`` significant digits, with separators: 1523.7 -> '1,524', 0.00123 -> '0.00123'."""
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(x))))
    return f"{x:,.{decimals}f}"


def percent(part: float, whole: float) -> str:
    """``part`` as a share of ``whole``: '35.6 %', '0.07 %', '100 %'; '–' when whole is 0."""
    if not whole:
        return "–"
    p = 100 * part / whole
    if p == 0 or p == 100:
        return f"{p:.0f} %"
    return f"{p:.1f} %" if p >= 10 else f"{p:.2f} %" if p >= 0.1 else f"{sig(p, 2)} %"


def size(n_bytes: float) -> str:
    """Bytes in the unit a person reads: '3.1 kB', '0.96 MB', '90.9 MB', '1.20 GB'."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale or (unit == "MB" and n_bytes >= 1e5):
            return f"{sig(n_bytes / scale, 3)} {unit}"
    return f"{int(n_bytes)} B"


def plural(n: int, one: str, many: str | None = None) -> str:
    """'1 row', '1,128 rows'."""
    return f"{count(n)} {one if n == 1 else many or one + 's'}"


def when(moment: datetime | str | None) -> str:
    """A date and time to the minute: '2026-12-01 16:34'."""
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment)
    return (moment or datetime.now()).strftime("%Y-%m-%d %H:%M")


# ----------------------------------------------------------------------------- HTML pieces

def label(plain: str, key: str | None = None) -> str:
    """A plain-language label with the raw key (as in the JSON) in small type beside it."""
    return esc(plain) + (f'<code class="key">{esc(key)}</code>' if key else "")


def value(v) -> str:
    """Any JSON value as HTML for a table cell: numbers formatted, dicts as small nested tables, lists as
    comma-separated items, nothing as a grey 'none'."""
    if v is None or v == {} or v == []:
        return '<span class="none">none</span>'
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return count(v)
    if isinstance(v, float):
        text = sig(v, 4)
        return text.rstrip("0").rstrip(".") if "." in text else text
    if isinstance(v, dict) and v and all(isinstance(x, dict) for x in v.values()) and all(
            _numeric(y) for x in v.values() for y in x.values()):  # counts by two keys: a small matrix
        columns = list(dict.fromkeys(k for x in v.values() for k in x))
        if columns:
            head = "<tr><th></th>" + "".join(f"<th>{esc(c)}</th>" for c in columns) + "</tr>"
            return ('<table class="nested">' + head + "".join(
                f"<tr><th>{esc(k)}</th>" + "".join(f"<td class=n>{value(x.get(c, 0))}</td>" for c in columns) + "</tr>"
                for k, x in v.items()) + "</table>")
    if isinstance(v, dict):
        return ('<table class="nested">' + "".join(f"<tr><th>{esc(k)}</th><td{' class=n' if _numeric(x) else ''}>"
                                                   f"{value(x)}</td></tr>" for k, x in v.items()) + "</table>")
    if isinstance(v, list):
        return ", ".join(value(x) for x in v)
    return esc(v)


def facts(rows: list[tuple[str, str | None, object]]) -> str:
    """A two-column table: plain label (with its key) and the value, formatted by ``value`` (a str that
    starts with '<' is taken as ready HTML)."""
    cells = "".join(f"<tr><th>{label(plain, key)}</th><td{' class=n' if _numeric(v) else ''}>"
                    f"{v if isinstance(v, str) and v.startswith('<') else value(v)}</td></tr>"
                    for plain, key, v in rows)
    return f"<table>{cells}</table>"


def _numeric(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def means(text: str) -> str:
    """The line under a section that says what its figures mean (``text`` is HTML)."""
    return f'<p class="means">{text}</p>'


def banner(text: str) -> str:
    """A warning at the top of a page (``text`` is HTML)."""
    return f'<div class="banner" role="alert"><b>Warning:</b> {text}</div>'


def page(title: str, meta: list[tuple[str, str]], body: str, style: str = "") -> str:
    """A whole self-contained page: title, a line of facts about it (plain name, value), then ``body``;
    ``style``: the page's own CSS, after the shared one."""
    line = " ".join(f"<span>{esc(k)}: <b>{esc(v)}</b></span>" for k, v in meta)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{STYLE}{style}</style></head><body><h1>{esc(title)}</h1><p class='meta'>{line}</p>{body}</body></html>\n")


# ----------------------------------------------------------------------------- plots

def ticks(low: float, high: float, n: int = 5, integer: bool = False) -> list[float]:
    """Round values (steps of 1, 2, 2.5 or 5 times a power of ten; whole numbers if ``integer``) that
    cover low..high in about ``n`` steps: the first at or below low, the last at or above high."""
    if high <= low:
        high = low + 1
    raw = (high - low) / n
    mag = 10 ** math.floor(math.log10(raw))
    steps = (1, 2, 5, 10) if integer else (1, 2, 2.5, 5, 10)
    step = next(m * mag for m in steps if m * mag >= raw)
    if integer:
        step = max(1, round(step))
    first = math.floor(low / step + 1e-9) * step
    out, k = [], 0
    while not out or out[-1] < high - 1e-9 * step:
        out.append(round(first + k * step, 10))
        k += 1
    return out


def tick_label(v: float, step: float) -> str:
    """A tick's text: as many decimals as the step needs, thousands separated."""
    decimals = 0 if step >= 1 and float(step).is_integer() else max(0, -math.floor(math.log10(step)) + (
        0 if round(step / 10 ** math.floor(math.log10(step)), 6) in (1, 2, 5) else 1))
    return f"{v:,.{decimals}f}"


class Frame:
    """A plot's axes: maps data to pixels, and draws both axes with ticks, grid lines and titles.
    ``xticks``/``yticks`` are (value, text) pairs; the ranges are the first and last tick's values unless given."""

    def __init__(self, width: int, height: int, xticks, yticks, xtitle: str, ytitle: str,
                 xrange: tuple[float, float] | None = None, yrange: tuple[float, float] | None = None,
                 left: int = 70, bottom: int = 48, top: int = 12, right: int = 24):
        self.w, self.h, self.xticks, self.yticks, self.xtitle, self.ytitle = width, height, xticks, yticks, xtitle, ytitle
        self.x0, self.x1 = xrange or (xticks[0][0], xticks[-1][0])
        self.y0, self.y1 = yrange or ((yticks[0][0], yticks[-1][0]) if yticks else (0, 1))
        if xrange:  # ticks only where the axis is
            self.xticks = [(v, t) for v, t in xticks if self.x0 - 1e-9 <= v <= self.x1 + 1e-9]
        self.left, self.right, self.top, self.bottom = left, width - right, top, height - bottom

    def px(self, x: float) -> float:
        return self.left + (x - self.x0) / ((self.x1 - self.x0) or 1) * (self.right - self.left)

    def py(self, y: float) -> float:
        return self.bottom - (y - self.y0) / ((self.y1 - self.y0) or 1) * (self.bottom - self.top)

    def open(self, title: str) -> str:
        """The <svg> tag and the axes; the caller adds the marks and closes it."""
        parts = [f'<svg role="img" aria-label="{esc(title)}" width="{self.w}" height="{self.h}" '
                 f'viewBox="0 0 {self.w} {self.h}">']
        for v, text in self.yticks:
            y = self.py(v)
            parts.append(f'<line x1="{self.left}" y1="{y:.1f}" x2="{self.right}" y2="{y:.1f}" stroke="#eee"/>'
                         f'<line x1="{self.left - 4}" y1="{y:.1f}" x2="{self.left}" y2="{y:.1f}" stroke="#333"/>'
                         f'<text x="{self.left - 7}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{esc(text)}</text>')
        for v, text in self.xticks:
            x = self.px(v)
            parts.append(f'<line x1="{x:.1f}" y1="{self.bottom}" x2="{x:.1f}" y2="{self.bottom + 4}" stroke="#333"/>'
                         f'<text x="{x:.1f}" y="{self.bottom + 17}" font-size="11" text-anchor="middle">{esc(text)}</text>')
        mid_x, mid_y = (self.left + self.right) / 2, (self.top + self.bottom) / 2
        parts.append(f'<line x1="{self.left}" y1="{self.bottom}" x2="{self.right}" y2="{self.bottom}" stroke="#333"/>'
                     f'<line x1="{self.left}" y1="{self.top}" x2="{self.left}" y2="{self.bottom}" stroke="#333"/>'
                     f'<text x="{mid_x:.1f}" y="{self.h - 8}" font-size="12" text-anchor="middle">{esc(self.xtitle)}</text>')
        if self.ytitle:
            parts.append(f'<text transform="translate(14 {mid_y:.1f}) rotate(-90)" font-size="12" text-anchor="middle">'
                         f"{esc(self.ytitle)}</text>")
        return "".join(parts)


def value_ticks(low: float, high: float, n: int = 5, integer: bool = False) -> list[tuple[float, str]]:
    """``ticks`` with their texts."""
    values = ticks(low, high, n, integer)
    step = values[1] - values[0] if len(values) > 1 else 1
    return [(v, tick_label(v, step)) for v in values]


def bars(title: str, counts: dict, unit: str = "rows", width: int = 540) -> str:
    """Horizontal bars, one per category, each with its count and share; a count axis below."""
    if not counts:
        return ""
    names = [str(k) for k in counts]
    label_w = min(200, max(80, 12 + 7 * max(len(n[:28]) for n in names)))
    row_h, total = 22, sum(counts.values())
    frame = Frame(width, row_h * len(counts) + 56, value_ticks(0, max(counts.values()), 4, integer=True),
                  [], unit, "", left=label_w, right=110, top=6)
    parts = [frame.open(title)]
    for i, (name, n) in enumerate(zip(names, counts.values())):
        y = frame.top + 4 + i * row_h
        w = frame.px(n) - frame.left
        shown = name if len(name) <= 28 else name[:27] + "…"
        parts.append(f'<text x="{label_w - 8}" y="{y + 12}" font-size="12" text-anchor="end">{esc(shown)}'
                     f"<title>{esc(name)}</title></text>"
                     f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="16" fill="#4c78a8">'
                     f"<title>{esc(name)}: {count(n)} {unit}</title></rect>"
                     f'<text x="{label_w + w + 5:.1f}" y="{y + 12}" font-size="12">{count(n)} ({percent(n, total)})</text>')
    return f"<h3>{esc(title)}</h3>" + "".join(parts) + "</svg>"


def histogram(title: str, counts: list[int], edges: list[float], xtitle: str, ytitle: str,
              markers: list[tuple[float, str]] = (), width: int = 620, height: int = 240) -> str:
    """Bars over bins (``edges``: one more than ``counts``), integer ticks on both axes, optional dashed
    markers (value, name) such as the median."""
    if not counts:
        return ""
    frame = Frame(width, height, value_ticks(edges[0], edges[-1], 6, integer=True),
                  value_ticks(0, max(counts), 4, integer=True), xtitle, ytitle, top=22)
    frame.x0, frame.x1 = min(frame.x0, edges[0]), max(frame.x1, edges[-1])
    parts = [frame.open(title)]
    for i, n in enumerate(counts):
        lo, hi = math.ceil(edges[i]), (math.floor(edges[-1]) if i == len(counts) - 1 else math.ceil(edges[i + 1]) - 1)
        x, x2, y = frame.px(edges[i]), frame.px(edges[i + 1]), frame.py(n)
        span = f"{count(lo)}" if hi <= lo else f"{count(lo)}–{count(hi)}"
        parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(x2 - x - 1, 0.5):.1f}" height="{frame.bottom - y:.1f}" '
                     f'fill="#f58518"><title>{span} {esc(xtitle)}: {count(n)} {esc(ytitle)}</title></rect>')
    for k, (v, name) in enumerate(markers):
        x = frame.px(v)
        parts.append(f'<line x1="{x:.1f}" y1="{frame.top - 4 + 11 * (k % 2)}" x2="{x:.1f}" y2="{frame.bottom}" '
                     f'stroke="#333" stroke-dasharray="3 3"/><text x="{x + 3:.1f}" y="{frame.top - 6 + 11 * (k % 2)}" '
                     f'font-size="11">{esc(name)}</text>')
    return f"<h3>{esc(title)}</h3>" + "".join(parts) + "</svg>"


def legend(items: list[tuple[str, str]]) -> str:
    """Name and colour of each series, under a plot."""
    return '<p class="legend">' + "".join(f'<span><i style="background:{c}"></i>{esc(n)}</span>' for n, c in items) + "</p>"
