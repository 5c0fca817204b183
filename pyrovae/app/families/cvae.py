"""``model="cvae"``: the conditional VAE of Sohn et al. (2015) on the quadrant task of Pyro's
``examples/cvae`` (:mod:`pyrovae.models.cvae`, :mod:`pyrovae.guides.cvae`): ``quadrants`` of each
image observed, the others modelled.

A run first trains the deterministic baseline for ``cvae_baseline_epochs`` (checkpointed in
``OUT/baseline_checkpoint.pt``, resumable), then the CVAE, whose prior network reads the baseline's
prediction. The test metrics are the importance-sampled conditional log-likelihood (the standard
``test_log_likelihood``/``test_nll``: the model's only observed site is y, so they *are*
log p(y|x_obs)), named again as ``test_conditional_nll``, and the baseline's exact
``baseline_test_nll``; ``completions.png`` shows completions of test images.

CLI: ``pyrovae train --model cvae --quadrants 1 --cvae-baseline-epochs 10 --epochs 10``.
"""

from __future__ import annotations

from typing import Any

from pyrovae.app.config import ConfigError
from pyrovae.app.registry import ModelSpec

#: Test images shown in ``completions.png``, and CVAE samples drawn for each.
SHOWN, SAMPLES_SHOWN = 10, 4


def cvae_mask(config: Any, dataset: Any) -> Any:
    from pyrovae.models.quadrants import quadrant_mask

    return quadrant_mask(config.quadrants, dataset.image_shape).to(config.device)


def build_cvae(config: Any, dataset: Any) -> Any:
    from pyrovae.models.cvae import CVAE, CVAEBaseline
    from pyrovae.nets import MLP, GaussianEncoder

    mask, x_dim = cvae_mask(config, dataset), dataset.x_dim
    baseline = CVAEBaseline(MLP(x_dim, config.hidden_sizes, x_dim, config.activation).to(config.device), mask)
    prior_net = GaussianEncoder(x_dim, config.z_dim, config.hidden_sizes, config.activation)
    generation_net = MLP(config.z_dim + x_dim, config.hidden_sizes, x_dim, config.activation)
    return CVAE(prior_net.to(config.device), generation_net.to(config.device), mask, config.z_dim, baseline=baseline)


def build_cvae_guide(config: Any, dataset: Any, model: Any) -> Any:
    from pyrovae.guides.cvae import CVAEGuide
    from pyrovae.nets import GaussianEncoder

    return CVAEGuide(
        GaussianEncoder(model.x_dim, config.z_dim, config.hidden_sizes, config.activation).to(config.device)
    )


def check_cvae(config: Any) -> None:
    if config.network != "mlp" or config.beta != 1.0 or config.weight_init != "torch":
        raise ConfigError(
            "model='cvae' has MLP networks with torch's initialisation and no KL weight: drop "
            "network, beta and weight_init",
            "network",
            "beta",
            "weight_init",
        )


def cvae_defaults(flat: dict[str, Any]) -> dict[str, Any]:
    return {"quadrants": 1} if flat.get("quadrants") is None else {}


def pretrain_baseline(
    config: Any, dataset: Any, model: Any, *, checkpoint_path: Any, resume: bool, progress: bool
) -> None:
    """The baseline by maximum likelihood (:func:`pyrovae.train.baseline.fit_baseline`), before the CVAE;
    its history stays in its checkpoint (``baseline_checkpoint.pt``)."""
    from pyrovae.train.baseline import fit_baseline

    fit_baseline(
        model.baseline,
        dataset,
        epochs=config.cvae_baseline_epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        lr_decay=config.lr_decay,
        seed=config.seed,
        checkpoint_path=checkpoint_path,
        resume=resume,
        config=config.to_dict(),
        progress=progress,
        clip_norm=config.clip_norm,
        fast_path=config.fast_path,
    )


def cvae_metrics(config: Any, model: Any, guide: Any, x_test: Any, evaluation: Any) -> dict[str, Any]:
    """The CVAE's importance-sampled test conditional NLL (from ``evaluation``, the run's
    :func:`~pyrovae.infer.evaluate.evaluate_dataset` of the pair: K = ``eval_samples`` draws of
    q(z|x_obs, y)) with its Monte Carlo standard error, beside the baseline's exact one; each also
    with the standard error of its mean over the test points, and the CVAE's gain over the baseline
    (baseline NLL - CVAE NLL) with its paired standard error over the test points."""
    from pyrovae.infer.conditional import baseline_log_likelihood

    cvae = evaluation.log_likelihood.double()
    baseline = baseline_log_likelihood(model.baseline, x_test, batch_size=config.eval_batch).cpu().double()
    assert cvae.shape == baseline.shape == (x_test.shape[0],)
    n = cvae.numel()

    def data_se(values: Any) -> float:
        return (values.std() / n**0.5).item() if n > 1 else 0.0

    return {
        "quadrants": config.quadrants,
        "test_conditional_nll": -cvae.mean().item(),
        "test_conditional_nll_se": evaluation.standard_errors()["log_likelihood_se"],
        "test_conditional_nll_data_se": data_se(cvae),
        "baseline_test_nll": -baseline.mean().item(),
        "baseline_test_nll_se": 0.0,  # exact: no latent, nothing sampled
        "baseline_test_nll_data_se": data_se(baseline),
        "cvae_gain_over_baseline": (cvae - baseline).mean().item(),
        "cvae_gain_over_baseline_data_se": data_se(cvae - baseline),
        "baseline_epochs": config.cvae_baseline_epochs,
    }


def save_completions(out: Any, dataset: Any, model: Any, guide: Any, seed: int = 0) -> None:
    """``completions.png``: for the first test images, one column each, the rows are the observed
    quadrants (the others grey), the baseline's prediction, :data:`SAMPLES_SHOWN` CVAE completions
    (z from the prior network), and the image itself."""
    import torch

    from pyrovae.app import plots
    from pyrovae.train import evaluation_data

    x = evaluation_data(dataset, "test", seed)[:SHOWN]
    torch.manual_seed(seed)
    rows = completion_rows(model, x)
    plots.save_image_grid(
        rows.reshape(-1, rows.shape[-1]).cpu(), out / "completions.png", dataset.image_shape, nrow=x.shape[0]
    )


def completion_rows(model: Any, x: Any, num_samples: int = SAMPLES_SHOWN) -> Any:
    """``(num_samples + 3, B, D)``: observed quadrants (the others at 0.5), the baseline's completion,
    ``num_samples`` CVAE completions, the images."""
    import torch

    observed = torch.where(model.mask, x, torch.full_like(x, 0.5))
    with torch.no_grad():
        return torch.cat([observed[None], model.baseline.complete(x)[None], model.complete(x, num_samples), x[None]])


SPECS = (
    ModelSpec(
        name="cvae",
        build=build_cvae,
        help="conditional VAE (Sohn et al. 2015) on MNIST quadrants: p(z|x_obs) p(y|x_obs, z), with its baseline",
        options=("quadrants", "cvae_baseline_epochs"),
        guides=("amortized",),
        likelihoods=("bernoulli",),
        needs_images=True,
        amortized_guide=build_cvae_guide,
        check=check_cvae,
        defaults=cvae_defaults,
        pretrain=pretrain_baseline,
        metrics=cvae_metrics,
        figures=save_completions,
        conditional=True,
    ),
)
