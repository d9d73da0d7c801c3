"""bench/quality_vs_nfe.py on the analytic mixture, small: it trains EPD-MS per NFE from the best built-in it
reproduces, picks the table on the fit noises, and scores it on held-out noises beside that built-in."""
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import quality_vs_nfe  # noqa: E402


def test_the_mixture_benchmark_trains_and_scores_epd_ms(tmp_path, comfy_sampling):
    results = quality_vs_nfe.main(["--model", "gmm", "--min-nfe", "4", "--max-nfe", "5", "--samples", "16",
                                   "--fit-samples", "8", "--samplers", "ipndm,gradient_estimation",
                                   "--schedulers", "karras,exponential", "--solvers", "epd_ms", "--threads", "1",
                                   "--out", str(tmp_path)])
    summary = {row["nfe"]: row for row in results["summary"]}
    table = (tmp_path / "quality_vs_nfe_gmm.md").read_text()
    assert sorted(summary) == [4, 5]
    for nfe, row in summary.items():
        assert results["nfe"][nfe]["epd_ms"]["K"] in (1, 2, 3)  # the candidate chosen on the fit noises
        assert row["ms_over_best"] < 1.0, row  # from the best built-in it reproduces, trained: better held out
        assert f"{row['ms_rmse']:.4f} (**{row['ms_over_best']:.2f}**" in table
    saved = json.loads((tmp_path / "quality_vs_nfe_gmm.json").read_text())["summary"]
    assert [r["ms_over_best"] for r in saved] == [summary[n]["ms_over_best"] for n in (4, 5)]
