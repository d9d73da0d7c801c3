"""Small plots as ComfyUI IMAGE tensors, drawn with Pillow (ComfyUI ships Pillow, not matplotlib):
a line chart (loss / reward curves) and the picture of a parameter table."""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from epd_core.compare import measured_text
from epd_core.sampling.picture import MatrixPicture, PointsPicture
from epd_core.tables.params import EPDParams

BG, FG, GRID, ACCENT = (255, 255, 255), (30, 30, 30), (225, 225, 225), (31, 119, 180)
MAX_DRAWN_STEPS, MAX_DRAWN_POINTS = 64, 16  # a table may have 4096 steps x 64 points: draw a bounded picture


def _font(size=14):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def to_image_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> ComfyUI IMAGE (1, H, W, 3) float in [0, 1]."""
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)[None]


def line_chart(series: dict[str, list[float]], title: str, xlabel: str = "iteration", log_y: bool = False,
               size=(720, 420)) -> Image.Image:
    """One or more curves on shared axes; log_y for losses spanning decades."""
    w, h = size
    img = Image.new("RGB", size, BG)
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 70, w - 20, 40, h - 45
    d.text((left, 10), title, fill=FG, font=_font(16))
    vals = [v for s in series.values() for v in s if math.isfinite(v) and (v > 0 or not log_y)]
    if not vals:
        d.text((left, h // 2), "no data yet", fill=FG, font=_font())
        return img
    f = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    lo, hi = f(min(vals)), f(max(vals))
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    n = max(len(s) for s in series.values())
    for i in range(5):  # horizontal grid with labels
        yv = lo + (hi - lo) * i / 4
        y = bottom - (bottom - top) * i / 4
        d.line([(left, y), (right, y)], fill=GRID)
        d.text((5, y - 7), f"{10 ** yv:.3g}" if log_y else f"{yv:.3g}", fill=FG, font=_font(12))
    d.rectangle([left, top, right, bottom], outline=FG)
    d.text(((left + right) // 2 - 30, h - 25), xlabel, fill=FG, font=_font(12))
    d.text((left, bottom + 5), "0", fill=FG, font=_font(12))
    d.text((right - 30, bottom + 5), str(max(n - 1, 0)), fill=FG, font=_font(12))
    colors = [ACCENT, (214, 39, 40), (44, 160, 44), (148, 103, 189)]
    for j, (name, s) in enumerate(series.items()):
        pts = [(left + (right - left) * i / max(n - 1, 1), bottom - (bottom - top) * (f(v) - lo) / (hi - lo))
               for i, v in enumerate(s) if math.isfinite(v) and (v > 0 or not log_y)]
        col = colors[j % len(colors)]
        if len(pts) > 1:
            d.line(pts, fill=col, width=2)
        elif pts:
            d.ellipse([pts[0][0] - 3, pts[0][1] - 3, pts[0][0] + 3, pts[0][1] + 3], fill=col)
        d.text((right - 160, top + 8 + 16 * j), f"- {name}", fill=col, font=_font(12))
    return img


def table_picture(params: EPDParams, sigmas: torch.Tensor | None = None, width: int = 900) -> Image.Image:
    """The table as its variant describes it (registry entry's `picture`): K points per step on a log-sigma axis
    (points_picture) or a lower-triangular grid of weights (matrix_picture). At most MAX_DRAWN_STEPS steps and
    MAX_DRAWN_POINTS points per step are drawn; a line says what was left out, so the picture's size is bounded
    whatever the table."""
    pic = params.variant.picture(params, sigmas)
    if isinstance(pic, MatrixPicture):
        return matrix_picture(params, pic, width)
    return points_picture(params, pic, sigmas, width)


def points_picture(params: EPDParams, pic: PointsPicture, sigmas=None, width: int = 900) -> Image.Image:
    """Per step i, the K points between sigma_i and sigma_{i+1} on a log-sigma axis: a dot at t_k sized and
    coloured as the variant says, its labels beside, and the table's held-out measurement above."""
    total_n, total_k = pic.r.shape
    n, k = min(total_n, MAX_DRAWN_STEPS), min(total_k, MAX_DRAWN_POINTS)
    if sigmas is None:
        sigmas = params.schedule_sigmas
    if sigmas is not None:
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64)[:n + 1]
    measured = measured_text(params.metadata.get("measured"))
    # the verdicts at equal calls and at equal time, wrapped (at most 3 lines, the last one shortened)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    said = wrap(probe, measured, width - 20, _font(12)) if measured else []
    if len(said) > 3:
        said = said[:2] + [_fit(probe, " ".join(said[2:]), width - 20, _font(12))]
    row_h, top, left, right = 46, 60 + 20 * len(said), 90, width - 290
    img = Image.new("RGB", (width, top + row_h * n + 30 + (20 if (n, k) != (total_n, total_k) else 0)), BG)
    d = ImageDraw.Draw(img)
    d.text((10, 8), f"{pic.heading} table: {params.describe()}", fill=FG, font=_font(15))
    d.text((10, 30), pic.caption, fill=(90, 90, 90), font=_font(12))
    for i, line in enumerate(said):  # the EPD Trainer's held-out comparison with the best built-in
        d.text((10, 50 + 20 * i), line, fill=(214, 39, 40) if "NOT" in measured else (44, 120, 44), font=_font(12))
    if sigmas is not None:
        logs = torch.as_tensor(sigmas, dtype=torch.float64).log()
        lo, hi = float(logs.min()), float(logs.max())
        xpos = lambda ls: left + (right - left) * (hi - ls) / max(hi - lo, 1e-12)  # noqa: E731
    for i in range(n):
        y = top + row_h * i + row_h // 2
        if sigmas is not None:
            x0, x1 = xpos(float(logs[i])), xpos(float(logs[i + 1]))
            d.text((5, y - 7), f"s={float(sigmas[i]):.3g}", fill=FG, font=_font(12))
        else:  # schedule not recorded: each step drawn on its own unit interval
            x0, x1 = left, right
            d.text((5, y - 7), f"step {i}", fill=FG, font=_font(12))
        d.line([(x0, y), (x1, y)], fill=(150, 150, 150), width=2)
        for xe in (x0, x1):
            d.line([(xe, y - 6), (xe, y + 6)], fill=FG, width=1)
        for j in range(k):
            x = x0 + (x1 - x0) * float(pic.r[i, j])  # log t_k is r of the way from log t_cur to log t_next
            rad = 3 + 9 * float(pic.size[i, j])
            t = float(pic.colour[i, j]) if pic.colour is not None else 0.0
            end = (220, 60, 50) if t > 0 else (50, 90, 220)  # diverging: grey at 0
            col = tuple(int(160 + (e - 160) * abs(t)) for e in end)
            d.ellipse([x - rad, y - rad, x + rad, y + rad], fill=col, outline=FG)
        labels = pic.labels(i)
        d.text((right + 15, y - 7 * min(len(labels), 3)), "\n".join(labels[:3]) + ("\n..." if len(labels) > 3 else ""),
               fill=FG, font=_font(11))
    if (n, k) != (total_n, total_k):
        d.text((10, top + row_h * n + 20), f"showing the first {n} of {total_n} steps and {k} of {total_k} points "
                                           "per step", fill=(90, 90, 90), font=_font(12))
    return img


def matrix_picture(params: EPDParams, pic: MatrixPicture, width: int = 900) -> Image.Image:
    """Per step i a row of cells, the weights of the directions d_0 .. d_i (red > 0 > blue, the value written in
    where the cells are large enough), the variant's text beside the row."""
    total = pic.matrix.shape[0]
    n = min(total, MAX_DRAWN_STEPS)
    cell = max(16, min(56, (width - 420) // max(n, 1)))
    top, left = 60, 10
    img = Image.new("RGB", (width, top + cell * n + 40 + (20 if n < total else 0)), BG)
    d = ImageDraw.Draw(img)
    d.text((10, 8), f"{pic.heading} table: {params.describe()}", fill=FG, font=_font(15))
    d.text((10, 30), pic.caption, fill=(90, 90, 90), font=_font(12))
    for i in range(n):
        y = top + cell * i
        for j in range(min(i + 1, n)):
            v = float(pic.matrix[i, j])
            t = max(-1.0, min(1.0, v / pic.full_colour))
            end = (220, 60, 50) if t > 0 else (50, 90, 220)
            col = tuple(int(255 + (e - 255) * abs(t)) for e in end)
            x = left + cell * j
            d.rectangle([x, y, x + cell - 2, y + cell - 2], fill=col, outline=GRID)
            if cell >= 40:
                d.text((x + 3, y + cell // 2 - 7), f"{v:.2f}", fill=FG, font=_font(11))
        d.text((left + cell * n + 15, y + cell // 2 - 7), pic.labels(i), fill=FG, font=_font(12))
    if n < total:
        d.text((10, top + cell * n + 20), f"showing the first {n} of {total} steps", fill=(90, 90, 90),
               font=_font(12))
    return img


COLORS = [(214, 39, 40), ACCENT, (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75)]


def _fit(d: ImageDraw.ImageDraw, text: str, width: float, font) -> str:
    """`text` shortened with '...' to at most `width` pixels."""
    if d.textlength(text, font=font) <= width:
        return text
    while text and d.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def wrap(d: ImageDraw.ImageDraw, text: str, width: float, font) -> list[str]:
    """`text` in lines of at most `width` pixels, broken after spaces, '/', '_' or ',' where possible, else
    anywhere: a label is never cut off."""
    lines, line = [], ""
    for ch in text:
        if d.textlength(line + ch, font=font) <= width or not line:
            line += ch
            continue
        cut = max(line.rfind(c) for c in " /_,")
        if cut > 0:
            lines.append(line[:cut + 1].rstrip())
            line = line[cut + 1:].lstrip() + ch
        else:
            lines.append(line)
            line = ch
    return lines + [line] if line else lines


def _panel(d: ImageDraw.ImageDraw, box, series: dict[str, list[tuple[float, float]]], xlabel: str, xticks,
           lo: float, hi: float, labels: list[tuple[float, float, str, tuple]] = ()):
    """One panel: curves of (x, y > 0) points on a log-y axis [lo, hi] (log10), x ticks [(x, text)]; the first
    series dashed black. `labels` [(x, y, text, colour)] writes short texts beside points, on whichever side of
    the point they fit inside the panel."""
    left, top, right, bottom = box
    xs = [x for x, _ in xticks] + [x for pts in series.values() for x, _ in pts]
    x0, x1 = min(xs), max(xs)
    pad = max(x1 - x0, 1e-12) * 0.08 if x1 > x0 else max(abs(x0), 1.0) * 0.5
    x0, x1 = x0 - pad, x1 + pad
    px = lambda x: left + (right - left) * (x - x0) / (x1 - x0)  # noqa: E731
    py = lambda v: bottom - (bottom - top) * (math.log10(v) - lo) / (hi - lo)  # noqa: E731
    for i in range(5):
        y = bottom - (bottom - top) * i / 4
        d.line([(left, y), (right, y)], fill=GRID)
        text = f"{10 ** (lo + (hi - lo) * i / 4):.3g}"
        d.text((left - 6 - d.textlength(text, font=_font(12)), y - 7), text, fill=FG, font=_font(12))
    for x, text in xticks:
        d.line([(px(x), bottom), (px(x), bottom + 4)], fill=FG)
        d.text((px(x) - d.textlength(text, font=_font(12)) / 2, bottom + 6), text, fill=FG, font=_font(12))
    d.rectangle([left, top, right, bottom], outline=FG)
    d.text(((left + right - d.textlength(xlabel, font=_font(12))) / 2, bottom + 24), xlabel, fill=FG, font=_font(12))
    for j, (name, pts) in enumerate(series.items()):
        pts = [(px(x), py(v)) for x, v in pts if math.isfinite(v) and v > 0 and math.isfinite(x)]
        col = FG if j == 0 else COLORS[(j - 1) % len(COLORS)]
        if j == 0:  # dashed
            for a, b in zip(pts, pts[1:]):
                for t in range(0, 10, 2):
                    d.line([(a[0] + (b[0] - a[0]) * t / 10, a[1] + (b[1] - a[1]) * t / 10),
                            (a[0] + (b[0] - a[0]) * (t + 1) / 10, a[1] + (b[1] - a[1]) * (t + 1) / 10)],
                           fill=col, width=2)
        elif len(pts) > 1:
            d.line(pts, fill=col, width=3)
        for x, y in pts:
            d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=col)
    for x, v, text, col in labels:
        if not (math.isfinite(v) and v > 0 and math.isfinite(x)):
            continue
        width = d.textlength(text, font=_font(10))
        tx = px(x) + 6 if px(x) + 6 + width <= right - 2 else px(x) - 6 - width
        d.text((max(left + 2, tx), min(py(v) + 4, bottom - 14)), text, fill=col, font=_font(10))


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About `count` round values covering [lo, hi]."""
    span = max(hi - lo, abs(hi) * 1e-3, 1e-12)
    step = 10 ** math.floor(math.log10(span / count))
    step *= next(m for m in (1, 2, 5, 10) if span / (step * m) <= count)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def nfe_chart(series: dict[str, dict[int, float]], title: str, labels: dict[int, str] | None = None,
              ylabel: str = "RMSE to the reference", times: dict[str, dict[int, float]] | None = None,
              width: int = 960) -> Image.Image:
    """Curves of an error (y: log scale) over latency NFE, one per series name ({NFE: value}); the first series is
    drawn dashed black (the best built-in) and `labels` writes a short text at its points. With `times` ({series
    name: {NFE: seconds per image}}) a second panel beside it plots the same errors against the time per image,
    each point labelled with its NFE. The legend runs under the panels, so the panels use the whole width of the
    picture."""
    vals = [v for s in series.values() for v in s.values() if math.isfinite(v) and v > 0]
    xs = sorted({n for s in series.values() for n in s})
    timed = {name: {n: t for n, t in (times or {}).get(name, {}).items() if t is not None and n in series[name]}
             for name in series}
    two = any(timed.values())
    font = _font(12)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    legend, x, y = [], 20, 0  # entries flow left to right under the panels, a new line when one is full
    for j, name in enumerate(series):
        text = _fit(probe, f"{'--' if j == 0 else '-'} {name}", width - 40, font)
        w = probe.textlength(text, font=font)
        if x > 20 and x + w > width - 20:
            x, y = 20, y + 18
        legend.append((x, y, text, FG if j == 0 else COLORS[(j - 1) % len(COLORS)]))
        x += w + 36
    rows = y // 18 + 1
    top, panel_h = 58, 300
    bottom = top + panel_h
    h = bottom + 48 + 18 * rows + 12
    img = Image.new("RGB", (width, h), BG)
    d = ImageDraw.Draw(img)
    d.text((20, 8), title, fill=FG, font=_font(16))
    d.text((20, 32), f"{ylabel} (log scale; lower is better)", fill=(90, 90, 90), font=font)
    if not vals or not xs:
        d.text((20, h // 2), "nothing measured", fill=FG, font=_font())
        return img
    lo, hi = math.log10(min(vals)), math.log10(max(vals))
    pad = max(hi - lo, 0.2) * 0.08
    lo, hi = lo - pad, hi + pad
    gap, margin = 70, 62
    panel_w = (width - margin - 20 - (gap if two else 0)) / (2 if two else 1)
    nfe_box = (margin, top, margin + panel_w, bottom)
    first = next(iter(series))
    _panel(d, nfe_box, {name: sorted(s.items()) for name, s in series.items()},
           "latency NFE (sequential model calls per image)", [(n, str(n)) for n in xs], lo, hi,
           [(n, series[first][n], text, (90, 90, 90)) for n, text in (labels or {}).items() if n in series[first]])
    if two:
        seconds = [t for s in timed.values() for t in s.values()]
        unit, scale = ("ms", 1000.0) if max(seconds) < 1 else ("s", 1.0)
        ticks = [(t / scale, f"{t:g}") for t in _ticks(min(seconds) * scale, max(seconds) * scale)]
        _panel(d, (nfe_box[2] + gap, top, width - 20, bottom),
               {name: [(timed[name][n], series[name][n]) for n in sorted(timed[name])] for name in series},
               f"time per image ({unit}, median on this device)", ticks, lo, hi,
               [(t, series[name][n], f"NFE {n}", (90, 90, 90) if j == 0 else COLORS[(j - 1) % len(COLORS)])
                for j, name in enumerate(series) for n, t in timed[name].items()])
    for x, y, text, col in legend:
        d.text((x, bottom + 48 + y), text, fill=col, font=font)
    return img
