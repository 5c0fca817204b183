"""The derived numbers the scripts write (the pages quote them), checked against their inputs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from studies import burda

ROOT = Path(__file__).resolve().parents[2]


def load(path: str) -> dict:
    return json.loads((ROOT / path).read_text())


def test_benchmark_verdicts_per_twin(load_experiment) -> None:
    script = load_experiment("experiments/benchmark_speed.py")
    results = script.summarize(copy.deepcopy(load("docs/benchmark_speed/results.json")))
    limit = results["targets"]["step_ratio_max"]
    for row in results["step"]:
        assert row["within_target_vs_bce"] == (row["ratio_vs_bce"] <= limit)
        assert row["within_target_vs_fused"] == (row["ratio_vs_fused"] <= limit)
        assert row["median_ms"]["pyrovae"] == 1e3 * row["median_seconds"]["pyrovae"]
    # What the README and the speed page say of issue 18's targets: against NumPyro the default
    # replay meets 2 of the 6 tutorial rows (IWAE K=50 at batch 100 and 256) and Inductor 3 (all
    # IWAE rows); at batch 32 the ELBO step is under 0.75 x hand-written on the tutorial and
    # 784-400-50 networks; the epoch and the K=5000 evaluation meet theirs.
    targets = results["summary"]["issue18_targets"]
    assert len(results["step"]) == 18 and targets["numpyro_rows"] == 6
    assert targets["step_le_numpyro"]["pyrovae"]["met_rows"] == ["tutorial iwae K=50 B=100", "tutorial iwae K=50 B=256"]
    assert targets["step_le_numpyro"]["pyrovae_inductor"]["met"] == 3
    assert targets["step_le_bce_at_batch"]["pyrovae"]["met_rows"] == ["tutorial elbo K=1 B=32", "784-400-50 elbo K=1 B=32"]
    assert targets["epoch_ge_speedup"]["pyrovae_fit"]["met"] and targets["eval_ge_fused"]["met"]


def test_burda_margins_are_nll_differences() -> None:
    summary = load("docs/iwae_table/results.json")
    derived = burda.derived(summary)
    nll = {(r["layers"], r["objective"], r["k"]): r["nll"] for r in summary["rows"]}
    layers = derived["margins"]["2l IWAE K=50 vs 1l IWAE K=50"]
    assert layers["ours"] == nll[(1, "IWAE", 50)] - nll[(2, "IWAE", 50)]
    assert abs(layers["paper"] - (84.78 - 82.90)) < 1e-9
    assert derived["difference_range"] == [min(r["difference"] for r in summary["rows"]),
                                           max(r["difference"] for r in summary["rows"])]
    stl = derived["estimators_vs_standard"]["STL"]
    by = {r["estimator"]: r for r in summary["estimators"]}
    assert stl["nll_lower_by"] == by["standard"]["nll"] - by["STL"]["nll"] > 0


def test_init_study_gains_use_the_last_epoch(load_experiment) -> None:
    script = load_experiment("experiments/init_study.py")
    rows = load("docs/init_study/results.json")["rows"]
    derived = script.derived(rows)
    by = {r["run"]: r for r in rows}
    gain = derived["gain_over_torch_start"]["two-layer data-bias"]
    assert gain["test_elbo_gain"] == (by["two-layer-data-bias"]["test_elbo_per_epoch"][-1]
                                      - by["two-layer-torch"]["test_elbo_per_epoch"][-1])
    assert gain["test_nll_gain"] == by["two-layer-torch"]["test_nll"] - by["two-layer-data-bias"]["test_nll"]


def test_gap_ratio_quantiles(load_experiment) -> None:
    script = load_experiment("experiments/gap_is_kl.py")
    quantiles = script.ratio_quantiles({"gap": torch.tensor([1.0, 2.0, 3.0]), "kl_prior": torch.tensor([10.0, 10.0, 10.0])})
    assert abs(quantiles["0.5"] - 0.2) < 1e-12 and quantiles["0.05"] < quantiles["0.95"]


def test_growth_per_dimension(load_experiment) -> None:
    script = load_experiment("experiments/why_importance_sampling.py")
    rows = [{"proposal": "prior", "z_dim": d, "one_sample": {"log10_relvar_exact": 0.5 * d}} for d in (8, 16)]
    growth = script.growth({"rows": rows})["prior"]
    assert abs(growth["factor_per_dimension"] - 10 ** 0.5) < 1e-12 and growth["between_dims"] == [8, 16]
