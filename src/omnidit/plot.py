"""Line charts drawn with Pillow (no plotting dependency): training loss and evaluation curves."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (23, 190, 207), (127, 127, 127)]


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if step * m >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]


def _label(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 100 or v == int(v) else f"{v:.3g}"


def line_chart(series: dict[str, Sequence[tuple[float, float]]], title: str, x_label: str = "step",
               y_range: tuple[float, float] | None = None, size: tuple[int, int] = (480, 300)) -> Image.Image:
    """One panel: each named series is a list of (x, y) points, drawn as a coloured line with a legend."""
    w, h = size
    left, right, top, bottom = 52, 12, 24, 34
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.text((left, 5), title, fill="black")
    points = [p for s in series.values() for p in s if math.isfinite(p[1])]
    if not points:
        d.text((left, h // 2), "no data yet", fill="gray")
        return img
    x_lo, x_hi = min(p[0] for p in points), max(p[0] for p in points)
    y_lo, y_hi = y_range or (min(p[1] for p in points), max(p[1] for p in points))
    if x_hi == x_lo:
        x_hi = x_lo + 1
    if y_hi == y_lo:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x_lo) / (x_hi - x_lo) * (w - left - right),
                h - bottom - (y - y_lo) / (y_hi - y_lo) * (h - top - bottom))

    d.rectangle([left, top, w - right, h - bottom], outline=(160, 160, 160))
    for y in _nice_ticks(y_lo, y_hi):
        _, py = to_px(x_lo, y)
        d.line([left, py, w - right, py], fill=(230, 230, 230))
        d.text((4, py - 6), _label(y), fill="black")
    for x in _nice_ticks(x_lo, x_hi):
        px, _ = to_px(x, y_lo)
        d.text((px - 10, h - bottom + 4), _label(x), fill="black")
    d.text((w - right - 40, h - 14), x_label, fill="gray")
    for i, (name, pts) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        xy = [to_px(x, y) for x, y in pts if math.isfinite(y)]
        if len(xy) > 1:
            d.line(xy, fill=colour, width=2)
        for px, py in xy if len(xy) < 30 else []:
            d.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
        d.text((left + 6, top + 4 + 12 * i), name, fill=colour)
    return img


def save_panels(panels: list[Image.Image], path: str | Path) -> Path:
    """Stack chart panels vertically into one PNG."""
    width = max(p.width for p in panels)
    out = Image.new("RGB", (width, sum(p.height for p in panels)), "white")
    y = 0
    for p in panels:
        out.paste(p, (0, y))
        y += p.height
    path = Path(path)
    out.save(path)
    return path


def plot_training_curves(metrics_path: str | Path, out_path: str | Path) -> Path:
    """Draw ``metrics.jsonl`` (loss records and evaluation records) as stacked panels in one PNG."""
    import json

    loss, evals = [], {}
    for line in Path(metrics_path).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if "loss" in record and not record.get("skipped"):
            loss.append((record["step"], record["loss"]))
        if "eval" in record:
            ev = record["eval"]
            evals.setdefault(ev["suite"], {}).setdefault("overall", []).append((record["step"], ev["overall"]))
            for name, value in ev["categories"].items():
                evals[ev["suite"]].setdefault(name, []).append((record["step"], value))
    panels = [line_chart({"loss": loss}, "training loss (mean per log interval)")]
    panels += [line_chart(series, f"{suite} suite (pass rate)", y_range=(0.0, 1.0)) for suite, series in evals.items()]
    return save_panels(panels, out_path)
