r"""Signal-to-noise ratio of IWAE gradients against the number of particles K.

Rainforth et al. (2018) show that with the standard pathwise estimator the IWAE bound's gradient
for the *encoder* has a signal-to-noise ratio that falls like O(1/√K) as K grows, while the
decoder's rises like O(√K): a tighter bound can train a worse encoder. STL (Roeder et al. 2017)
and DReG (Tucker et al. 2019) change the encoder's estimator; DReG's SNR rises with K.

For a fixed model and guide and a fixed minibatch, :func:`gradient_replicates` draws R independent
gradient estimates of one objective and :func:`snr_table` summarises them per parameter group with
:func:`studies.gradients.gradient_statistics`: SNR_i = |E g_i| / sd(g_i) per coordinate
(E g estimated without its sampling bias), averaged over coordinates, and the pooled
‖E g‖ / √Σ var_i.

**References**

[1] T. Rainforth, A. R. Kosiorek, T. A. Le, C. J. Maddison, M. Igl, F. Wood, Y. W. Teh,
    "Tighter Variational Bounds are Not Necessarily Better", ICML 2018.
[2] G. Tucker, D. Lawson, S. Gu, C. J. Maddison, "Doubly Reparameterized Gradient Estimators for
    Monte Carlo Objectives", ICLR 2019.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import torch
from studies.gradients import gradient_statistics
from torch import nn

from pyrovae.infer.objectives import make_objective

__all__ = ["ESTIMATORS", "gradient_replicates", "snr_table"]

#: Objective names compared: the IWAE bound with three encoder-gradient estimators, and Rainforth
#: et al.'s (2018) three variants of it.
ESTIMATORS: tuple[str, ...] = ("iwae", "iwae-stl", "iwae-dreg", "miwae", "piwae", "ciwae")

#: The variants' options: MIWAE and PIWAE average M = 4 groups of K draws (4K draws in all; PIWAE's
#: decoder sees the IWAE bound of all 4K), CIWAE mixes the ELBO and the IWAE bound of the same K
#: draws half and half.
OPTIONS: dict[str, dict[str, Any]] = {"miwae": {"num_groups": 4}, "piwae": {"num_groups": 4}, "ciwae": {"ciwae_beta": 0.5}}


def gradient_replicates(
    model: Callable,
    guide: Callable,
    objective: Any,
    args: tuple,
    groups: dict[str, Sequence[torch.Tensor]],
    replicates: int,
) -> dict[str, torch.Tensor]:
    """R independent draws of the gradient of the *bound* (minus the loss) for each group of
    parameters: group -> ``(R, n)``."""
    if replicates < 3:
        raise ValueError(f"need at least 3 replicates, got {replicates}")
    params = [p for group in groups.values() for p in group]
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in groups}
    for _ in range(replicates):
        loss = objective.differentiable_loss(model, guide, *args)
        grads = torch.autograd.grad(-loss, params, allow_unused=True)
        start = 0
        for name, group in groups.items():
            flat = [
                (g if g is not None else torch.zeros_like(p)).reshape(-1)
                for g, p in zip(grads[start : start + len(group)], group)
            ]
            rows[name].append(torch.cat(flat).detach())
            start += len(group)
    return {name: torch.stack(values) for name, values in rows.items()}


def snr_table(
    model: Callable,
    guide: Callable,
    encoder: nn.Module,
    decoder: nn.Module,
    x: torch.Tensor,
    index: torch.Tensor,
    num_data: int,
    ks: Sequence[int],
    estimators: Sequence[str] = ESTIMATORS,
    replicates: int = 200,
    progress: Callable[[str], None] = lambda message: None,
) -> list[dict[str, Any]]:
    """Encoder and decoder gradient statistics for every (estimator, K) on one minibatch.

    The minibatch's loss is scaled by N/B as in training (it does not change the SNR).

    :return: one row per (estimator, K) with ``encoder`` and ``decoder`` statistics (``snr``,
        ``snr_pooled``, ``variance``, ...) and the seconds it took.
    """
    groups = {"encoder": list(encoder.parameters()), "decoder": list(decoder.parameters())}
    rows = []
    for estimator in estimators:
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {estimator!r}; choose from {ESTIMATORS}")
        for k in ks:
            start = time.perf_counter()
            objective = make_objective(estimator, int(k), **OPTIONS.get(estimator, {}))
            grads = gradient_replicates(model, guide, objective, (x, index, num_data), groups, replicates)
            row: dict[str, Any] = {"estimator": estimator, "k": int(k), "replicates": replicates,
                                   "options": OPTIONS.get(estimator, {}), "draws_per_point": objective.num_draws}
            for name, g in grads.items():
                stats, mean, _ = gradient_statistics(g)
                stats["mean_norm"] = mean.norm().item()
                row[name] = stats
            row["seconds"] = time.perf_counter() - start
            rows.append(row)
            progress(f"{estimator:10s} K={k:<4d} encoder SNR {row['encoder']['snr']:.4f} "
                     f"(pooled {row['encoder']['snr_pooled']:.4f}), decoder SNR {row['decoder']['snr']:.4f} "
                     f"({row['seconds']:.1f} s)")
    return rows


def plot_snr(rows: list[dict[str, Any]], path: Any, title: str = "") -> None:
    """SNR against K, log-log: encoder (solid) for every estimator, decoder (dashed) for IWAE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "snr", "mean over coordinates of |E g| / sd(g)"),
                           (axes[1], "snr_pooled", "pooled ‖E g‖ / √Σ var")):
        for estimator in dict.fromkeys(r["estimator"] for r in rows):
            sub = [r for r in rows if r["estimator"] == estimator]
            ax.plot([r["k"] for r in sub], [r["encoder"][key] for r in sub], "o-", label=f"encoder, {estimator}")
        sub = [r for r in rows if r["estimator"] == "iwae"]
        if sub:
            ax.plot([r["k"] for r in sub], [r["decoder"][key] for r in sub], "s--", color="grey", label="decoder, iwae")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("K (particles)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title or "IWAE gradient signal-to-noise ratio vs K")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
