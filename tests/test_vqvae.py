"""VQ-VAE as a Pyro model/guide pair: the Trace_ELBO loss is exactly reconstruction + codebook +
commitment losses (+ the constant KL of the uniform prior); the codebook gets its gradient only from
the codebook loss, the encoder the straight-through reconstruction gradient plus the commitment
gradient; codes are the nearest codebook rows. The code priors fitted by the VQ study
(``experiments/studies/vq.py``) are tested in ``experiments/tests/test_vqvae_study.py``."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pyrovae import TrainConfig
from pyrovae.app.build import build
from pyrovae.data import Dataset
from pyrovae.infer.objectives import make_objective
from pyrovae.models.vqvae import (
    VQVAE,
    CodebookUniform,
    VQDecoder,
    VQEncoder,
    VQGuide,
    code_perplexity,
    nearest_codes,
)

NUM_DATA, K, D, BETA = 50, 6, 3, 0.25


def _pair():  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    encoder = VQEncoder((1, 8, 8), D, channels=(4, 5))
    model = VQVAE(VQDecoder((1, 8, 8), D, channels=(4, 5)), K, D, encoder.grid)
    with torch.no_grad():
        model.codebook.normal_()
    return model, VQGuide(encoder, model, commitment=BETA)


def test_nearest_codes_is_brute_force() -> None:
    z = torch.randn(4, 2, 2, D)
    codebook = torch.randn(K, D)
    brute = torch.cdist(z.reshape(-1, D), codebook).argmin(1).reshape(4, 2, 2)
    assert torch.equal(nearest_codes(z, codebook), brute)


def test_loss_and_gradients_are_the_papers() -> None:
    model, guide = _pair()
    x = torch.bernoulli(torch.rand(5, 64))
    index = torch.arange(5)
    loss = make_objective("elbo").differentiable_loss(model, guide, x, index, NUM_DATA)
    params = [model.codebook, *guide.encoder.parameters()]
    grads = torch.autograd.grad(loss, params)

    # By hand: z_e, nearest codes, straight-through decoder input, the three losses, scaled N/B.
    z_e = guide.encoder(x)
    codes = nearest_codes(z_e.detach(), model.codebook.detach())
    e = model.codebook[codes]
    z_q = z_e + (e - z_e).detach()
    log_lik = model.likelihood_dist(model.decoder(z_q)).log_prob(x)
    vq = (z_e.detach() - e).pow(2).sum((-3, -2, -1)) + BETA * (z_e - e.detach()).pow(2).sum((-3, -2, -1))
    cells = math.prod(model.grid)
    hand = (NUM_DATA / 5) * (-log_lik + cells * math.log(K) + vq).sum()
    assert loss.item() == pytest.approx(hand.item(), rel=1e-6)
    hand_grads = torch.autograd.grad(hand, params)
    for ours, theirs in zip(grads, hand_grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # The codebook's gradient is the codebook loss's alone: (N/B) 2 Σ_{cells with code c} (e_c - z_e).
    expected = torch.zeros(K, D)
    expected.index_add_(0, codes.reshape(-1), 2 * (e - z_e).detach().reshape(-1, D))
    torch.testing.assert_close(grads[0], (NUM_DATA / 5) * expected, rtol=1e-5, atol=1e-5)


def test_uniform_prior_over_codes() -> None:
    codebook = torch.randn(K, D)
    prior = CodebookUniform(codebook, (2, 3), (4,))
    z = prior.sample((7,))
    assert z.shape == (7, 4, 2, 3, D)
    rows = z.reshape(-1, D)
    assert (rows[:, None, :] == codebook[None]).all(-1).any(1).all(), "samples are codebook vectors"
    assert torch.allclose(prior.log_prob(z), torch.full((7, 4), -6 * math.log(K)))
    assert prior.expand((2, 4)).batch_shape == (2, 4)
    assert code_perplexity(torch.arange(K).repeat(3), K) == pytest.approx(K)
    assert code_perplexity(torch.zeros(9, dtype=torch.long), K) == pytest.approx(1.0)


def test_build_refuses_what_does_not_apply() -> None:
    data = Dataset(name="mnist", train=torch.rand(10, 784), test=torch.rand(4, 784), likelihood="bernoulli",
                   image_shape=(1, 28, 28))
    with pytest.raises(ValueError, match="objective='elbo'"):
        build(TrainConfig(model="vqvae", objective="iwae", num_particles=5), data)
    with pytest.raises(ValueError, match="commitment"):
        build(TrainConfig(model="vqvae", beta=2.0), data)
    model, guide = build(TrainConfig(model="vqvae", z_dim=8, num_codes=32), data)
    assert isinstance(guide, VQGuide) and model.codebook.shape == (32, 8) and model.grid == (7, 7)


def test_cli_trains_evaluates_and_samples_a_vqvae(tmp_path, mnist_root) -> None:  # type: ignore[no-untyped-def]
    from pyrovae.app.cli import main
    from pyrovae.app.run import evaluate_checkpoint

    out = tmp_path / "vq"
    assert main([
        "train", "--model", "vqvae", "--z-dim", "4", "--num-codes", "16", "--epochs", "1", "--num-train", "300",
        "--num-test", "40", "--data-dir", str(mnist_root), "--out", str(out), "--no-progress",
    ]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 1 <= metrics["perplexity"] <= 16 and metrics["codes_used"] <= 16
    assert metrics["test_log_likelihood"] < metrics["test_reconstruction_log_lik"] < 0
    again = evaluate_checkpoint(out / "checkpoint.pt", data_dir=str(mnist_root))
    assert again["perplexity"] == pytest.approx(metrics["perplexity"])
    assert main(["sample", "--checkpoint", str(out / "checkpoint.pt"), "--num", "4", "--out", str(tmp_path / "s.png")]) == 0


def test_code_prior_is_autoregressive_and_normalised() -> None:
    from itertools import product

    from pyrovae.models.code_prior import CodePrior

    torch.manual_seed(0)
    prior = CodePrior(num_codes=3, grid=(2, 3), channels=8, layers=2)
    # Normalised: the probabilities of all 3^6 grids sum to one (enumeration).
    grids = torch.tensor(list(product(range(3), repeat=6))).reshape(-1, 2, 3)
    assert prior.log_prob(grids).exp().sum().item() == pytest.approx(1.0, abs=1e-5)
    # Autoregressive: the logits at a cell do not depend on that cell or any later one.
    codes = torch.randint(3, (4, 2, 3))
    base = prior.logits(codes)
    for position in range(6):
        changed = codes.clone()
        changed.view(4, 6)[:, position] = (changed.view(4, 6)[:, position] + 1) % 3
        diff = (prior.logits(changed) - base).abs().amax((0, 3)).reshape(6)
        assert (diff[: position + 1] == 0).all(), (position, diff)
        if position < 5:
            assert diff[position + 1 :].max() > 0
    samples = prior.sample(5)
    assert samples.shape == (5, 2, 3) and samples.min() >= 0 and samples.max() < 3


def test_vqvae2_loss_and_codebook_gradients() -> None:
    from pyrovae.models.vqvae import VQVAE2, VQ2Guide, VQ2Networks, quantize

    torch.manual_seed(1)
    networks = VQ2Networks((1, 8, 8), D, num_codes_top=4, num_codes_bottom=K, channels=6)
    with torch.no_grad():
        networks.codebook_top.normal_()
        networks.codebook_bottom.normal_()
    model, guide = VQVAE2(networks), VQ2Guide(VQVAE2(networks), commitment=BETA)
    guide.model = model
    x = torch.bernoulli(torch.rand(5, 64))
    loss = make_objective("elbo").differentiable_loss(model, guide, x, torch.arange(5), NUM_DATA)
    g_top, g_bottom = torch.autograd.grad(loss, [networks.codebook_top, networks.codebook_bottom])
    # By hand, level by level.
    features = networks.encode_bottom_features(x)
    z_e_top = networks._channels_last(networks.enc_top(features))
    z_top, codes_top, loss_top = quantize(z_e_top, networks.codebook_top, BETA)
    decoded = networks.top_to_bottom(networks._channels_first(z_top))
    z_e_bottom = networks._channels_last(networks.pre_bottom(torch.cat([features, decoded], 1)))
    z_bottom, codes_bottom, loss_bottom = quantize(z_e_bottom, networks.codebook_bottom, BETA)
    log_lik = model.likelihood_dist(networks((z_bottom, z_top))).log_prob(x)
    kl = 4 * 4 * math.log(K) + 2 * 2 * math.log(4)
    hand = (NUM_DATA / 5) * (-log_lik + kl + loss_top + loss_bottom).sum()
    assert loss.item() == pytest.approx(hand.item(), rel=1e-6)
    for grad, codebook, codes, z_e in ((g_top, networks.codebook_top, codes_top, z_e_top),
                                       (g_bottom, networks.codebook_bottom, codes_bottom, z_e_bottom)):
        expected = torch.zeros_like(codebook)
        expected.index_add_(0, codes.reshape(-1), 2 * (codebook[codes] - z_e).detach().reshape(-1, D))
        torch.testing.assert_close(grad, (NUM_DATA / 5) * expected, rtol=1e-5, atol=1e-5)


def test_conditional_code_prior_is_normalised_for_each_condition() -> None:
    from itertools import product

    from pyrovae.models.code_prior import ConditionalCodePrior

    torch.manual_seed(0)
    prior = ConditionalCodePrior(num_codes=2, grid=(2, 2), cond_num_codes=3, cond_grid=(1, 1), channels=8, layers=1)
    grids = torch.tensor(list(product(range(2), repeat=4))).reshape(-1, 2, 2)
    totals = []
    for c in range(3):
        condition = prior.condition_from(torch.full((grids.shape[0], 1, 1), c))
        totals.append(prior.log_prob(grids, condition).exp().sum().item())
    assert totals == pytest.approx([1.0, 1.0, 1.0], abs=1e-5)
    a = prior.condition_from(torch.zeros(1, 1, 1, dtype=torch.long))
    b = prior.condition_from(torch.ones(1, 1, 1, dtype=torch.long))
    assert not torch.allclose(prior.logits(grids[:1], a), prior.logits(grids[:1], b))  # it listens to the condition


def test_cli_refuses_a_bad_combination_before_writing(tmp_path, mnist_root, capsys) -> None:  # type: ignore[no-untyped-def]
    from pyrovae.app.cli import main

    out = tmp_path / "never"
    with pytest.raises(SystemExit) as stop:
        main(["train", "--model", "vqvae", "--objective", "iwae", "--num-particles", "5", "--out", str(out),
              "--num-train", "10", "--data-dir", str(mnist_root)])
    assert stop.value.code == 2 and not out.exists()
    assert "--objective elbo" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# EMA codebook (--codebook-ema)


def _ema_pair(decay: float):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    encoder = VQEncoder((1, 8, 8), D, channels=(4, 5))
    model = VQVAE(VQDecoder((1, 8, 8), D, channels=(4, 5)), K, D, encoder.grid, ema_decay=decay)
    return model, VQGuide(encoder, model, commitment=BETA)


def test_ema_codebook_is_debiased_online_k_means() -> None:
    # Two training steps by hand: debiased moving averages of counts and sums, Laplace-smoothed
    # counts, codes never assigned unchanged; the codebook is no parameter and gets no gradient.
    from pyro import poutine

    decay, eps = 0.9, 1e-5
    model, guide = _ema_pair(decay)
    assert "codebook" not in dict(model.decoder.named_parameters())
    count, total = torch.zeros(K, dtype=torch.float64), torch.zeros(K, D, dtype=torch.float64)
    for step in (1, 2):
        x = torch.bernoulli(torch.rand(5, 64, generator=torch.Generator().manual_seed(step)))
        before = model.codebook.clone()
        with torch.no_grad():
            z_e = guide.encoder(x)
            codes = nearest_codes(z_e, before)
        guide_trace = poutine.trace(guide).get_trace(x, torch.arange(5), NUM_DATA)
        # The factor is the commitment loss alone, at the codebook of before the step.
        expected_loss = BETA * (z_e - before[codes]).pow(2).sum((-3, -2, -1))
        assert torch.allclose(guide_trace.nodes["vq_loss"]["fn"].log_factor, expected_loss, atol=1e-5)

        n = torch.bincount(codes.reshape(-1), minlength=K).double()
        s = torch.zeros(K, D, dtype=torch.float64).index_add_(0, codes.reshape(-1), z_e.reshape(-1, D).double())
        count, total = decay * count + (1 - decay) * n, decay * total + (1 - decay) * s
        debiased_n, debiased_s = count / (1 - decay**step), total / (1 - decay**step)
        smoothed = (debiased_n + eps) / (debiased_n.sum() + K * eps) * debiased_n.sum()
        expected = torch.where((debiased_n > 0)[:, None], debiased_s / smoothed[:, None], before.double())
        assert torch.allclose(model.codebook.double(), expected, atol=1e-5), step
        assert (n == 0).any() or step == 2  # some code unused (checked unchanged by `expected`)

    # Evaluation (no gradients) leaves the codebook alone.
    frozen = model.codebook.clone()
    with torch.no_grad():
        poutine.trace(guide).get_trace(x, torch.arange(5), NUM_DATA)
    assert torch.equal(model.codebook, frozen)


def test_ema_codebook_is_refused_in_data_parallel_training(monkeypatch) -> None:
    # Each process would move its codebook by its own slice (buffers are not all-reduced), so under
    # a process group of two the training step refuses; in one process, or without gradients
    # (evaluation), nothing changes.
    import torch.distributed
    from pyro import poutine

    model, guide = _ema_pair(0.9)
    x = torch.bernoulli(torch.rand(5, 64, generator=torch.Generator().manual_seed(0)))
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    with pytest.raises(ValueError, match="not supported in data-parallel training"):
        poutine.trace(guide).get_trace(x, torch.arange(5), NUM_DATA)
    assert int(model.decoder.codebook_ema_steps) == 0
    with torch.no_grad():
        poutine.trace(guide).get_trace(x, torch.arange(5), NUM_DATA)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 1)
    poutine.trace(guide).get_trace(x, torch.arange(5), NUM_DATA)
    assert int(model.decoder.codebook_ema_steps) == 1


def test_ema_codebook_trains_from_the_cli_and_resumes_exactly(tmp_path, mnist_root) -> None:  # type: ignore[no-untyped-def]
    from pyrovae.app.cli import main

    args = ["train", "--model", "vqvae", "--codebook-ema", "0.95", "--z-dim", "4", "--num-codes", "16",
            "--num-train", "200", "--num-test", "20", "--batch-size", "50", "--eval-samples", "1",
            "--data-dir", str(mnist_root), "--no-progress"]
    assert main(args + ["--epochs", "2", "--out", str(tmp_path / "full")]) == 0
    assert main(args + ["--epochs", "1", "--out", str(tmp_path / "split")]) == 0
    assert main(args + ["--epochs", "2", "--out", str(tmp_path / "split"), "--resume"]) == 0
    from pyrovae.runtime.checkpoint import load_checkpoint  # weights_only, with the param store's constraints allowed

    full = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["modules"]["decoder"]
    split = load_checkpoint(tmp_path / "split" / "checkpoint.pt")["modules"]["decoder"]
    assert int(full["codebook_ema_steps"]) == 8  # 2 epochs × 4 batches: one update per training step
    assert all(torch.equal(full[k], split[k]) for k in full)
    metrics = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert metrics["codes_used"] > 1


def test_ema_codebook_refused_where_it_does_not_apply() -> None:
    data = Dataset(name="mnist", train=torch.rand(10, 784), test=torch.rand(4, 784), likelihood="bernoulli",
                   image_shape=(1, 28, 28))
    with pytest.raises(ValueError, match="codebook_ema must be in"):
        TrainConfig(model="vqvae", codebook_ema=1.0)
    with pytest.raises(ValueError, match="has none: drop it"):
        build(TrainConfig(model="vae", codebook_ema=0.99), data)


def test_vqvae2_ema_updates_both_codebooks_in_training_steps_only() -> None:
    from pyro import poutine

    data = Dataset(name="mnist", train=torch.rand(10, 784), test=torch.rand(4, 784), likelihood="bernoulli",
                   image_shape=(1, 28, 28))
    torch.manual_seed(0)
    model, guide = build(TrainConfig(model="vqvae2", z_dim=4, num_codes=8, codebook_ema=0.9), data)
    net = model.networks
    assert not any("codebook" in name for name, _ in net.named_parameters())
    x = torch.bernoulli(data.train[:3])
    with torch.no_grad():
        poutine.trace(guide).get_trace(x, torch.arange(3), 10)
    assert int(net.codebook_top_ema_steps) == int(net.codebook_bottom_ema_steps) == 0
    top, bottom = net.codebook_top.clone(), net.codebook_bottom.clone()
    codes_bottom, codes_top = guide.codes(x)
    poutine.trace(guide).get_trace(x, torch.arange(3), 10)
    assert int(net.codebook_top_ema_steps) == int(net.codebook_bottom_ema_steps) == 1
    # Codes used in the step move; the others keep their vectors.
    for codebook, before, codes in ((net.codebook_top, top, codes_top), (net.codebook_bottom, bottom, codes_bottom)):
        used = torch.unique(codes)
        assert not torch.equal(codebook[used], before[used])
        unused = torch.ones(codebook.shape[0], dtype=torch.bool)
        unused[used] = False
        assert torch.equal(codebook[unused], before[unused])
