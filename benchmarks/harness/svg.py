"""suite.py's plot: saving over time on W1, procksm against ksmd, as an SVG file."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from benchmarks.harness.common import Json

LABELS = {
    "merge": "procksm merge",
    "daemon": "procksm attach",
    "daemon_eqcpu": "attach, ksmd's CPU",
    "ksmd_max": "ksmd max speed",
    "ksmd_defaults": "ksmd defaults",
}
COLOURS = {
    "merge": "#1f77b4",
    "daemon": "#2ca02c",
    "daemon_eqcpu": "#98df8a",
    "ksmd_max": "#d62728",
    "ksmd_defaults": "#ff9896",
}
W, H, L, R, T, B = 780, 450, 70, 170, 66, 50  # size and margins (left, right, top, bottom)
TMIN = 0.05  # s: the left end of the log time axis


def svg_path(output: Path) -> Path:
    """results/suite.json -> results/saving_over_time.svg; X.json -> X.svg."""
    return output.with_name(
        "saving_over_time.svg" if output.name == "suite.json" else output.stem + ".svg"
    )


def _esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


@dataclass(frozen=True)
class _Axes:
    """Log time (x) from TMIN to ``hi`` (log10), fraction of the ideal (y) 0 to 1.05."""

    lo: float
    hi: float

    def x(self, t: float) -> float:
        return L + (math.log10(max(t, TMIN)) - self.lo) / (self.hi - self.lo) * (W - L - R)

    def y(self, f: float) -> float:
        return T + (1 - min(max(f, 0.0), 1.05) / 1.05) * (H - T - B)


def _frame(ax: _Axes, w1: Json, res: Json) -> list[str]:
    """The title lines, the grid and the axis labels."""
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
        'font-family="sans-serif" font-size="12">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<text x="{L}" y="20" font-size="14">Saving over time, % of the ideal: W1, '
        "repetition 1</text>",
        f'<text x="{L}" y="37" font-size="11" fill="#555">{_esc(w1["description"])}</text>',
        f'<text x="{L}" y="52" font-size="11" fill="#555">{_esc(res["machine"])}, '
        f"{_esc(res.get('started', ''))}</text>",
    ]
    for f in (0, 0.25, 0.5, 0.75, 0.95, 1.0):
        out.append(
            f'<line x1="{L}" x2="{W - R}" y1="{ax.y(f):.1f}" y2="{ax.y(f):.1f}" stroke="#ddd"/>'
            f'<text x="{L - 6}" y="{ax.y(f) + 4:.1f}" text-anchor="end">{100 * f:.0f} %</text>'
        )
    for t in (0.1, 0.3, 1, 3, 10, 30, 100, 300):
        if math.log10(t) > ax.hi:
            break
        out.append(
            f'<line x1="{ax.x(t):.1f}" x2="{ax.x(t):.1f}" y1="{T}" y2="{H - B}" stroke="#eee"/>'
            f'<text x="{ax.x(t):.1f}" y="{H - B + 16}" text-anchor="middle">{t:g} s</text>'
        )
    out.append(
        f'<text x="{(L + W - R) / 2}" y="{H - 12}" text-anchor="middle">time since start '
        "(log scale)</text>"
    )
    return out


def write_svg(res: Json, path: Path) -> None:
    """Saving over time on W1 (first repetition): procksm vs ksmd, log time axis."""
    w1 = res["workloads"].get("W1")
    if not w1 or not w1.get("reps"):
        return
    rep = w1["reps"][0]
    ideal = w1["ideal_pages"]
    series = {v: rep[v]["samples"] for v in COLOURS if v in rep and rep[v].get("samples")}
    if not series:
        return
    tmax = max(s[-1][0] for s in series.values())
    ax = _Axes(math.log10(TMIN), math.log10(max(tmax, 1.0) * 1.1))
    out = _frame(ax, w1, res)
    for i, (v, samples) in enumerate(series.items()):
        pts = " ".join(f"{ax.x(s[0]):.1f},{ax.y(s[1] / ideal):.1f}" for s in samples if s[0] > 0)
        out.append(f'<polyline fill="none" stroke="{COLOURS[v]}" stroke-width="2" points="{pts}"/>')
        ly = T + 16 * i + 8
        out.append(
            f'<line x1="{W - R + 10}" x2="{W - R + 30}" y1="{ly}" y2="{ly}" '
            f'stroke="{COLOURS[v]}" stroke-width="3"/>'
            f'<text x="{W - R + 35}" y="{ly + 4}">{LABELS[v]}</text>'
        )
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")
