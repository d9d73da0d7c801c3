"""Template-browser thumbnails (workflows/<name>.jpg, what the ComfyUI frontend shows on each template card)
from the screenshots tests/test_browser.py writes to out/browser/workflow_<name>.png.

    .venv/bin/python -m pytest tests/test_browser.py && .venv/bin/python scripts/make_thumbnails.py
"""
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def main():
    for ui in sorted((REPO / "workflows").glob("*.json")):
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
    main()
