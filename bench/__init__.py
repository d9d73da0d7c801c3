"""Benchmarks behind the numbers in README.md and docs/results.md (quality_vs_nfe.py, ablation.py, speed.py,
cfg_transfer.py, ms_attribution.py, rl_demo.py, ...; their results in bench/results/), and the helpers they share
with tests/ and scripts/: ComfyUI imported in-process (comfy_runtime), a real headless ComfyUI server
(comfyui_server), pickles in the official predictors' format and hostile ones (official_pickle, hostile_pickles),
and random-weight SD1.5 / SDXL checkpoints (real_checkpoints). Run a script as a file from the repository root,
`.venv/bin/python bench/quality_vs_nfe.py --model gmm` (each puts the repository root on sys.path, nothing else);
elsewhere import it as a package with the repository root on sys.path: `from bench import quality_vs_nfe as Q`,
`from bench.comfyui_server import ComfyServer`.
"""
