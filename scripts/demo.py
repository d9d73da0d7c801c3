"""The one-command demo: a real ComfyUI, started headless, runs the shipped side-by-side workflow (EPD-MS, EPD,
the best built-in, euler and dpmpp_2m at equal NFE on the pack's 28x28 MNIST model, and a 100-step reference from
the same seeds, at CFG 1 and CFG 5); then a quick quality-vs-NFE benchmark of the same model is plotted.
Everything lands in out/demo/ (override with --out)."""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a file: the repository root, for bench and epd_core
from bench.comfyui_server import ComfyServer, error_message  # noqa: E402

WORKFLOW = REPO / "workflows" / "api" / "epd_demo_side_by_side.json"


def run_workflow(out: Path) -> list[tuple[str, list[Path]]]:
    """Run the workflow; per Save Image node in the graph's order, its title (sampler, NFE, CFG) and its files."""
    base = out / "comfyui_base"
    shutil.rmtree(base, ignore_errors=True)
    graph = json.loads(WORKFLOW.read_text())
    with ComfyServer(base, with_test_nodes=False) as server:
        bar = tqdm(total=len(graph), desc="ComfyUI workflow", unit="node")
        done = set()

        def show(msg):
            data = msg.get("data", {})
            if msg["type"] == "progress":
                title = graph.get(str(data.get("node")), {}).get("_meta", {}).get("title", data.get("node"))
                bar.set_postfix_str(f"{title}: step {data['value']}/{data['max']}")
            elif msg["type"] in ("executed", "execution_cached"):
                for n in data.get("nodes", [data.get("node")]):
                    if n not in done:
                        done.add(n)
                        bar.update(1)
        entry = server.run(graph, on_message=show)
        bar.n = len(graph)
        bar.close()
        if entry["status"]["status_str"] != "success":
            raise SystemExit(f"workflow failed: {error_message(entry)}\n{server.log_tail()}")
        images = saved_images(graph, entry, server, out)
        log_lines = [line for line in server.log_path.read_text().splitlines() if "EPD:" in line]
    (out / "comfyui_epd_log.txt").write_text("\n".join(log_lines) + "\n")
    return images


def saved_images(graph: dict, entry: dict, server, out: Path) -> list[tuple[str, list[Path]]]:
    """The run's images copied to `out`: per Save Image node in the graph's order, its title and its files."""
    images = []
    for node_id in graph:
        files = []
        for img in entry["outputs"].get(node_id, {}).get("images", []):
            target = out / Path(img["filename"]).name
            shutil.copy(server.output_path(img), target)
            files.append(target)
        if files:
            images.append((graph[node_id].get("_meta", {}).get("title", node_id), files))
    return images


def side_by_side(out: Path, images: list[tuple[str, list[Path]]]) -> Path:
    """One labelled picture: a row of samples per Save Image node, labelled with its title (sampler, NFE, CFG);
    a gap between the CFG blocks."""
    from PIL import Image, ImageDraw, ImageFont
    rows = [(label, [Image.open(p) for p in sorted(files)]) for label, files in images]
    w, h = rows[0][1][0].size
    font = ImageFont.load_default(size=13)
    label_w, gap = 300, 16
    blocks = [label.rsplit("CFG ", 1)[-1] for label, _ in rows]
    gaps = [gap * sum(a != b for a, b in zip(blocks, blocks[1:i + 1])) for i in range(len(rows))]
    grid = Image.new("RGB", (label_w + w * max(len(r) for _, r in rows), h * len(rows) + gaps[-1]), "white")
    draw = ImageDraw.Draw(grid)
    for y, ((label, ims), extra) in enumerate(zip(rows, gaps)):
        top = y * h + extra
        lines, line = [], ""  # word-wrapped: a long title stays inside the label column
        for word in label.split():
            if line and draw.textlength(f"{line} {word}", font=font) > label_w - 16:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}".strip()
        lines.append(line)
        draw.multiline_text((8, top + h // 2 - 8 * len(lines)), "\n".join(lines), fill="black", font=font)
        for x, im in enumerate(ims):
            grid.paste(im, (label_w + x * w, top))
    path = out / "side_by_side.png"
    grid.save(path)
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "out" / "demo")
    ap.add_argument("--samples", type=int, default=16, help="held-out samples in the quick benchmark")
    ap.add_argument("--skip-bench", action="store_true")
    args = ap.parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    images = run_workflow(args.out)
    print(f"workflow done in {time.time() - t0:.0f}s: {sum(len(f) for _, f in images)} images")
    grid = side_by_side(args.out, images)
    if not args.skip_bench:
        from bench import quality_vs_nfe
        print("quick quality-vs-NFE benchmark (full one: bench/quality_vs_nfe.py)...")
        # quick: the samplers that were best at some NFE in the full run, three schedulers (AlignYourSteps
        # included), a 200-step reference, no Frechet distance (bench/quality_vs_nfe.py --model mnist has it)
        quality_vs_nfe.main(["--model", "mnist", "--samples", str(args.samples), "--fit-samples", "8",
                             "--schedulers", "karras,normal,ays_sd1", "--fd-samples", "0",
                             "--samplers", "euler,dpmpp_2m,ipndm,uni_pc,gradient_estimation",
                             "--ref-steps", "200", "--out", str(args.out)])
        shutil.copy(args.out / "quality_vs_nfe_mnist.png", args.out / "quality_vs_nfe.png")
        shutil.copy(args.out / "quality_vs_nfe_mnist.md", args.out / "quality_vs_nfe.md")
    print(f"\nDone in {time.time() - t0:.0f}s. Results in {args.out}:")
    print(f"  images: {sum(len(f) for _, f in images)} files in {args.out}, side by side: {grid}")
    print("  what ran:", args.out / "comfyui_epd_log.txt")
    if not args.skip_bench:
        print("  plot: ", args.out / "quality_vs_nfe.png")
        print("  table:", args.out / "quality_vs_nfe.md")


if __name__ == "__main__":
    main()
