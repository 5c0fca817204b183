r"""Burda, Grosse and Salakhutdinov (2016), Table 1 on MNIST, on a CPU budget.

The paper's MNIST models: one stochastic layer (784-200-200-50 MLPs with tanh) and two
(x ↔ 200-200 ↔ 100 stochastic ↔ 100-100 ↔ 50 stochastic, :class:`~pyrovae.models.HierarchicalVAE`),
a Bernoulli decoder, N(0, I) prior, dynamically binarized MNIST; trained with the ELBO estimated from K samples ("VAE")
or with the K-sample importance-weighted bound ("IWAE"), K ∈ {1, 5, 50}; scored by the test
log-likelihood estimated with 5000 importance samples, and by the number of active units
(Cov_x(E_q[z_u]) > 10⁻², :func:`pyrovae.infer.evaluate.active_units`). With K = 1 both objectives are the
same bound, so one run fills both K = 1 cells, as in the paper.

The paper trained 3,280 passes over the data (batch 20; Adam with learning rate
0.001 · 10^{-i/7} for 3^i passes, i = 0…7). Here each cell gets the same budget of ``epochs``
passes, batch ``batch_size``, Adam from ``lr`` decayed geometrically per epoch to
``lr · final_lr_factor`` (the paper's stepwise schedule compressed, without its long tail at
small rates); no KL warm-up (the paper has none). The networks start as in the paper's code:
Glorot-uniform weights, zero biases, and the decoder's output bias at the logit of the mean
training image (``weight_init="glorot"``, ``data_bias=True``). With torch's default start instead,
the two-layer model learns slowly and leaves most of its units off (test NLL 102.96 at K = 1,
against 92.08 for one layer); docs/iwae_table.md shows both. Every cell is an ordinary ``pyrovae train`` run
(:func:`pyrovae.app.run.train_and_evaluate`) in its own folder, so it resumes from its checkpoint.

**Reference.** Y. Burda, R. Grosse, R. Salakhutdinov, "Importance Weighted Autoencoders",
ICLR 2016, Table 1.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from pyrovae.app.config import TrainConfig

__all__ = ["PAPER", "CELLS", "Schedule", "cell_config", "collect", "convergence", "INITS", "init_name", "table_rows"]

#: Table 1 of Burda et al. (2016), MNIST test NLL in nats: layers -> objective -> K -> NLL; and
#: active units (K = 1, 5, 50) where the paper reports them.
PAPER: dict[str, Any] = {
    "nll": {
        1: {"vae": {1: 86.76, 5: 86.47, 50: 86.35}, "iwae": {1: 86.76, 5: 85.54, 50: 84.78}},
        2: {"vae": {1: 85.33, 5: 85.01, 50: 84.78}, "iwae": {1: 85.33, 5: 83.89, 50: 82.90}},
    },
    "epochs": 3280,
    "batch_size": 20,
}

#: The cells of the table: name -> (stochastic layers, objective, K). "k1" / "2l-k1" are both VAE
#: and IWAE at K = 1 (the same bound).
CELLS: dict[str, tuple[int, str, int]] = {
    "k1": (1, "elbo", 1),
    "vae-k5": (1, "elbo", 5),
    "vae-k50": (1, "elbo", 50),
    "iwae-k5": (1, "iwae", 5),
    "iwae-k50": (1, "iwae", 50),
    "2l-k1": (2, "elbo", 1),
    "2l-vae-k5": (2, "elbo", 5),
    "2l-vae-k50": (2, "elbo", 50),
    "2l-iwae-k5": (2, "iwae", 5),
    "2l-iwae-k50": (2, "iwae", 50),
    # Issue 6: the same one-layer IWAE K=50 cell with the encoder's gradient from STL or DReG.
    "iwae-stl-k50": (1, "iwae-stl", 50),
    "iwae-dreg-k50": (1, "iwae-dreg", 50),
}

#: How a cell's networks start: name -> (``TrainConfig.weight_init``, ``TrainConfig.data_bias``).
#: "paper" is the start of Burda et al.'s code; "torch" is torch's default.
INITS: dict[str, tuple[str, bool]] = {"paper": ("glorot", True), "torch": ("torch", False)}

#: The cells of the main table (the estimator cells are reported separately).
TABLE_CELLS: tuple[str, ...] = tuple(c for c, (_, objective, _) in CELLS.items() if objective in ("elbo", "iwae"))


def cell_name(layers: int, objective: str, k: int) -> str:
    """The cell of (layers, ``"vae"``/``"iwae"``, K): K = 1 is one cell for both objectives."""
    prefix = "" if layers == 1 else f"{layers}l-"
    return f"{prefix}k1" if k == 1 else f"{prefix}{objective}-k{k}"


@dataclass
class Schedule:
    """The training budget of every cell.

    :param epochs: passes over the 60,000 training images.
    :param batch_size: images per Adam step.
    :param lr: initial Adam step size.
    :param final_lr_factor: the step size after ``epochs`` epochs, relative to ``lr``.
    """

    epochs: int = 100
    batch_size: int = 100
    lr: float = 1e-3
    final_lr_factor: float = 0.1

    @property
    def lr_decay(self) -> float:
        """The per-epoch factor that takes ``lr`` to ``lr * final_lr_factor`` in ``epochs`` epochs."""
        return self.final_lr_factor ** (1.0 / self.epochs)


def cell_config(
    cell: str,
    schedule: Schedule,
    *,
    seed: int = 0,
    device: str = "cpu",
    num_train: Optional[int] = None,
    num_test: Optional[int] = None,
    eval_samples: int = 5000,
    init: str = "paper",
) -> TrainConfig:
    """The :class:`~pyrovae.app.config.TrainConfig` of one cell. One layer: 784-200-200-50 MLPs. Two
    layers (:class:`~pyrovae.models.HierarchicalVAE`): x ↔ 200-200 ↔ z1 (100) ↔ 100-100 ↔ z2 (50).
    ``init`` names the start (:data:`INITS`): ``"paper"`` as in the paper's code (Glorot weights,
    output bias at the data's mean), ``"torch"`` torch's default initialisation."""
    if cell not in CELLS:
        raise ValueError(f"unknown cell {cell!r}; choose from {sorted(CELLS)}")
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose from {sorted(INITS)}")
    layers, objective, k = CELLS[cell]
    weight_init, data_bias = INITS[init]
    architecture: dict[str, Any] = (
        dict(model="vae", z_dim=50) if layers == 1
        else dict(model="hvae", z_dim=100, upper_z_dims=(50,), upper_hidden_sizes=(100, 100))
    )
    return TrainConfig(
        dataset="mnist", guide="amortized", objective=objective, num_particles=k, **architecture,
        hidden_sizes=(200, 200), activation="tanh", likelihood="bernoulli", binarize="dynamic",
        weight_init=weight_init, data_bias=data_bias,
        epochs=schedule.epochs, batch_size=schedule.batch_size, lr=schedule.lr, lr_decay=schedule.lr_decay,
        seed=seed, device=device, num_train=num_train, num_test=num_test, eval_samples=eval_samples,
        eval_chunk=min(100, eval_samples), eval_batch=100,
    )


def init_name(config: dict[str, Any]) -> str:
    """How a run's networks started, from its saved config: ``"paper"`` (Glorot weights and the
    data-mean output bias), ``"torch"`` (torch's default; also configs saved before these options
    existed) or ``"other"``."""
    start = (config.get("weight_init", "torch"), bool(config.get("data_bias", False)))
    return next((name for name, value in INITS.items() if value == start), "other")


def convergence(test_bound: list[Optional[float]], fraction: float = 0.1) -> dict[str, Any]:
    """How much the per-epoch test bound still rose at the end of training: its gain over the last
    ``fraction`` of the epochs (nats), and that gain per epoch. A cell counts as converged for its
    schedule when the last tenth of its epochs gained less than 0.2 nats."""
    values = [v for v in test_bound if v is not None]
    if len(values) < 2:
        return {"last_epochs": 0, "gain": None, "gain_per_epoch": None, "converged": None}
    last = max(1, int(round(fraction * len(values))))
    gain = values[-1] - values[-1 - last]
    return {"last_epochs": last, "gain": gain, "gain_per_epoch": gain / last, "converged": bool(gain < 0.2)}


def collect(root: Path) -> dict[str, dict[str, Any]]:
    """The ``metrics.json`` of every finished cell under ``root`` (``root/<cell>/metrics.json``)."""
    results = {}
    for cell in CELLS:
        path = Path(root) / cell / "metrics.json"
        if path.exists():
            results[cell] = json.loads(path.read_text())
    return results


def table_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (layers, objective, K): ours beside the paper's."""
    rows = []
    for layers, objective, k in ((n, o, k) for n in (1, 2) for o in ("vae", "iwae") for k in (1, 5, 50)):
        cell = cell_name(layers, objective, k)
        metrics = results.get(cell)
        row: dict[str, Any] = {
            "layers": layers, "objective": objective.upper(), "k": k, "cell": cell,
            "paper_nll": PAPER["nll"][layers][objective][k],
        }
        if metrics is not None:
            row.update(
                nll=metrics["test_nll"],
                init=init_name(metrics["config"]),
                test_elbo=metrics["test_elbo"],
                kl=metrics.get("kl"),
                active_units=metrics["active_units"],
                active_units_by_site=metrics.get("active_units_by_site"),
                epochs=metrics["epochs"],
                train_hours=sum(metrics["seconds_per_epoch"]) / 3600,
                eval_minutes=metrics["eval_seconds"] / 60,
                **{f"convergence_{k_}": v for k_, v in convergence(metrics["test_bound_per_epoch"]).items()},
            )
            row["difference"] = row["nll"] - row["paper_nll"]
        rows.append(row)
    return rows


def estimator_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """IWAE K=50 (one layer) with the standard, STL and DReG encoder gradients."""
    rows = []
    for cell, estimator in (("iwae-k50", "standard"), ("iwae-stl-k50", "STL"), ("iwae-dreg-k50", "DReG")):
        metrics = results.get(cell)
        row: dict[str, Any] = {"cell": cell, "estimator": estimator, "k": 50}
        if metrics is not None:
            row.update(nll=metrics["test_nll"], init=init_name(metrics["config"]),
                       test_bound=metrics["test_bound_per_epoch"][-1], test_elbo=metrics.get("test_elbo"),
                       kl=metrics.get("kl"), test_bound_per_epoch=metrics["test_bound_per_epoch"],
                       **{f"convergence_{k_}": v for k_, v in convergence(metrics["test_bound_per_epoch"]).items()},
                       active_units=metrics["active_units"], epochs=metrics["epochs"],
                       train_hours=sum(metrics["seconds_per_epoch"]) / 3600)
        rows.append(row)
    return rows


def derived(summary: dict[str, Any]) -> dict[str, Any]:
    """What the pages compute from the table, from ``summary``'s rows alone (so it can be recomputed
    from a committed ``results.json``):

    - ``margins``: for every two cells of one model (same layers), and for one against two layers in
      the same column, ``nll(second) − nll(first)``, ours and the paper's (positive: the first is
      better);
    - ``gaps``: log p̂(x) − ELBO = −test_elbo − nll per cell (KL(q ‖ p(z|x)) up to log p̂'s bias);
    - ``difference_range``: the smallest and largest ours − paper;
    - for the encoder-gradient cells, their NLL, final test bound and ELBO differences from the standard cell.
    """
    rows = [r for r in summary["rows"] if r.get("nll") is not None]
    def label(r: dict[str, Any]) -> str:
        return f"{r['layers']}l {r['objective']} K={r['k']}"

    margins = {}
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            if a["layers"] == b["layers"] or (a["objective"], a["k"]) == (b["objective"], b["k"]):
                first, second = (a, b) if a["layers"] >= b["layers"] else (b, a)
                margins[f"{label(first)} vs {label(second)}"] = {
                    "ours": second["nll"] - first["nll"], "paper": second["paper_nll"] - first["paper_nll"]}
    out: dict[str, Any] = {
        "margins": margins,
        "gaps": {label(r): -r["test_elbo"] - r["nll"] for r in rows if r.get("test_elbo") is not None},
        "difference_range": [min(r["difference"] for r in rows), max(r["difference"] for r in rows)] if rows else None,
    }
    estimators = {r["estimator"]: r for r in summary.get("estimators", []) if r.get("nll") is not None}
    if "standard" in estimators:
        base = estimators["standard"]
        out["estimators_vs_standard"] = {
            name: {"nll_lower_by": base["nll"] - r["nll"], "test_bound_higher_by": r["test_bound"] - base["test_bound"],
                   **({"test_elbo_higher_by": r["test_elbo"] - base["test_elbo"]}
                      if r.get("test_elbo") is not None and base.get("test_elbo") is not None else {})}
            for name, r in estimators.items() if name != "standard"
        }
    return out


def compare(summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Numbers that compare two reports: ``summaries`` maps a name (``"table"``, ``"300_epochs"``,
    ``"torch_init"``, ``"torch_init/seed1"``) to its ``results.json``. Each comparison is the
    NLL / test ELBO of the same cell in two reports."""
    def by_cell(name: str) -> dict[str, dict[str, Any]]:
        return {r["cell"]: r for r in summaries.get(name, {}).get("rows", []) if r.get("nll") is not None}

    out: dict[str, Any] = {}
    for a, b in (("torch_init", "torch_init/seed1"), ("table", "300_epochs"), ("torch_init", "table")):
        ra, rb = by_cell(a), by_cell(b)
        common = sorted(set(ra) & set(rb))
        if not common:
            continue
        cells = {c: {"nll_difference": rb[c]["nll"] - ra[c]["nll"],
                     "test_elbo_difference": rb[c]["test_elbo"] - ra[c]["test_elbo"]} for c in common}
        out[f"{b} vs {a}"] = {
            "cells": cells,
            "max_abs_nll_difference": max(abs(v["nll_difference"]) for v in cells.values()),
            "max_abs_test_elbo_difference": max(abs(v["test_elbo_difference"]) for v in cells.values()),
        }
    torch_rows = by_cell("torch_init")
    if "2l-k1" in torch_rows and "k1" in torch_rows:
        out["torch_init two layers vs one layer, K=1"] = torch_rows["2l-k1"]["nll"] - torch_rows["k1"]["nll"]
    return out


def ordering_checks(rows: list[dict[str, Any]]) -> dict[str, Optional[bool]]:
    """The orderings the paper's table shows, on our numbers (``None`` where a cell is missing),
    per number of layers: IWAE at K = 50 beats the VAE at K = 50 and at K = 1; each objective
    improves with K; and two layers beat one for the same objective and K."""
    nll = {(r.get("layers", 1), r["objective"], r["k"]): r.get("nll") for r in rows}

    def better(a: tuple[int, str, int], b: tuple[int, str, int]) -> Optional[bool]:
        if nll.get(a) is None or nll.get(b) is None:
            return None
        return bool(nll[a] < nll[b])

    checks: dict[str, Optional[bool]] = {}
    for layers in (1, 2):
        tag = f"{layers} layer{'s' if layers > 1 else ''}: "
        checks[tag + "IWAE K=50 < VAE K=50"] = better((layers, "IWAE", 50), (layers, "VAE", 50))
        checks[tag + "IWAE K=50 < VAE K=1"] = better((layers, "IWAE", 50), (layers, "VAE", 1))
        checks[tag + "IWAE K=5 < VAE K=5"] = better((layers, "IWAE", 5), (layers, "VAE", 5))
        for objective in ("VAE", "IWAE"):
            checks[tag + f"{objective} K=5 < K=1"] = better((layers, objective, 5), (layers, objective, 1))
            checks[tag + f"{objective} K=50 < K=5"] = better((layers, objective, 50), (layers, objective, 5))
    for objective in ("VAE", "IWAE"):
        checks[f"2 layers < 1 layer: {objective} K=50"] = better((2, objective, 50), (1, objective, 50))
    return checks


def schedule_dict(schedule: Schedule) -> dict[str, Any]:
    return {**dataclasses.asdict(schedule), "lr_decay_per_epoch": schedule.lr_decay,
            "final_lr": schedule.lr * schedule.final_lr_factor, "passes_vs_paper": schedule.epochs / PAPER["epochs"]}


def finite(value: Optional[float]) -> bool:
    return value is not None and math.isfinite(value)
