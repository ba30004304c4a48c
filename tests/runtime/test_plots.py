"""Training curves drawn with Pillow (tvm/runtime/plots.py) and written by the run logger."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from tvm.runtime import run_logging as L
from tvm.runtime import plots
from tvm.runtime.plots import COLORS, Series, draw_chart, plot_training_curves, read_stats, render_training_curves


def _write_stats(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _tick(step: int, **values) -> dict:
    record = {"step": step, "time": 0.0, "tick": step // 100, "img_per_sec": 400.0, "Loss/grad_norm": 1.0}
    for k in range(4):
        record[f"Loss/terminal_loss_q{k}"] = 0.01 * (k + 1) / (1 + step / 100)
        record[f"Loss/fm_loss_q{k}"] = 1.8 - 0.1 * k
    return record | values


def _rows_of(image: Image.Image, col: int, color: tuple[int, int, int], axes: plots.Axes) -> list[int]:
    """Rows of the plot area where column ``col`` has ``color`` (the legend above it excluded)."""
    pixels = np.asarray(image)[axes.top : axes.bottom + 1, col, :]
    return [axes.top + int(r) for r in np.nonzero((pixels == np.array(color)).all(axis=1))[0]]


def _chart(series: list[Series], size=(400, 300), **kwargs) -> tuple[Image.Image, plots.Axes | None]:
    image = Image.new("RGB", size, (255, 255, 255))
    axes = draw_chart(ImageDraw.Draw(image), (0, 0, *size), "test", series, **kwargs)
    return image, axes


def test_png_has_the_panel_grid_size_and_the_line_colours(tmp_path: Path) -> None:
    records = [_tick(100 * i) for i in range(1, 31)]
    records.insert(
        0,
        {
            "step": 0,
            "time": 0.0,
            "kind": "metrics",
            "1_step_digits_frechet": 11.0,
            "2_step_digits_frechet": 10.5,
            "1_step_digits_accuracy": 0.1,
        },
    )
    records.append(
        {
            "step": 3000,
            "time": 0.0,
            "kind": "metrics",
            "1_step_digits_frechet": 0.6,
            "2_step_digits_frechet": 0.62,
            "1_step_digits_accuracy": 1.0,
        }
    )
    out = plot_training_curves(_write_stats(tmp_path / "stats.jsonl", records), tmp_path / "run" / "curves.png")
    assert out == tmp_path / "run" / "curves.png" and not list(out.parent.glob(".*.tmp"))
    image = Image.open(out).convert("RGB")
    # 4 training panels + 2 metric panels (digits_accuracy, digits_frechet), 3 per row of 420 x 270
    assert image.size == (3 * 420, 2 * 270)
    pixels = np.asarray(image).reshape(-1, 3)
    for color in COLORS[:4]:  # the four time bins' lines (and the samplers' in the metric panels)
        assert (pixels == np.array(color)).all(axis=1).sum() > 200, color


def test_a_curve_of_known_values_lands_on_the_expected_rows() -> None:
    x = list(range(101))
    image, axes = _chart([Series("line", x, [v / 10 for v in x])])  # 0 .. 10: y axis 0 .. 10, x axis 0 .. 100
    assert axes is not None and axes.y_range == (0.0, 10.0) and axes.x_range == (0.0, 100.0)
    for value in (0, 25, 50, 75, 100):
        col = round(axes.left + value / 100 * (axes.right - axes.left))
        expected = axes.bottom - (value / 10) / 10 * (axes.bottom - axes.top)
        rows = _rows_of(image, col, COLORS[0], axes)
        assert rows and abs(np.mean(rows) - expected) <= 1.5, (value, rows, expected)


def test_a_log_axis_puts_decades_at_equal_heights() -> None:
    values = [1e-4 * 10 ** (3 * i / 60) for i in range(61)]  # 1e-4 .. 1e-1: ratio 1000 > LOG_RATIO
    image, axes = _chart([Series("loss", list(range(61)), values)])
    assert axes.log_y and axes.y_range == (-4.0, -1.0)
    for i in (0, 20, 40, 60):  # 1e-4, 1e-3, 1e-2, 1e-1 at 0, 1/3, 2/3 and all of the height
        col = round(axes.left + i / 60 * (axes.right - axes.left))
        expected = axes.bottom - i / 60 * (axes.bottom - axes.top)
        rows = _rows_of(image, col, COLORS[0], axes)
        assert rows and abs(np.mean(rows) - expected) <= 1.5, (i, rows, expected)


def test_gaps_single_points_and_empty_series() -> None:
    gappy = Series("gappy", [0, 1, 2, 3, 4, 5, 6], [1.0, None, 3.0, float("nan"), 5.0, float("inf"), 2.0])
    single = Series("single", [3], [4.0])
    image, axes = _chart([gappy, single])
    assert axes is not None and axes.y_range == (1.0, 5.0)
    col, row = axes.pixel(3, 4.0)
    assert image.getpixel((col, row)) == COLORS[1]  # the lone point is drawn as a marker
    col, row = axes.pixel(1, 2.0)  # between 1.0 at x=0 and 3.0 at x=2 there is a gap: no line
    assert _rows_of(image, col, COLORS[0], axes) == []
    _, nothing = _chart([Series("none", [1, 2], [None, float("nan")])])
    assert nothing is None
    _, flat = _chart([Series("flat", [5], [0.0])])  # one point at zero: the range is widened around it
    assert flat.y_range[0] < 0 < flat.y_range[1] and flat.x_range[0] < 5 < flat.x_range[1]


def test_read_stats_replaces_redone_steps_and_skips_torn_lines(tmp_path: Path) -> None:
    path = _write_stats(
        tmp_path / "stats.jsonl",
        [
            _tick(100, img_per_sec=1.0),
            _tick(200, img_per_sec=2.0),
            _tick(200, img_per_sec=3.0),  # redone after a restart from the checkpoint at step 100
            {"step": 200, "kind": "metrics", "1_step_fid50k_full_fid": 9.0},
            {"step": 200, "kind": "metrics", "is50k_mean": 5.0},
        ],
    )
    with open(path, "a") as handle:
        handle.write('{"step": 300, "img_per')  # torn by a kill
    ticks, metrics = read_stats(path)
    assert [(r["step"], r["img_per_sec"]) for r in ticks] == [(100, 1.0), (200, 3.0)]
    assert len(metrics) == 1 and metrics[0]["1_step_fid50k_full_fid"] == 9.0 and metrics[0]["is50k_mean"] == 5.0
    titles = [title for title, _ in plots.training_panels(ticks, metrics)]
    assert titles[4:] == ["metric fid50k_full_fid", "metric is50k_mean"]


def test_an_empty_stats_file_gives_the_four_empty_panels(tmp_path: Path) -> None:
    image, placed = render_training_curves(_write_stats(tmp_path / "stats.jsonl", []))
    assert image.size == (3 * 420, 2 * 270) and set(placed.values()) == {None}


def test_the_run_logger_redraws_the_curves_after_each_record(tmp_path: Path) -> None:
    with L.RunLogger(tmp_path, rank=0) as logger:
        logger.log_stats(_tick(100, img_per_sec=100.0), step=100, tick=1)
        png = tmp_path / L.CURVES_FILE
        first = png.read_bytes()
        logger.log_stats(_tick(200, img_per_sec=200.0), step=200, tick=2)
        assert png.read_bytes() != first
    image, placed = render_training_curves(tmp_path / "stats.jsonl")
    axes = placed["throughput (img/s)"]
    (x0, x1), (y0, y1) = axes.x_range, axes.y_range
    for step, value in ((100, 100.0), (200, 200.0)):  # known img/s at their expected rows
        col = round(axes.left + (step - x0) / (x1 - x0) * (axes.right - axes.left))
        expected = axes.bottom - (value - y0) / (y1 - y0) * (axes.bottom - axes.top)
        assert any(abs(r - expected) <= 1.5 for r in _rows_of(image, col, COLORS[0], axes)), (step, expected)


def test_a_plotting_failure_warns_once_and_the_run_goes_on(tmp_path: Path, monkeypatch) -> None:
    calls = []

    def broken(*args):
        calls.append(args)
        raise OSError("no space left on device")

    monkeypatch.setattr(L, "plot_training_curves", broken)
    with L.RunLogger(tmp_path, rank=0) as logger, pytest.warns(RuntimeWarning, match="training_curves.png"):
        logger.log_stats({"x": 1.0}, step=1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            logger.log_stats({"x": 2.0}, step=2)  # switched off: no second attempt, no second warning
    assert len(calls) == 1 and len((tmp_path / "stats.jsonl").read_text().splitlines()) == 2
    assert not (tmp_path / L.CURVES_FILE).exists()


def test_other_ranks_draw_nothing(tmp_path: Path) -> None:
    with L.RunLogger(tmp_path / "run", rank=1) as logger:
        logger.log_stats({"x": 1.0}, step=1)
    assert not (tmp_path / "run").exists()


def test_tick_labels_and_nice_ranges() -> None:
    assert [plots.tick_label(v) for v in (0, 0.001, 2.5, 1500, 300000, 2.5e6)] == [
        "0",
        "0.001",
        "2.5",
        "1.5k",
        "300k",
        "2.5M",
    ]
    assert plots.tick_label(-3.0, log=True) == "1e-3"
    assert plots.nice_range(0.0, 10.0) == (0.0, 10.0, [0.0, 2.0, 4.0, 6.0, 8.0, 10.0])
    lo, hi, ticks = plots.nice_range(0.013, 0.047)
    assert lo <= 0.013 and hi >= 0.047 and all(math.isclose(b - a, 0.01) for a, b in zip(ticks, ticks[1:]))
