r"""Three ways to treat M2's class label y (Kingma et al. 2014; :mod:`pyrovae.models.m2`), compared
on one model and one fixed minibatch: the variance and the bias of the gradient that the classifier
q_φ(y|x) gets, and the class-conditional "style transfer" grid of a trained model.

The estimators of the gradient of the same ELBO J (the α term of the labelled points included, which
is deterministic and the same in every mode), each for the classifier's parameters φ:

- ``enum``: y summed out exactly (``TraceEnum_ELBO``); its only noise is the draw of z given y.
- ``score``: y sampled, log-derivative trick with each point's own ELBO as its learning signal and
  no baseline (``Trace_ELBO`` on the guide in ``y_mode="score"``).
- ``vimco``: y sampled, pyrovae's ``iwae`` with K particles: VIMCO's leave-one-out learning signal.
  It is the gradient of the K-sample IWAE bound, not of J: its "bias" against ``enum`` mixes the
  change of objective with the estimator's (reported, marked ``objective="iwae"``).
- ``gumbel``: y sampled by straight-through Gumbel-softmax at temperature τ (``Trace_ELBO``): an exact
  categorical draw with the relaxation's (biased) gradient.

Per estimator R independent replicates on the same minibatch give, with
:func:`studies.gradients.gradient_statistics` (the project's convention): ``variance`` (the
per-coordinate sample variance averaged over the classifier's coordinates, with its SE), the
``trace`` of the covariance (that mean times the number of coordinates), the debiased mean SNR, and
against ``enum``'s replicates the bias in units of its standard error per coordinate:
``max_abs_z_vs_reference``, ``frac_abs_z_gt_3_vs_reference`` (0.0027 expected without bias, for
Gaussian noise) and ``mean_abs_z_vs_reference`` (about 0.80 without bias), and the relative bias
‖ḡ - ḡ_enum‖ / ‖ḡ_enum‖.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import pyro
import torch
from studies.gradients import gradient_statistics
from studies.snr import gradient_replicates
from torch.nn import functional as F

from pyrovae.infer.objectives import make_objective

__all__ = ["estimator_specs", "gradient_study", "style_grid"]


def estimator_specs(temperatures: Sequence[float], vimco_particles: int) -> list[dict[str, Any]]:
    """The estimators compared, in table order: name, the guide's y_mode, τ, objective and K."""
    specs: list[dict[str, Any]] = [
        {"name": "enum", "y_mode": "enum", "objective": "elbo-enum", "num_particles": 1},
        {"name": "score", "y_mode": "score", "objective": "elbo", "num_particles": 1},
    ]
    if vimco_particles >= 2:
        specs.append({"name": f"vimco-k{vimco_particles}", "y_mode": "score", "objective": "iwae",
                      "num_particles": int(vimco_particles)})
    for tau in temperatures:
        specs.append({"name": f"gumbel-t{tau:g}", "y_mode": "gumbel", "temperature": float(tau), "objective": "elbo",
                      "num_particles": 1})
    return specs


def guide_for(guide: Any, spec: dict[str, Any]) -> Any:
    """The same guide (the same networks) with the spec's y_mode and temperature."""
    changes: dict[str, Any] = {"y_mode": spec["y_mode"]}
    if "temperature" in spec:
        changes["temperature"] = spec["temperature"]
    return dataclasses.replace(guide, **changes)


def gradient_study(
    model: Callable,
    guide: Any,
    x: torch.Tensor,
    num_data: int,
    specs: Sequence[dict[str, Any]],
    replicates: int,
    seed: int = 0,
    progress: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """Gradient statistics of the classifier's parameters for every estimator in ``specs`` (the first
    must be ``enum``: the reference of the bias), on the minibatch ``x`` (labels joined, as in training)
    with index ``0..B-1`` of ``num_data``.

    :return: ``{"rows": [...], "num_coords": n, "batch": B, "labelled_in_batch": ...}``; each row holds
        the statistics, the seconds per replicate and ``grad_shape`` ``[R, n]``.
    """
    if not specs or specs[0]["name"] != "enum":
        raise ValueError("the first estimator must be 'enum', the reference of the bias")
    params = [p for p in guide.classifier.parameters() if p.requires_grad]
    groups = {"classifier": params}
    index = torch.arange(x.shape[0], device=x.device)
    args = (x, index, num_data)
    rows, reference = [], None
    for spec in specs:
        objective = make_objective(spec["objective"], spec["num_particles"])
        pyro.set_rng_seed(seed)
        start = time.perf_counter()
        grads = gradient_replicates(model, guide_for(guide, spec), objective, args, groups, replicates)["classifier"]
        seconds = time.perf_counter() - start
        stats, mean, se = gradient_statistics(grads, reference=reference)
        row: dict[str, Any] = {**spec, **stats, "trace": stats["variance"] * stats["num_coords"],
                               "seconds_per_replicate": seconds / replicates, "grad_shape": list(grads.shape),
                               "all_finite": bool(torch.isfinite(grads).all())}
        if reference is None:
            reference = (mean, se)
        else:
            ref_mean, ref_se = reference
            scale = (se**2 + ref_se**2).sqrt()
            ok = scale > 0
            row["mean_abs_z_vs_reference"] = ((mean - ref_mean)[ok] / scale[ok]).abs().mean().item()
            row["relative_bias"] = ((mean - ref_mean).norm() / ref_mean.norm()).item()
            row["variance_ratio_to_enum"] = stats["variance"] / rows[0]["variance"]
        rows.append(row)
        progress(f"{spec['name']:12s} variance {row['variance']:.4g} ± {row['variance_se']:.2g}, SNR {row['snr']:.3g}"
                 + (f", bias max|z| {row['max_abs_z_vs_reference']:.2f}" if "max_abs_z_vs_reference" in row else "")
                 + f" ({seconds:.1f} s)")
        del grads
    labelled = int((x[:, guide.x_dim:].sum(-1) == 1).sum()) if x.shape[-1] > guide.x_dim else 0
    return {"rows": rows, "num_coords": rows[0]["num_coords"], "batch": int(x.shape[0]), "labelled_in_batch": labelled,
            "replicates": int(replicates), "num_data": int(num_data)}


@torch.no_grad()
def style_grid(model: Any, guide: Any, x: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-conditional generation with a shared z: for each image, z = the mean of q(z|x, ŷ) at its
    predicted class ŷ, decoded with every class.

    :param x: ``(N, x_dim)`` images (no label columns).
    :return: ``(images, predicted)``: ``(N, 1 + C, x_dim)`` pixel probabilities (column 0 the input,
        column 1 + c the decoding with class c) and the ``(N,)`` predicted classes.
    """
    pixels = x[..., : guide.x_dim]
    predicted = guide.predict(pixels)
    y_hat = F.one_hot(predicted, num_classes).to(pixels.dtype)
    z_loc, _ = guide.encoder(torch.cat([pixels, y_hat], dim=-1))
    eye = torch.eye(num_classes, dtype=pixels.dtype, device=pixels.device)
    decoded = model.decode(z_loc.unsqueeze(1).expand(-1, num_classes, -1), eye.expand(len(pixels), -1, -1))
    return torch.cat([pixels.unsqueeze(1), decoded], dim=1), predicted

