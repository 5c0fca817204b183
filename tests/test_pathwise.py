"""STL and DReG gradient estimators (pyrovae.infer.objectives.pathwise): what they refuse, and
training with them from the CLI. Their statistics (unbiasedness against the closed-form
linear-Gaussian gradient, zero variance at the exact posterior, IWAE-STL's bias) need the gradient
study's harness and are tested in ``experiments/tests/test_pathwise_estimators.py``.
"""

from __future__ import annotations

import json

import pytest
import torch

from pyrovae.app.cli import main
from pyrovae.guides import AmortizedGuide, HierarchicalGuide
from pyrovae.handlers import score_function
from pyrovae.infer.objectives import make_objective
from pyrovae.models import VAE, HierarchicalVAE
from pyrovae.nets import Decoder, GaussianEncoder, HierarchicalDecoder, HierarchicalEncoder


def test_stl_refuses_guides_it_does_not_cover() -> None:
    decoder = HierarchicalDecoder(8, (3, 2), (6,), (4,))
    guide = HierarchicalGuide(HierarchicalEncoder(8, (3, 2), (6,), (4,)))
    x = torch.bernoulli(torch.rand(5, 8, dtype=torch.float64))
    model = HierarchicalVAE(decoder.double())
    guide.encoder.double()
    for name in ("elbo-stl", "iwae-dreg"):
        with pytest.raises(ValueError, match="one latent site"):
            make_objective(name, 2).loss(model, guide, x, torch.arange(5), 5)

    flat = VAE(Decoder(3, 8, (6,)).double(), 3)
    nonreparam = score_function(AmortizedGuide(GaussianEncoder(8, 3, (6,)).double()))
    with pytest.raises(ValueError, match="not reparameterized"):
        make_objective("iwae-dreg", 2).loss(flat, nonreparam, x, torch.arange(5), 5)
    with pytest.raises(ValueError, match="unknown IWAE gradient estimator"):
        make_objective("iwae", 2, estimator="magic")


@pytest.mark.parametrize("objective", ["elbo-stl", "iwae-dreg"])
def test_cli_trains_with_the_estimator(tmp_path, mnist_root, objective: str, check_reevaluation) -> None:  # type: ignore[no-untyped-def]
    code = main([
        "train", "--objective", objective, "--num-particles", "3", "--z-dim", "4", "--hidden-sizes", "16",
        "--epochs", "1", "--num-train", "200", "--num-test", "30", "--eval-samples", "10",
        "--data-dir", str(mnist_root), "--out", str(tmp_path), "--no-progress",
    ])
    assert code == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["config"]["objective"] == objective
    check_reevaluation(tmp_path, metrics, mnist_root)  # the reported test ELBO and log p̂ are the saved run's
