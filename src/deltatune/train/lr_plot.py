"""The range test's curve as a standalone SVG (``lr_find.svg`` in the run): training loss against the
learning rate on a log axis, the batch losses as dots, the smoothed loss as a line, and the chosen
rate marked. Plain SVG written by hand, like compare's report: no plotting library, opens in any browser.
"""

from __future__ import annotations

import html
import math

W, H = 640, 400
LEFT, RIGHT, TOP, BOTTOM = 70, 24, 48, 64


def lr_find_svg(found: dict) -> str:
    points = found["points"]
    xs = [math.log10(p["lr"]) for p in points]
    ys = [p["loss"] for p in points] + [p["smoothed"] for p in points]
    x0, x1 = math.floor(min(xs)), math.ceil(max(xs))
    x1 = x1 if x1 > x0 else x0 + 1
    y0, y1 = min(ys), max(ys)
    pad = 0.05 * ((y1 - y0) or 1.0)
    y0, y1 = y0 - pad, y1 + pad

    def px(x: float) -> float:
        return LEFT + (x - x0) / (x1 - x0) * (W - LEFT - RIGHT)

    def py(y: float) -> float:
        return H - BOTTOM - (y - y0) / (y1 - y0) * (H - TOP - BOTTOM)

    title = f"Learning-rate range test: {found['method']}, {len(points)} steps"
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" role="img" aria-label="{_esc(title)}" width="{W}" '
             f'height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif">',
             '<rect width="100%" height="100%" fill="white"/>',
             f'<text x="{W / 2}" y="22" font-size="15" text-anchor="middle">{_esc(title)}</text>',
             f'<line x1="{LEFT}" y1="{H - BOTTOM}" x2="{W - RIGHT}" y2="{H - BOTTOM}" stroke="#333"/>',
             f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{H - BOTTOM}" stroke="#333"/>',
             f'<text x="{(LEFT + W - RIGHT) / 2}" y="{H - 24}" font-size="12" text-anchor="middle">'
             'learning rate (log scale)</text>',
             f'<text x="16" y="{(TOP + H - BOTTOM) / 2}" font-size="12" text-anchor="middle" '
             f'transform="rotate(-90 16 {(TOP + H - BOTTOM) / 2})">training loss</text>']
    for tick in range(x0, x1 + 1):
        parts.append(f'<line x1="{px(tick):.1f}" y1="{H - BOTTOM}" x2="{px(tick):.1f}" y2="{H - BOTTOM + 5}" '
                     f'stroke="#333"/><text x="{px(tick):.1f}" y="{H - BOTTOM + 18}" font-size="11" '
                     f'text-anchor="middle">1e{tick}</text>')
    for value in (y0 + pad, (y0 + y1) / 2, y1 - pad):
        parts.append(f'<line x1="{LEFT - 5}" y1="{py(value):.1f}" x2="{LEFT}" y2="{py(value):.1f}" '
                     f'stroke="#333"/><text x="{LEFT - 8}" y="{py(value) + 4:.1f}" font-size="11" text-anchor="end">{value:.3g}</text>')
    parts += [f'<circle cx="{px(x):.1f}" cy="{py(p["loss"]):.1f}" r="2.5" fill="#9db7d5"/>'
              for x, p in zip(xs, points)]
    line = " ".join(f"{px(x):.1f},{py(p['smoothed']):.1f}" for x, p in zip(xs, points))
    parts.append(f'<polyline points="{line}" fill="none" stroke="#4c78a8" stroke-width="2"/>')
    chosen = found["lr"]
    if chosen > 0 and math.isfinite(chosen):
        cx = px(math.log10(chosen))
        parts.append(f'<line x1="{cx:.1f}" y1="{TOP}" x2="{cx:.1f}" y2="{H - BOTTOM}" stroke="#e45756" '
                     f'stroke-width="1.5" stroke-dasharray="5 3"/><text x="{cx + 5:.1f}" y="{TOP + 12}" '
                     f'font-size="12" fill="#e45756">chosen {chosen:.3g} ({_esc(found["rule"])})</text>')
    legend_y = H - 8
    parts.append(f'<circle cx="{LEFT + 6}" cy="{legend_y - 4}" r="3" fill="#9db7d5"/>'
                 f'<text x="{LEFT + 14}" y="{legend_y}" font-size="11">loss of each batch</text>'
                 f'<line x1="{LEFT + 130}" y1="{legend_y - 4}" x2="{LEFT + 150}" y2="{legend_y - 4}" '
                 f'stroke="#4c78a8" stroke-width="2"/><text x="{LEFT + 156}" y="{legend_y}" font-size="11">'
                 f'smoothed (EMA); stopped: {_esc(found["stopped"])}</text>')
    return "\n".join(parts) + "\n</svg>\n"


def _esc(value) -> str:
    return html.escape(str(value))
