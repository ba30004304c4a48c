"""Line charts of a run's losses and metrics, drawn with Pillow (no plotting library needed).

``plot_training_curves(stats_jsonl, out_png)`` reads a run's ``stats.jsonl`` (one record per tick
and per evaluation, ``tvm.runtime.run_logging.RunLogger.log_stats``) and writes one PNG with a grid of
panels over optimizer steps:

* terminal-velocity loss and flow-matching loss, one line per time bin (q0: t < 0.25, ...,
  q3: t ≥ 0.75; the status line's ``terminal a/b/c/d`` and ``fm a/b/c/d``);
* gradient norm (before clipping) and training throughput (img/s);
* one panel per metric value (e.g. ``fid50k_full_fid``), one line per sampler (``1_step``, ...).

Missing and non-finite values (written as null) leave gaps; a series with few points is drawn with
markers, so a single evaluation is visible; the y axis is logarithmic when the values are positive
and span more than ``LOG_RATIO``. Records of a step that was redone after a restart replace the
earlier ones.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

from PIL import Image, ImageDraw, ImageFont

COLORS = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)
BACKGROUND = (255, 255, 255)
AXIS = (0, 0, 0)
GRID = (225, 225, 225)
TEXT = (0, 0, 0)
PANEL_SIZE = (420, 270)  # pixels per panel (width, height)
COLUMNS = 3  # panels per row
MARGINS = (62, 44, 12, 34)  # plot area inside a panel: left (y labels), top (title, legend), right, bottom
MARKER_MAX_POINTS = 40  # series with at most this many points get markers
LOG_RATIO = 50.0  # positive values spanning more than this ratio get a log y axis
LINE_WIDTH = 2


@dataclass
class Series:
    """One line: ``y[i]`` at ``x[i]``; ``None`` or a non-finite ``y`` is a gap."""

    label: str
    x: Sequence[float]
    y: Sequence[float | None]


@dataclass
class Axes:
    """Where a chart put its plot area (pixels) and the data range it spans."""

    left: int
    top: int
    right: int
    bottom: int
    x_range: tuple[float, float]
    y_range: tuple[float, float]  # log10 of the values when log_y
    log_y: bool

    def pixel(self, x: float, y: float) -> tuple[int, int]:
        """(column, row) of the data point (x, y)."""
        x0, x1 = self.x_range
        y0, y1 = self.y_range
        v = math.log10(y) if self.log_y else y
        col = self.left + (x - x0) / (x1 - x0) * (self.right - self.left)
        row = self.bottom - (v - y0) / (y1 - y0) * (self.bottom - self.top)
        return round(col), round(row)


# ---------------------------------------------------------------------------------------------
# Axis ranges and ticks
# ---------------------------------------------------------------------------------------------


def _nice_step(span: float, target_ticks: int = 5) -> float:
    """1, 2 or 5 × 10^k, close to ``span / target_ticks``."""
    raw = span / target_ticks
    power = 10 ** math.floor(math.log10(raw))
    for multiple in (1, 2, 5, 10):
        if multiple * power >= raw:
            return multiple * power
    return 10 * power


def nice_range(lo: float, hi: float, target_ticks: int = 5) -> tuple[float, float, list[float]]:
    """``(lo', hi', ticks)``: the range widened to multiples of a 1-2-5 step, and the ticks in it.

    A zero-width range is widened first (by 10% of the value, or ±1 around 0).
    """
    if hi - lo <= 1e-12 * max(abs(lo), abs(hi), 1e-300):
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    step = _nice_step(hi - lo, target_ticks)
    start, stop = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    ticks = [k * step for k in range(start, stop + 1)]
    return start * step, stop * step, ticks


def log_range(lo: float, hi: float) -> tuple[float, float, list[float]]:
    """Decades (log10) covering ``[lo, hi]`` (both > 0) and a tick at every decade (or every k-th)."""
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    if a == b:
        a, b = a - 1, b + 1
    stride = max(1, math.ceil((b - a) / 6))
    return float(a), float(b), [float(k) for k in range(a, b + 1, stride)]


def tick_label(value: float, log: bool = False) -> str:
    """``300000`` -> ``"300k"``, ``2.5e6`` -> ``"2.5M"``, ``0.001`` -> ``"0.001"``; log ticks as ``1e-3``."""
    if log:
        return f"1e{int(round(value))}"
    if value == 0:
        return "0"
    for scale, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.4g}{suffix}"
    return f"{value:.3g}"


def _finite(value: Any) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------------------------------------
# One chart
# ---------------------------------------------------------------------------------------------


def _font(size: int = 11) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: only the bitmap font
        return ImageFont.load_default()


def _segments(series: Series, log_y: bool) -> list[list[tuple[float, float]]]:
    """Runs of consecutive drawable points; a gap (None, NaN, inf, ≤ 0 on a log axis) ends a run."""
    runs: list[list[tuple[float, float]]] = [[]]
    for x, y in zip(series.x, series.y, strict=True):
        if _finite(x) and _finite(y) and (y > 0 or not log_y):
            runs[-1].append((float(x), float(y)))
        elif runs[-1]:
            runs.append([])
    return [run for run in runs if run]


def draw_chart(
    draw: ImageDraw.ImageDraw,
    box: tuple[int, int, int, int],
    title: str,
    series: Sequence[Series],
    *,
    log_y: bool | None = None,
    x_label: str = "step",
) -> Axes | None:
    """Draw a titled line chart with axes, tick labels, grid and legend inside ``box`` (x0, y0, x1, y1).

    ``log_y=None`` chooses: logarithmic when every value is positive and max/min > ``LOG_RATIO``.
    Returns the plot area and ranges, or None when no series has a drawable point ("no data").
    """
    font = _font()
    x0, y0, x1, y1 = box
    draw.text((x0 + MARGINS[0], y0 + 4), title, fill=TEXT, font=font)
    points = [(x, y) for s in series for x, y in zip(s.x, s.y, strict=True) if _finite(x) and _finite(y)]
    if log_y is None:
        ys = [y for _, y in points]
        log_y = bool(ys) and min(ys) > 0 and max(ys) / min(ys) > LOG_RATIO
    if log_y:
        points = [(x, y) for x, y in points if y > 0]
    axes = Axes(x0 + MARGINS[0], y0 + MARGINS[1], x1 - MARGINS[2], y1 - MARGINS[3], (0.0, 1.0), (0.0, 1.0), log_y)
    draw.rectangle((axes.left, axes.top, axes.right, axes.bottom), outline=AXIS)
    if not points:
        draw.text((axes.left + 8, axes.top + 8), "no data", fill=TEXT, font=font)
        return None
    xs, ys = [x for x, _ in points], [y for _, y in points]
    x_lo, x_hi, x_ticks = nice_range(min(xs), max(xs))
    if log_y:
        y_lo, y_hi, y_ticks = log_range(min(ys), max(ys))
    else:
        y_lo, y_hi, y_ticks = nice_range(min(ys), max(ys))
    axes.x_range, axes.y_range = (x_lo, x_hi), (y_lo, y_hi)
    _draw_ticks(draw, axes, x_ticks, y_ticks, font, x_label)
    _draw_legend(draw, axes, series, font)
    for index, s in enumerate(series):
        color = COLORS[index % len(COLORS)]
        runs = _segments(s, log_y)
        for run in runs:
            pixels = [axes.pixel(x, y) for x, y in run]
            if len(pixels) > 1:
                draw.line(pixels, fill=color, width=LINE_WIDTH, joint="curve")
        if sum(len(run) for run in runs) <= MARKER_MAX_POINTS:
            for run in runs:
                for col, row in (axes.pixel(x, y) for x, y in run):
                    draw.rectangle((col - 2, row - 2, col + 2, row + 2), fill=color)
    return axes


def _draw_ticks(
    draw: ImageDraw.ImageDraw, axes: Axes, x_ticks: list[float], y_ticks: list[float], font: Any, x_label: str
) -> None:
    """Grid lines, tick marks and labels of both axes, and the x axis label."""
    for value in x_ticks:
        col, _ = axes.pixel(value, 10 ** axes.y_range[0] if axes.log_y else axes.y_range[0])
        draw.line((col, axes.top + 1, col, axes.bottom - 1), fill=GRID)
        draw.line((col, axes.bottom, col, axes.bottom + 4), fill=AXIS)
        label = tick_label(value)
        width = draw.textlength(label, font=font)
        draw.text((col - width / 2, axes.bottom + 6), label, fill=TEXT, font=font)
    for value in y_ticks:
        _, row = axes.pixel(axes.x_range[0], 10**value if axes.log_y else value)
        draw.line((axes.left + 1, row, axes.right - 1, row), fill=GRID)
        draw.line((axes.left - 4, row, axes.left, row), fill=AXIS)
        label = tick_label(value, axes.log_y)
        width = draw.textlength(label, font=font)
        draw.text((axes.left - 7 - width, row - 7), label, fill=TEXT, font=font)
    width = draw.textlength(x_label, font=font)
    draw.text((axes.right - width, axes.bottom + 19), x_label, fill=TEXT, font=font)
    draw.rectangle((axes.left, axes.top, axes.right, axes.bottom), outline=AXIS)


def _draw_legend(draw: ImageDraw.ImageDraw, axes: Axes, series: Sequence[Series], font: Any) -> None:
    """Colour swatches and labels in one row above the plot area (left to right, cut at the edge)."""
    col: float = axes.left  # advances by text widths (float)
    row = axes.top - 18
    for index, s in enumerate(series):
        width = 14 + draw.textlength(s.label, font=font) + 12
        if col + width > axes.right + MARGINS[2] and index:
            break
        draw.rectangle((col, row + 4, col + 10, row + 10), fill=COLORS[index % len(COLORS)])
        draw.text((col + 14, row), s.label, fill=TEXT, font=font)
        col += width


# ---------------------------------------------------------------------------------------------
# A run's curves
# ---------------------------------------------------------------------------------------------


def read_stats(path: str | os.PathLike[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(tick records, metric records)`` of a ``stats.jsonl``, each sorted by step, one per step
    (a later line for the same step replaces an earlier one). Torn or invalid lines are skipped."""
    ticks: dict[int, dict[str, Any]] = {}
    metrics: dict[int, dict[str, Any]] = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(record, dict) or not _finite(record.get("step")):
                continue
            step = int(record["step"])
            if record.get("kind") == "metrics":
                metrics.setdefault(step, {}).update(record)  # evaluations of one step may come in parts
            else:
                ticks[step] = record
    return [ticks[k] for k in sorted(ticks)], [metrics[k] for k in sorted(metrics)]


def _column(records: Sequence[Mapping[str, Any]], key: str, label: str | None = None) -> Series:
    """The series of ``key`` over the records' steps (None where a record lacks it)."""
    return Series(label or key, [r["step"] for r in records], [r.get(key) for r in records])


_SAMPLER_PREFIX = re.compile(r"^(\d+_step)_(.+)$")
_RECORD_FIELDS = ("step", "time", "kind", "tick")


def training_panels(
    ticks: Sequence[Mapping[str, Any]], metrics: Sequence[Mapping[str, Any]]
) -> list[tuple[str, list[Series]]]:
    """The panels of :func:`plot_training_curves`: ``(title, series)`` in drawing order."""
    panels = []
    for title, name in (
        ("terminal-velocity loss by t bin", "Loss/terminal_loss"),
        ("flow-matching loss by t bin", "Loss/fm_loss"),
    ):
        panels.append((title, [_column(ticks, f"{name}_q{k}", f"q{k}") for k in range(4)]))
    panels.append(("gradient norm (before clipping)", [_column(ticks, "Loss/grad_norm", "grad norm")]))
    panels.append(("throughput (img/s)", [_column(ticks, "img_per_sec", "img/s")]))
    groups: dict[str, list[Series]] = {}
    keys = sorted({k for r in metrics for k in r if k not in _RECORD_FIELDS})
    for key in keys:
        match = _SAMPLER_PREFIX.match(key)
        sampler, value = (match.group(1), match.group(2)) if match else (key, key)
        groups.setdefault(value, []).append(_column(metrics, key, sampler))
    panels += [(f"metric {value}", lines) for value, lines in groups.items()]
    return panels


def render_training_curves(
    stats_jsonl: str | os.PathLike[str], panel_size: tuple[int, int] = PANEL_SIZE, columns: int = COLUMNS
) -> tuple[Image.Image, dict[str, Axes | None]]:
    """The image of :func:`plot_training_curves` and each panel's axes by title (None: no data)."""
    ticks, metrics = read_stats(stats_jsonl)
    panels = training_panels(ticks, metrics)
    rows = math.ceil(len(panels) / columns)
    width, height = panel_size
    image = Image.new("RGB", (columns * width, rows * height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    placed = {}
    for index, (title, lines) in enumerate(panels):
        left, top = (index % columns) * width, (index // columns) * height
        placed[title] = draw_chart(draw, (left, top, left + width, top + height), title, lines)
    return image, placed


def plot_training_curves(stats_jsonl: str | os.PathLike[str], out_png: str | os.PathLike[str]) -> Path:
    """Write the run's curves (losses by t bin, gradient norm, img/s, metrics over steps) as a PNG.

    The file is replaced atomically (written next to it, then renamed), so a reader or a killed
    process never leaves a torn image. Returns the path.
    """
    image, _ = render_training_curves(stats_jsonl)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        image.save(partial, format="PNG")
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return out
