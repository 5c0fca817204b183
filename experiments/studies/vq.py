"""VQ-VAE after training: encode a data set to codes, fit an autoregressive prior over the code
grids with :func:`pyrovae.fit`, score test codes under it, and sample new images."""

from __future__ import annotations

from typing import Any, Optional

import torch

from pyrovae.data import Dataset
from pyrovae.infer.objectives import make_objective
from pyrovae.models.code_prior import CodePrior, ConditionalCodePrior, empty_guide
from pyrovae.models.vqvae import VQVAE, VQVAE2, VQ2Guide, VQGuide
from pyrovae.train import History, fit

__all__ = ["code_dataset", "fit_code_prior", "sample_images"]


@torch.no_grad()
def encode(guide: VQGuide, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Integer code grids ``(N, H', W')`` of the images ``x``."""
    return torch.cat([guide.codes(xb) for xb in x.split(batch_size)])


def code_dataset(guide: VQGuide, train: torch.Tensor, test: torch.Tensor) -> Dataset:
    """The code grids of a data set as a :class:`~pyrovae.data.Dataset` of flattened floats (so
    that :func:`pyrovae.fit` batches them like images; :class:`CodePrior` rounds them back)."""
    def flat(x: torch.Tensor) -> torch.Tensor:
        return encode(guide, x).flatten(1).float()

    return Dataset(name="codes", train=flat(train), test=flat(test), likelihood="gaussian", binarize="none")


def fit_code_prior(
    model: VQVAE, guide: VQGuide, dataset: Dataset, *, epochs: int = 10, batch_size: int = 128, lr: float = 1e-3,
    channels: int = 64, layers: int = 4, checkpoint_path: Optional[str] = None, resume: bool = False,
    progress: bool = False, seed: int = 0,
) -> tuple[CodePrior, History, Dataset]:
    """Fit a :class:`CodePrior` to the codes the VQ-VAE gives the (binarized once) training set, by
    maximum likelihood (SVI with an empty guide). The test bound in the history is
    log p(codes) per test image."""
    generator = torch.Generator(device=dataset.train.device).manual_seed(seed)
    train = dataset.batch(dataset.train, generator)
    test = dataset.batch(dataset.test, generator)
    codes = code_dataset(guide, train, test)
    prior = CodePrior(model.num_codes, model.grid, channels=channels, layers=layers)
    prior.net.to(dataset.train.device)
    history = fit(prior, empty_guide, codes, make_objective("elbo"), epochs=epochs, batch_size=batch_size, lr=lr,
                  checkpoint_path=checkpoint_path, resume=resume, progress=progress, seed=seed, handle_signals=False)
    return prior, history, codes


@torch.no_grad()
def sample_images(model: VQVAE, prior: CodePrior, num: int, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """New images from the fitted prior: codes ~ p(c), then the decoder's mean. Returns the codes
    ``(num, H', W')`` and the images ``(num, x_dim)``."""
    device = model.codebook.device
    codes = prior.sample(num, device=device, temperature=temperature)
    return codes, model.decode_codes(codes)


def prior_metrics(model: VQVAE, guide: VQGuide, prior: CodePrior, x: torch.Tensor, codes: torch.Tensor) -> dict[str, Any]:
    """Per-image bounds with the fitted prior: log p(x) ≥ log p(x | z_q) + log p_prior(c(x))."""
    grid = codes.round().long().reshape(-1, *model.grid)
    with torch.no_grad():
        log_prior = torch.cat([prior.log_prob(c) for c in grid.split(1000)])
        log_lik = torch.cat([
            model.likelihood_dist(model.decoder(model.codebook[c])).log_prob(xb)
            for c, xb in zip(grid.split(1000), x.split(1000))
        ])
    return {
        "log_prior_codes": log_prior.mean().item(),
        "uniform_log_prior_codes": -grid[0].numel() * torch.log(torch.tensor(float(model.num_codes))).item(),
        "bound_with_prior": (log_lik + log_prior).mean().item(),
    }


def fit_code_priors_2(
    model: VQVAE2, guide: VQ2Guide, dataset: Dataset, *, epochs: int = 10, batch_size: int = 128, lr: float = 1e-3,
    channels: int = 64, layers: int = 4, progress: bool = False, seed: int = 0,
) -> dict[str, Any]:
    """VQ-VAE-2's two priors, each by maximum likelihood with :func:`pyrovae.fit`: p(c_top) over the
    top grid and p(c_bottom | c_top) over the bottom grid."""
    generator = torch.Generator(device=dataset.train.device).manual_seed(seed)
    train, test = dataset.batch(dataset.train, generator), dataset.batch(dataset.test, generator)

    def grids(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [guide.codes(xb) for xb in x.split(1000)]
        return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])

    (train_b, train_t), (test_b, test_t) = grids(train), grids(test)
    top_data = Dataset(name="codes-top", train=train_t.flatten(1).float(), test=test_t.flatten(1).float(),
                       likelihood="gaussian", binarize="none")
    both = Dataset(name="codes-bottom", train=torch.cat([train_b.flatten(1), train_t.flatten(1)], 1).float(),
                   test=torch.cat([test_b.flatten(1), test_t.flatten(1)], 1).float(), likelihood="gaussian", binarize="none")
    device = dataset.train.device
    top = CodePrior(model.num_codes_top, model.grid_top, channels=channels, layers=layers, name="code_prior_top")
    bottom = ConditionalCodePrior(model.num_codes, model.grid, model.num_codes_top, model.grid_top,
                                  channels=channels, layers=layers)
    top.net.to(device)
    bottom.net.to(device)
    options = dict(epochs=epochs, batch_size=batch_size, lr=lr, progress=progress, seed=seed, handle_signals=False)
    history_top = fit(top, empty_guide, top_data, make_objective("elbo"), **options)
    history_bottom = fit(bottom, empty_guide, both, make_objective("elbo"), **options)
    return {"top": top, "bottom": bottom, "history_top": history_top, "history_bottom": history_bottom,
            "test_codes": (test_b, test_t)}


@torch.no_grad()
def sample_images_2(model: VQVAE2, top: CodePrior, bottom: ConditionalCodePrior, num: int,
                    temperature: float = 1.0) -> torch.Tensor:
    """New images from VQ-VAE-2's priors: c_top ~ p(c_top), c_bottom ~ p(c_bottom | c_top), decoded."""
    codes_top = top.sample(num, device=model.networks.codebook_top.device, temperature=temperature)
    codes_bottom = bottom.sample_given(codes_top, temperature)
    return model.decode_codes(codes_bottom, codes_top)
