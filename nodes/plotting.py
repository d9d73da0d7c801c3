"""Small plots as ComfyUI IMAGE tensors, drawn with Pillow (ComfyUI ships Pillow, not matplotlib):
a line chart (loss / reward curves) and the picture of a parameter table."""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from epd_core.compare import measured_text
from epd_core.params import EPDParams

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
    """Per step i, the K points between sigma_i and sigma_{i+1} on a log-sigma axis: a dot at t_k whose area
    is the weight w_k and whose colour is the direction scale c_k (blue < 1 < red), labelled r / w / c / a.
    At most MAX_DRAWN_STEPS steps (the first ones) and MAX_DRAWN_POINTS points per step are drawn; a line says
    what was left out, so the picture's size is bounded whatever the table."""
    act = {k: v.detach().double() for k, v in params.activated().items()}
    history = None
    if params.solver == "epd_ms":  # point 0 is the current point (r = 0); w are free coefficients; no c, a
        history = act["g"]
        act = {"r": torch.cat([torch.zeros_like(act["w"][:, :1]), act["r"]], 1), "w": act["w"],
               "c": torch.ones_like(act["w"]), "a": torch.ones_like(act["w"])}
    total_n, total_k = params.num_steps, params.num_points
    n, k = min(total_n, MAX_DRAWN_STEPS), min(total_k, MAX_DRAWN_POINTS)
    if sigmas is None:
        sigmas = params.schedule_sigmas
    if sigmas is not None:
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64)[:n + 1]
    measured = measured_text(params.metadata.get("measured"))
    row_h, top, left, right = 46, 60 + (20 if measured else 0), 90, width - 290
    img = Image.new("RGB", (width, top + row_h * n + 30 + (20 if (n, k) != (total_n, total_k) else 0)), BG)
    d = ImageDraw.Draw(img)
    d.text((10, 8), f"EPD table: {params.describe()}", fill=FG, font=_font(15))
    caption = ("dot: point t_k = t_next^r * t_cur^(1-r) on a log-sigma axis; dot area ~ weight w; colour = "
               "direction scale c (blue < 1 < red)") if history is None else (
        "EPD-MS: the current point (r = 0) and look-ahead points t_k in one call; dot area ~ |coefficient w|; "
        "g: coefficients of the last 3 directions")
    d.text((10, 30), caption, fill=(90, 90, 90), font=_font(12))
    if measured:  # the EPD Trainer's held-out comparison with the best built-in
        d.text((10, 50), measured[:150], fill=(214, 39, 40) if "NOT" in measured else (44, 120, 44), font=_font(12))
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
        labels = []
        for j in range(k):
            r, w, c, a = (float(act[name][i, j]) for name in "rwca")
            x = x0 + (x1 - x0) * r  # log t_k is r of the way from log t_cur to log t_next
            rad = 3 + 9 * math.sqrt(min(abs(w) / 2, 1.0) if history is not None else max(w, 0.0))
            t = max(-1.0, min(1.0, (c - 1) / max(params.scale_dir, 1e-9))) if params.scale_dir else 0.0
            end = (220, 60, 50) if t > 0 else (50, 90, 220)  # diverging: grey at c = 1
            col = tuple(int(160 + (e - 160) * abs(t)) for e in end)
            d.ellipse([x - rad, y - rad, x + rad, y + rad], fill=col, outline=FG)
            labels.append(f"r{r:.2f} w{w:.2f} c{c:.3f} a{a:.3f}" if history is None else f"r{r:.2f} w{w:+.3f}")
        if history is not None:  # EPD-MS: the coefficients of the last three directions
            labels.append("g " + " ".join(f"{float(v):+.3f}" for v in history[i]))
        d.text((right + 15, y - 7 * min(len(labels), 3)), "\n".join(labels[:3]) + ("\n..." if len(labels) > 3 else ""),
               fill=FG, font=_font(11))
    if (n, k) != (total_n, total_k):
        d.text((10, top + row_h * n + 20), f"showing the first {n} of {total_n} steps and {k} of {total_k} points "
                                           "per step", fill=(90, 90, 90), font=_font(12))
    return img


def nfe_chart(series: dict[str, dict[int, float]], title: str, labels: dict[int, str] | None = None,
              ylabel: str = "RMSE to the reference", size=(960, 480)) -> Image.Image:
    """Curves over latency NFE (x: the NFEs themselves, y: log scale), one per series name ({NFE: value}); the
    first series is drawn dashed black (the best built-in) and `labels` writes a short text at its points."""
    w, h = size
    img = Image.new("RGB", size, BG)
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 80, w - 290, 60, h - 55
    d.text((left, 8), title, fill=FG, font=_font(16))
    d.text((left, 32), f"{ylabel} (log scale; lower is better)", fill=(90, 90, 90), font=_font(12))
    vals = [v for s in series.values() for v in s.values() if math.isfinite(v) and v > 0]
    xs = sorted({n for s in series.values() for n in s})
    if not vals or not xs:
        d.text((left, h // 2), "nothing measured", fill=FG, font=_font())
        return img
    lo, hi = math.log10(min(vals)), math.log10(max(vals))
    pad = max(hi - lo, 0.2) * 0.08
    lo, hi = lo - pad, hi + pad
    x0, x1 = xs[0] - 0.5, xs[-1] + 0.5
    px = lambda n: left + (right - left) * (n - x0) / (x1 - x0)  # noqa: E731
    py = lambda v: bottom - (bottom - top) * (math.log10(v) - lo) / (hi - lo)  # noqa: E731
    for i in range(5):
        yv = lo + (hi - lo) * i / 4
        y = bottom - (bottom - top) * i / 4
        d.line([(left, y), (right, y)], fill=GRID)
        d.text((5, y - 7), f"{10 ** yv:.3g}", fill=FG, font=_font(12))
    for n in xs:
        d.line([(px(n), bottom), (px(n), bottom + 4)], fill=FG)
        d.text((px(n) - 4, bottom + 6), str(n), fill=FG, font=_font(12))
    d.rectangle([left, top, right, bottom], outline=FG)
    d.text(((left + right) // 2 - 150, h - 25), "latency NFE (sequential model calls per image)", fill=FG,
           font=_font(12))
    colors = [(214, 39, 40), ACCENT, (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75)]
    for j, (name, s) in enumerate(series.items()):
        pts = [(px(n), py(v)) for n, v in sorted(s.items()) if math.isfinite(v) and v > 0]
        col = FG if j == 0 else colors[(j - 1) % len(colors)]
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
        legend = name if len(name) <= 40 else name[:38] + "..."
        d.text((right + 12, top + 4 + 18 * j), f"{'--' if j == 0 else '-'} {legend}", fill=col, font=_font(12))
    first = next(iter(series.values()))
    for n, text in (labels or {}).items():
        if n in first and math.isfinite(first[n]) and first[n] > 0:
            d.text((px(n) + 6, py(first[n]) + 4), text, fill=(90, 90, 90), font=_font(10))
    return img
