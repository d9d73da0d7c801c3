"""Smoke test of bench/speed.py: it runs (--quick, a narrow UNet of SD1.5's shape) and reports every ratio.
Structure only: no assertion on any time (they depend on the machine and its load)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import torch

from bench import speed

REPO = Path(__file__).resolve().parents[1]


def positive(v):
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def test_quick_bench_reports_every_ratio(tmp_path):
    cmd = [sys.executable, str(REPO / "bench" / "speed.py"), "--device", "cpu", "--quick", "--sd-channels", "32",
           "--threads", "1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "speed_cpu.json").read_text())
    md = (tmp_path / "speed_cpu.md").read_text()
    assert md in proc.stdout  # the table printed is the table written

    ks = res["config"]["ks"]
    assert ks == [1, 2, 3]
    assert {(e["model"], e["batch"]) for e in res["steps"]} == {("demo", 1), ("sd15", 1)}
    for entry in res["steps"]:
        assert positive(entry["heun_vs_single"]) and positive(entry["single_ms"])
        assert sorted(int(k) for k in entry["K"]) == ks
        for K, ratios in entry["K"].items():
            assert set(ratios) == set(speed.expected_step_metrics(int(K))), (entry["model"], K)
            assert all(positive(v) for v in ratios.values()), (entry["model"], K, ratios)
            row = f"| {entry['model']} | {entry['latent']} | {entry['batch']} | {K} | {ratios['step_vs_single']:.2f} |"
            assert row in md

    assert set(res["overhead"]) == set(speed.OVERHEAD_MODELS)
    for name, v in res["overhead"].items():
        assert 0 < v["overhead_fraction"] < 1 and positive(v["outside_us_per_step"]), name
        assert v["model_calls"] == 19  # 10 steps: 9 EPD / Heun steps of 2 calls, then one Euler call to 0

    assert {(e["model"], e["batch"]) for e in res["memory"]} == {("demo", 1), ("sd15", 1)}
    for entry in res["memory"]:
        m = entry["K"]["2"]
        assert all(positive(m[k]) for k in ("heun_mib", "epd_mib", "epd_chunked_mib", "unchunked_vs_heun",
                                             "chunked_vs_heun")), m
        # structure, not speed: one point per call never holds more of the K-batch than all points at once
        assert m["epd_chunked_mib"] <= m["epd_mib"] * 1.01
    for section in ("## Step latency", "## Sampler overhead", "## Peak memory"):
        assert section in md


def test_cpu_memory_proxy_sees_the_peak_inside_a_function():
    def work():
        a = torch.ones(1_000_000)      # 4 MB
        b = a * 2                      # 8 MB live
        del a
        c = torch.ones(2_000_000)      # 4 + 8 = 12 MB live: the peak
        del b, c
        return torch.ones(500_000)     # 2 MB, below the peak
    assert speed.cpu_peak_bytes(work) == 12_000_000
