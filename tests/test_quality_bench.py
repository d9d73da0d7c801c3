"""bench/quality_vs_nfe.py on the analytic mixture, small: it trains EPD-MS per NFE from the best built-in it
reproduces, picks the table on the fit noises, and scores it on held-out noises beside that built-in."""
import json

from bench import quality_vs_nfe


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


def test_the_demo_benchmark_scores_dyweight_tables_beside_the_builtins_as_ksampler_runs_them(tmp_path, comfy_sampling):
    """The shipped 8x8 dyweight tables of NFE 3 and 4, small: a DyWeight column in the report, the table's own ratio
    and the path KSampler's CFG guard takes (the table, or the best built-in where the table lost on the validation
    noises, or won by less than two standard errors of that measurement)."""
    results = quality_vs_nfe.main(["--model", "demo", "--min-nfe", "3", "--max-nfe", "4", "--samples", "8",
                                   "--fit-samples", "8", "--samplers", "euler,ipndm", "--schedulers", "karras",
                                   "--solvers", "dyweight", "--ref-steps", "50", "--threads", "1",
                                   "--val-samples", "8", "--out", str(tmp_path)])
    report = (tmp_path / "quality_vs_nfe_demo.md").read_text()
    assert "DyWeight RMSE" in report
    for row in results["summary"]:
        entry = results["nfe"][row["nfe"]]
        assert entry["dyweight_tables"][0]["table"] == f"demo_digits_dyweight_nfe{row['nfe']}.safetensors"
        assert "reason" in entry["dyweight"]  # the guard's choice, said
        chosen = entry["dyweight"].get("fallback") is None  # else it samples as the best built-in: ratio 1
        assert row["dw_over_best"] == (row["dw_table_over_best"] if chosen else 1.0)
        measured = entry["dyweight_tables"][0]
        assert measured["fit_ratio"] == measured["val"] / entry["builtins"][row["best_builtin"].split(" (")[0]]["val"]
        assert 0 < measured["fit_ratio_se"] < measured["fit_ratio"]
        assert chosen == (measured["fit_ratio"] + 2 * measured["fit_ratio_se"] < 1.0)
        assert row["dw_table_over_best"] == entry["dyweight_tables"][0]["mean"] / row["best_builtin_rmse"]
