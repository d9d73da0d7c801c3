"""Template-browser thumbnails (workflows/<name>.jpg, what the ComfyUI frontend shows on each template card)
from the screenshots tests/test_browser.py writes to out/browser/workflow_<name>.png, except where what the
workflow makes says more than its graph (OUTPUTS): there the card shows that picture.

    .venv/bin/python -m pytest tests/test_browser.py && .venv/bin/python scripts/make_thumbnails.py
    .venv/bin/python scripts/make_thumbnails.py epd_compare_demo epd_demo_side_by_side   # only these
"""
import sys
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# name -> (picture, crop box as fractions of it): EPD Compare's plot (epd_ms among the picks, against the best
# built-in at equal calls and at equal time; docs/screenshots/compare_plot.png is the shipped workflow's plot) and
# the demo's side-by-side at CFG 1 (scripts/demo.py writes it: epd_ms, epd, the built-ins and the reference,
# labelled with NFE and CFG), its first four samples.
OUTPUTS = {
    "epd_compare_demo": (REPO / "docs" / "screenshots" / "compare_plot.png", (0, 0, 1, 1)),
    "epd_demo_side_by_side": (REPO / "out" / "demo" / "side_by_side.png", (0, 0, None, 0.5)),
}


def from_output(picture: Path, box) -> Image.Image:
    if not picture.is_file():
        raise SystemExit(f"{picture} is missing: run the workflow first (docs/comfyui.md, scripts/demo.py)")
    img = Image.open(picture).convert("RGB")
    w, h = img.size
    left, top, right, bottom = box
    if right is None:  # the label column (300 px) and four samples of the side-by-side
        right = min(1.0, (300 + 4 * 112) / w)
    return img.crop((int(left * w), int(top * h), int(right * w), int(bottom * h)))


def main(names: list[str]):
    for ui in sorted((REPO / "workflows").glob("*.json")):
        if names and ui.stem not in names:
            continue
        if ui.stem in OUTPUTS:
            img = from_output(*OUTPUTS[ui.stem])
        else:
            shot = REPO / "out" / "browser" / f"workflow_{ui.stem}.png"
            if not shot.is_file():
                raise SystemExit(f"{shot} is missing: run tests/test_browser.py first")
            img = Image.open(shot).convert("RGB")
            w, h = img.size
            img = img.crop((int(0.04 * w), int(0.1 * h), int(0.84 * w), int(0.88 * h)))  # no sidebar, tabs, minimap
        img.thumbnail((512, 512))
        img.save(ui.with_suffix(".jpg"), quality=82, optimize=True)
        print("wrote", ui.with_suffix(".jpg").relative_to(REPO), img.size)


if __name__ == "__main__":
    main(sys.argv[1:])
