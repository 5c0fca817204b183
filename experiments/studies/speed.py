r"""Hand-written PyTorch references for pyrovae's speed benchmark (``experiments/benchmark_speed.py``).

Each reference does exactly what the corresponding pyrovae path does, written the way a PyTorch
user would write it without Pyro: the same networks (the same ``nn.Module`` objects or copies),
the same data and batch, the same optimiser (``torch.optim.Adam``), and the same estimator:

- :func:`handwritten_loss`: K reparameterized draws z = μ + σ ε per point, the Monte Carlo
  log-weights log p(x|z) + log p(z) − log q(z|x), and either their mean (the K-sample ELBO of
  ``Trace_ELBO(num_particles=K, vectorize_particles=True)``) or their log-mean-exp (IWAE), summed
  over the batch and scaled by N/B. ``log_likelihood="bce"`` is the usual
  ``F.binary_cross_entropy_with_logits``; ``"fused"`` is pyrovae's own Bernoulli kernel
  (:class:`pyrovae.distributions.BernoulliEvent`), so that a comparison with it isolates Pyro's
  per-step overhead from the choice of kernel.
- :func:`handwritten_log_likelihood`: batched importance sampling of log p(x) with running
  log-sum-exps, the reference for :func:`pyrovae.infer.evaluate.importance_sampling`.
- :func:`handwritten_local_fit`: Adam on an ``(N, d)`` table of Gaussian means and log-scales,
  closed-form KL, one draw per step, the reference for :func:`pyrovae.infer.local.optimize_local_guide`.
- :class:`TutorialEncoder`, :class:`TutorialDecoder`: the networks of Pyro's VAE tutorial, written
  as a user writes them (their own ``nn.Module``), the benchmark's first network; NumPyro's peer
  (``studies/numpyro_peer.py``) builds the same network with ``stax``.

Drawing ε with ``torch.randn`` in the order Pyro does (one ``(K, B, d)`` draw per step) makes the
reference's loss equal pyrovae's for the same seed; ``experiments/tests/test_speed.py`` checks that, so the
benchmark compares equal work.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from torch import nn
from torch.nn import functional as F

from pyrovae.distributions import BernoulliEvent

__all__ = [
    "Timing",
    "TutorialDecoder",
    "TutorialEncoder",
    "count_macs",
    "handwritten_local_fit",
    "handwritten_log_likelihood",
    "handwritten_loss",
    "interleaved_timings",
]

_LOG_2PI = math.log(2 * math.pi)


class TutorialEncoder(nn.Module):
    """Pyro's VAE tutorial encoder: fc1 784→400, softplus, then loc = fc21 and scale = exp(fc22)."""

    def __init__(self, x_dim: int = 784, hidden: int = 400, z_dim: int = 50) -> None:
        super().__init__()
        self.fc1 = nn.Linear(x_dim, hidden)
        self.fc21 = nn.Linear(hidden, z_dim)
        self.fc22 = nn.Linear(hidden, z_dim)
        self.softplus = nn.Softplus()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.softplus(self.fc1(x))
        return self.fc21(hidden), torch.exp(self.fc22(hidden))


class TutorialDecoder(nn.Module):
    """Pyro's VAE tutorial decoder: fc1 50→400, softplus, fc21 400→784, returning the Bernoulli
    logits (the tutorial applies a sigmoid; pyrovae's VAE takes logits)."""

    def __init__(self, z_dim: int = 50, hidden: int = 400, x_dim: int = 784) -> None:
        super().__init__()
        self.fc1 = nn.Linear(z_dim, hidden)
        self.fc21 = nn.Linear(hidden, x_dim)
        self.softplus = nn.Softplus()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc21(self.softplus(self.fc1(z)))


def bernoulli_log_likelihood(logits: torch.Tensor, x: torch.Tensor, kind: str = "bce") -> torch.Tensor:
    """Σ_d log Bernoulli(x_d | σ(logits_d)) over the last dim, by ``"bce"`` (torch's
    ``binary_cross_entropy_with_logits``, as most PyTorch VAEs write it) or ``"fused"``."""
    if kind == "bce":
        return -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
    if kind == "fused":
        return BernoulliEvent(logits).log_prob(x)
    raise ValueError(f"unknown log-likelihood kernel {kind!r}; choose 'bce' or 'fused'")


def handwritten_log_weights(
    encoder: nn.Module, decoder: nn.Module, x: torch.Tensor, num_particles: int, log_likelihood: str = "bce"
) -> torch.Tensor:
    """``(K, B)`` log p(x, z_k) − log q(z_k | x) with z_k = μ(x) + σ(x) ε_k."""
    loc, scale = encoder(x)
    eps = torch.randn((num_particles,) + loc.shape, dtype=loc.dtype, device=loc.device)
    z = loc + scale * eps
    logits = decoder(z)
    d = loc.shape[-1]
    log_pz = -0.5 * z.pow(2).sum(-1) - 0.5 * d * _LOG_2PI
    log_qz = -0.5 * eps.pow(2).sum(-1) - scale.log().sum(-1) - 0.5 * d * _LOG_2PI
    return bernoulli_log_likelihood(logits, x, log_likelihood) + log_pz - log_qz


def handwritten_loss(
    encoder: nn.Module,
    decoder: nn.Module,
    x: torch.Tensor,
    num_data: int,
    num_particles: int = 1,
    objective: str = "elbo",
    log_likelihood: str = "bce",
) -> torch.Tensor:
    """The negative K-sample ELBO (``objective="elbo"``) or IWAE bound of the batch, × N/B."""
    log_w = handwritten_log_weights(encoder, decoder, x, num_particles, log_likelihood)
    if objective == "elbo":
        per_point = log_w.mean(0)
    elif objective == "iwae":
        per_point = torch.logsumexp(log_w, 0) - math.log(num_particles)
    else:
        raise ValueError(f"unknown objective {objective!r}; choose 'elbo' or 'iwae'")
    return -per_point.sum() * (num_data / x.shape[0])


@torch.no_grad()
def handwritten_log_likelihood(
    encoder: nn.Module,
    decoder: nn.Module,
    x: torch.Tensor,
    num_samples: int = 5000,
    chunk_size: int = 100,
    batch_size: int = 100,
    log_likelihood: str = "fused",
) -> torch.Tensor:
    """Importance-sampled log p̂(x) per point (K = ``num_samples`` draws from q), batched and
    streamed in chunks of draws with running log-sum-exps."""
    out = []
    for xb in x.split(batch_size):
        lse: Optional[torch.Tensor] = None
        done = 0
        while done < num_samples:
            k = min(chunk_size, num_samples - done)
            log_w = handwritten_log_weights(encoder, decoder, xb, k, log_likelihood)
            chunk = torch.logsumexp(log_w, 0)
            lse = chunk if lse is None else torch.logaddexp(lse, chunk)
            done += k
        assert lse is not None
        out.append(lse - math.log(num_samples))
    return torch.cat(out)


def handwritten_local_fit(
    decoder: nn.Module, x: torch.Tensor, z_dim: int, steps: int, lr: float = 1e-2, log_likelihood: str = "fused"
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Gaussian q_i = N(μ_i, diag σ_i²) per point of ``x``, all optimised at once by Adam on
    Σ_i ELBO_i (one draw per point and step, KL in closed form), the decoder fixed."""
    loc = torch.zeros(x.shape[0], z_dim, device=x.device, requires_grad=True)
    log_scale = torch.zeros(x.shape[0], z_dim, device=x.device, requires_grad=True)
    optimizer = torch.optim.Adam([loc, log_scale], lr=lr)
    requires = [p.requires_grad for p in decoder.parameters()]
    for p in decoder.parameters():
        p.requires_grad_(False)
    try:
        for _ in range(steps):
            scale = log_scale.exp()
            z = loc + scale * torch.randn_like(loc)
            kl = 0.5 * (loc.pow(2) + scale.pow(2) - 1).sum(-1) - log_scale.sum(-1)
            loss = -(bernoulli_log_likelihood(decoder(z), x, log_likelihood) - kl).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    finally:
        for p, r in zip(decoder.parameters(), requires):
            p.requires_grad_(r)
    return loc.detach(), log_scale.detach().exp()


def count_macs(sizes: list[int]) -> int:
    """Multiply-adds of one pass through an MLP with layer widths ``sizes`` (e.g. [50, 400, 784])."""
    return sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))


@dataclass
class Timing:
    """Seconds per call of each contestant in each repeat, and their summary."""

    seconds: dict[str, list[float]]

    def median(self, name: str) -> float:
        return statistics.median(self.seconds[name])

    def ratio(self, name: str, reference: str) -> float:
        """Median over repeats of the per-repeat ratio ``name / reference`` (paired, so slow
        stretches of a shared machine hit both sides of a pair alike)."""
        return statistics.median(a / b for a, b in zip(self.seconds[name], self.seconds[reference]))

    def to_dict(self) -> dict[str, Any]:
        return {"median_seconds": {n: self.median(n) for n in self.seconds}, "seconds": self.seconds}


def interleaved_timings(
    contestants: dict[str, Callable[[], Any]],
    repeats: int = 5,
    calls: int = 10,
    warmup: Union[int, dict[str, int]] = 2,
    sync: Optional[Callable[[], None]] = None,
    setup: Optional[dict[str, Callable[[], None]]] = None,
) -> Timing:
    """Time each contestant's ``calls`` calls, contestants alternating within every repeat.

    :param warmup: untimed calls of each contestant first (one number, or one per contestant).
    :param sync: called before reading the clock (``torch.cuda.synchronize`` on a GPU).
    :param setup: per contestant, run (untimed) before its warm-up and before each of its timed
        blocks, e.g. to put its params into Pyro's param store.
    :return: seconds per call, per repeat, for every contestant.
    """
    sync = sync or (lambda: None)
    setup = setup or {}
    for name, fn in contestants.items():
        setup.get(name, lambda: None)()
        for _ in range(warmup if isinstance(warmup, int) else warmup.get(name, 0)):
            fn()
    seconds: dict[str, list[float]] = {name: [] for name in contestants}
    for r in range(repeats):
        # Alternate the order, so neither side always runs right after the other.
        order = list(contestants.items())
        if r % 2:
            order.reverse()
        for name, fn in order:
            setup.get(name, lambda: None)()
            sync()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            sync()
            seconds[name].append((time.perf_counter() - start) / calls)
    return Timing(seconds)
