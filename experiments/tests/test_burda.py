"""The Burda et al. (2016) Table 1 study (studies.burda, experiments/iwae_table.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from studies import burda

ROOT = Path(__file__).resolve().parents[2]


def test_schedule_reaches_the_final_rate() -> None:
    schedule = burda.Schedule(epochs=40, lr=1e-3, final_lr_factor=0.1)
    assert schedule.lr * schedule.lr_decay**40 == pytest.approx(1e-4)


def test_cells_are_the_papers_architecture() -> None:
    config = burda.cell_config("iwae-k50", burda.Schedule(epochs=3)).resolved()
    assert (config.objective, config.num_particles) == ("iwae", 50)
    assert config.hidden_sizes == (200, 200) and config.activation == "tanh" and config.z_dim == 50
    assert config.binarize == "dynamic" and config.likelihood == "bernoulli"
    assert burda.cell_config("k1", burda.Schedule()).num_particles == 1
    two = burda.cell_config("2l-iwae-k5", burda.Schedule()).resolved()
    assert (two.model, two.z_dim, two.upper_z_dims, two.hidden_sizes, two.upper_hidden_sizes) == (
        "hvae", 100, (50,), (200, 200), (100, 100))
    assert (config.weight_init, config.data_bias) == ("glorot", True)  # the paper's code starts this way
    torch_start = burda.cell_config("k1", burda.Schedule(), init="torch")
    assert (torch_start.weight_init, torch_start.data_bias) == ("torch", False)
    assert burda.init_name(config.to_dict()) == "paper" and burda.init_name(torch_start.to_dict()) == "torch"
    assert burda.init_name({}) == "torch"  # saved before the options existed
    assert burda.init_name({"weight_init": "glorot"}) == "other"
    assert burda.cell_name(2, "vae", 1) == "2l-k1" and burda.cell_name(1, "iwae", 50) == "iwae-k50"
    with pytest.raises(ValueError, match="unknown cell"):
        burda.cell_config("iwae-k7", burda.Schedule())
    with pytest.raises(ValueError, match=r"unknown init 'glorot'; choose from \['paper', 'torch'\]"):
        burda.cell_config("k1", burda.Schedule(), init="glorot")


def test_convergence_and_ordering() -> None:
    flat = burda.convergence([-100.0] * 10 + [-90.0] * 9 + [-89.95])
    assert flat["gain"] == pytest.approx(0.05) and flat["converged"]
    assert not burda.convergence([float(-100 + i) for i in range(20)])["converged"]
    rows = [
        {"layers": 1, "objective": "VAE", "k": 1, "nll": 88.0}, {"layers": 1, "objective": "VAE", "k": 5, "nll": 87.8},
        {"layers": 1, "objective": "VAE", "k": 50, "nll": 87.9}, {"layers": 1, "objective": "IWAE", "k": 1, "nll": 88.0},
        {"layers": 1, "objective": "IWAE", "k": 5, "nll": 87.0}, {"layers": 1, "objective": "IWAE", "k": 50, "nll": None},
        {"layers": 2, "objective": "VAE", "k": 50, "nll": 87.0},
    ]
    checks = burda.ordering_checks(rows)
    assert checks["1 layer: VAE K=5 < K=1"] is True and checks["1 layer: VAE K=50 < K=5"] is False
    assert checks["1 layer: IWAE K=50 < VAE K=50"] is None
    assert checks["2 layers < 1 layer: VAE K=50"] is True and checks["2 layers < 1 layer: IWAE K=50"] is None



def test_iwae_table_smoke_and_resume(load_experiment, tmp_path: Path, mnist_root: Path, drawn) -> None:
    script = load_experiment("experiments/iwae_table.py")
    common = ["--out", str(tmp_path / "runs"), "--docs", str(tmp_path / "docs"), "--data-dir", str(mnist_root),
              "--num-train", "200", "--num-test", "30", "--eval-samples", "10", "--batch-size", "50", "--threads", "1"]
    summary = script.main(["--cells", "k1", "iwae-k5", "2l-k1", "--epochs", "1", *common])
    rows = {(r["objective"], r["k"]): r for r in summary["rows"] if r["layers"] == 1}
    assert rows[("VAE", 1)]["nll"] == rows[("IWAE", 1)]["nll"]  # one run fills both K=1 cells
    assert math.isfinite(rows[("IWAE", 5)]["nll"]) and "nll" not in rows[("VAE", 50)]
    assert summary["cells_missing"] == sorted(set(burda.TABLE_CELLS) - {"k1", "iwae-k5", "2l-k1"})
    assert [r["estimator"] for r in summary["estimators"]] == ["standard", "STL", "DReG"]
    two = {(r["objective"], r["k"]): r for r in summary["rows"] if r["layers"] == 2}
    assert set(two[("VAE", 1)]["active_units_by_site"]) == {"z", "z2"}
    assert summary["init"] == "paper" and summary["cells_with_another_init"] == []
    assert {r["init"] for r in summary["rows"] if "nll" in r} == {"paper"}
    drawn(tmp_path / "docs" / "curves.png")
    table = (tmp_path / "docs" / "table.md").read_text()
    assert "| 1 | IWAE | 5 |" in table and "86.47" in table and "Missing cells" in table
    units = two[("VAE", 1)]["active_units_by_site"]  # a two-layer row counts each layer, not their sum
    assert f"| z {units['z']}, z2 {units['z2']} |" in table
    saved = json.loads((tmp_path / "docs" / "results.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(summary["rows"]))
    # A longer budget is another schedule (its learning-rate decay differs), so the finished
    # cell is not taken for it; the same budget again skips the finished cells.
    before = (tmp_path / "runs" / "k1" / "metrics.json").stat().st_mtime_ns
    again = script.main(["--cells", "k1", "--epochs", "1", *common])
    assert (tmp_path / "runs" / "k1" / "metrics.json").stat().st_mtime_ns == before
    assert again["rows"] == summary["rows"]
    # A report for torch's initialisation over these cells says they started another way.
    mixed = script.main(["--report-only", "--torch-init", *common])
    assert mixed["cells_with_another_init"] == ["2l-k1", "iwae-k5", "k1"]
    assert "not comparable" in (tmp_path / "docs" / "table.md").read_text()


def test_init_study_smoke(load_experiment, tmp_path: Path, mnist_root: Path, drawn) -> None:
    script = load_experiment("experiments/init_study.py")
    summary = script.main(["--out", str(tmp_path / "runs"), "--docs", str(tmp_path / "docs"), "--data-dir",
                           str(mnist_root), "--num-train", "200", "--num-test", "30", "--eval-samples", "5",
                           "--epochs", "2", "--threads", "1"])
    rows = {(r["model"], r["start"]): r for r in summary["rows"]}
    assert set(rows) == {(m, s) for m in script.MODELS for s in script.STARTS}
    assert all(len(r["test_elbo_per_epoch"]) == 2 and math.isfinite(r["test_nll"]) for r in rows.values())
    assert set(rows[("two-layer", "torch")]["active_units_by_site"]) == {"z", "z2"}
    # The runs differ only in their start, and the start is the one named.
    saved = {name: json.loads((tmp_path / "runs" / name / "metrics.json").read_text())["config"]
             for name in (f"{m}-{s}" for m, s in rows)}
    assert saved["two-layer-glorot+data-bias"]["weight_init"] == "glorot" and saved["two-layer-glorot+data-bias"]["data_bias"]
    assert saved["one-layer-data-bias"]["weight_init"] == "torch" and saved["one-layer-data-bias"]["data_bias"]
    drawn(tmp_path / "docs" / "curves.png")
    assert "| two-layer | glorot |" in (tmp_path / "docs" / "table.md").read_text()
