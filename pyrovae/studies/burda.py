r"""Burda, Grosse and Salakhutdinov (2016), Table 1 on MNIST, on a CPU budget.

The paper's one-stochastic-layer MNIST model: 784-200-200-50 MLPs with tanh, a Bernoulli decoder,
N(0, I) prior, dynamically binarized MNIST; trained with the ELBO estimated from K samples ("VAE")
or with the K-sample importance-weighted bound ("IWAE"), K ∈ {1, 5, 50}; scored by the test
log-likelihood estimated with 5000 importance samples, and by the number of active units
(Cov_x(E_q[z_u]) > 10⁻², :func:`pyrovae.evaluate.active_units`). With K = 1 both objectives are the
same bound, so one run fills both K = 1 cells, as in the paper.

The paper trained 3,280 passes over the data (batch 20; Adam with learning rate
0.001 · 10^{-i/7} for 3^i passes, i = 0…7). Here each cell gets the same budget of ``epochs``
passes, batch ``batch_size``, Adam from ``lr`` decayed geometrically per epoch to
``lr · final_lr_factor`` (the paper's stepwise schedule compressed, without its long tail at
small rates); no KL warm-up (the paper has none). Every cell is an ordinary ``pyrovae train`` run
(:func:`pyrovae.run.train_and_evaluate`) in its own folder, so it resumes from its checkpoint.

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

from pyrovae.config import TrainConfig

__all__ = ["PAPER", "CELLS", "Schedule", "cell_config", "collect", "convergence", "table_rows"]

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

#: The cells of the one-layer table: name -> (objective, K). "k1" is both VAE and IWAE at K = 1.
CELLS: dict[str, tuple[str, int]] = {
    "k1": ("elbo", 1),
    "vae-k5": ("elbo", 5),
    "vae-k50": ("elbo", 50),
    "iwae-k5": ("iwae", 5),
    "iwae-k50": ("iwae", 50),
}


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
) -> TrainConfig:
    """The :class:`~pyrovae.config.TrainConfig` of one cell of the one-layer table."""
    if cell not in CELLS:
        raise ValueError(f"unknown cell {cell!r}; choose from {sorted(CELLS)}")
    objective, k = CELLS[cell]
    return TrainConfig(
        dataset="mnist", model="vae", guide="amortized", objective=objective, num_particles=k,
        z_dim=50, hidden_sizes=(200, 200), activation="tanh", likelihood="bernoulli", binarize="dynamic",
        epochs=schedule.epochs, batch_size=schedule.batch_size, lr=schedule.lr, lr_decay=schedule.lr_decay,
        seed=seed, device=device, num_train=num_train, num_test=num_test, eval_samples=eval_samples,
        eval_chunk=min(100, eval_samples), eval_batch=100,
    )


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
    """One row per (objective, K) of the one-layer table: ours beside the paper's."""
    rows = []
    for objective in ("vae", "iwae"):
        for k in (1, 5, 50):
            cell = "k1" if k == 1 else f"{objective}-k{k}"
            metrics = results.get(cell)
            row: dict[str, Any] = {
                "layers": 1, "objective": objective.upper(), "k": k, "cell": cell,
                "paper_nll": PAPER["nll"][1][objective][k],
            }
            if metrics is not None:
                row.update(
                    nll=metrics["test_nll"],
                    test_elbo=metrics["test_elbo"],
                    active_units=metrics["active_units"],
                    epochs=metrics["epochs"],
                    train_hours=metrics["train_seconds"] / 3600,
                    eval_minutes=metrics["eval_seconds"] / 60,
                    **{f"convergence_{k_}": v for k_, v in convergence(metrics["test_bound_per_epoch"]).items()},
                )
                row["difference"] = row["nll"] - row["paper_nll"]
            rows.append(row)
    return rows


def ordering_checks(rows: list[dict[str, Any]]) -> dict[str, Optional[bool]]:
    """The orderings the paper's table shows, on our numbers (``None`` where a cell is missing):
    IWAE at K = 50 beats the VAE at K = 50 and at K = 1; each objective improves with K."""
    nll = {(r["objective"], r["k"]): r.get("nll") for r in rows}

    def better(a: tuple[str, int], b: tuple[str, int]) -> Optional[bool]:
        if nll.get(a) is None or nll.get(b) is None:
            return None
        return bool(nll[a] < nll[b])

    checks = {
        "IWAE K=50 < VAE K=50": better(("IWAE", 50), ("VAE", 50)),
        "IWAE K=50 < VAE K=1": better(("IWAE", 50), ("VAE", 1)),
        "IWAE K=5 < VAE K=5": better(("IWAE", 5), ("VAE", 5)),
    }
    for objective in ("VAE", "IWAE"):
        checks[f"{objective}: K=5 < K=1"] = better((objective, 5), (objective, 1))
        checks[f"{objective}: K=50 < K=5"] = better((objective, 50), (objective, 5))
    return checks


def schedule_dict(schedule: Schedule) -> dict[str, Any]:
    return {**dataclasses.asdict(schedule), "lr_decay_per_epoch": schedule.lr_decay,
            "final_lr": schedule.lr * schedule.final_lr_factor, "passes_vs_paper": schedule.epochs / PAPER["epochs"]}


def finite(value: Optional[float]) -> bool:
    return value is not None and math.isfinite(value)
