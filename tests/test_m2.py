"""M2 (Kingma et al. 2014; :mod:`pyrovae.models.m2`, :mod:`pyrovae.guides.m2`) against answers
computed by hand from its networks: the enumerated loss is the brute-force sum over the classes, a
labelled point's loss is the supervised ELBO plus exactly α (-log q(y|x)), the sampled estimators
agree with the enumerated value within Monte Carlo error, and the label picker is balanced."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceEnum_ELBO
from pyro.poutine.messenger import Messenger
from torch.nn import functional as F

from pyrovae.data import balanced_label_subset, partial_labels
from pyrovae.guides.m2 import M2Guide, m2_pair
from pyrovae.infer.objectives import make_objective
from pyrovae.infer.semi_supervised import classification_error, unlabelled_elbo
from pyrovae.models.m2 import StraightThroughCategorical, join_labels, paper_alpha, split_labels

pytestmark = pytest.mark.usefixtures("float64")

X_DIM, Z_DIM, C = 6, 2, 10
NUM_DATA = 40  # the plate's full size: the batch of 5 is scaled by 8
Z_MAX = 4.0  # sampled estimators: |estimate - enumerated| < 4 Monte Carlo standard errors


class RecordZ(Messenger):
    """Keeps the value of the guide's site ``z`` (the draws the objective made)."""

    def _postprocess_message(self, msg) -> None:  # type: ignore[no-untyped-def]
        if msg["name"] == "z":
            self.z = msg["value"].detach()


def pair(alpha: float = 0.0, y_mode: str = "enum", labelled_weight: float = 1.0):  # type: ignore[no-untyped-def]
    torch.manual_seed(1)
    return m2_pair(X_DIM, Z_DIM, C, hidden_sizes=(8,), alpha=alpha, y_mode=y_mode, labelled_weight=labelled_weight)


def batch(labels: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    x = torch.bernoulli(torch.full((len(labels), X_DIM), 0.4), generator=generator)
    labels_t = torch.tensor(labels)
    return x, labels_t, join_labels(x, labels_t, C)


def supervised_terms(model, guide, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """log p(x|y,z) + log p(y) + log p(z) - log q(z|x,y) from the networks, y one-hot ``(..., B, C)``."""
    z_loc, z_scale = guide.encoder(torch.cat([x.expand(*y.shape[:-1], X_DIM), y], -1))
    log_q_z = torch.distributions.Normal(z_loc, z_scale).log_prob(z).sum(-1)
    log_p_z = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    logits = model.decoder(torch.cat([z, y], -1))
    log_p_x = torch.distributions.Bernoulli(logits=logits).log_prob(x.expand_as(logits)).sum(-1)
    return log_p_x + log_p_z - log_q_z - math.log(C)


def enum_loss(model, guide, x_joined: torch.Tensor, seed: int = 3) -> tuple[float, torch.Tensor]:  # type: ignore[no-untyped-def]
    recorder = RecordZ()
    pyro.set_rng_seed(seed)
    index = torch.arange(x_joined.shape[0])
    loss = TraceEnum_ELBO(max_plate_nesting=1).loss(model, recorder(guide), x_joined, index, NUM_DATA)
    return loss, recorder.z


# ---------------------------------------------------------------------------------------------
# exact answers


def test_enumerated_loss_of_unlabelled_points_is_the_brute_force_sum_over_the_classes() -> None:
    model, guide = pair()
    x, _, x_joined = batch([-1] * 5)
    loss, z = enum_loss(model, guide, x_joined)
    assert z.shape == (C, 5, Z_DIM)  # one draw of z per class and point
    with torch.no_grad():
        eye = torch.eye(C).unsqueeze(1).expand(C, 5, C)
        elbo_given_y = supervised_terms(model, guide, x, eye, z).T  # (B, C)
        log_q_y = F.log_softmax(guide.classifier(x), -1)
        unlabelled = (log_q_y.exp() * (elbo_given_y - log_q_y)).sum(-1)
    expected = -(NUM_DATA / 5) * unlabelled.sum().item()
    # the same float64 numbers summed in another order: rounding, ~1e-16 relative
    assert loss == pytest.approx(expected, rel=1e-12)
    # the entropy term is there: without it the answer is off by far more than rounding
    entropy = -(log_q_y.exp() * log_q_y).sum().item() * NUM_DATA / 5
    assert abs(loss - (expected + entropy)) > 1e3 * 1e-12 * abs(expected)


@pytest.mark.parametrize("weight", [1.0, 0.25], ids=["once", "copies4"])
def test_a_labelled_points_loss_is_its_supervised_elbo_plus_alpha_times_minus_log_q(weight: float) -> None:
    """... times ``labelled_weight`` (1/r for a data set holding each labelled point r times)."""
    labels = [3, -1, 7, -1, 0]
    alpha = 2.5
    model, guide = pair(alpha=alpha, labelled_weight=weight)
    x, y, x_joined = batch(labels)
    loss, z = enum_loss(model, guide, x_joined)
    labelled = y >= 0
    with torch.no_grad():
        log_q_y = F.log_softmax(guide.classifier(x), -1)
        eye = torch.eye(C).unsqueeze(1).expand(C, 5, C)
        by_class = supervised_terms(model, guide, x, eye, z).T  # (B, C): unlabelled points use their class's draw
        unlabelled = (log_q_y.exp() * (by_class - log_q_y)).sum(-1)
        # A labelled point's C enumerated branches all decode its label, each with weight 1/C:
        # its ELBO is the mean over the C draws of z given its label.
        y_true = F.one_hot(y.clamp_min(0), C).double().expand(C, 5, C)
        supervised = supervised_terms(model, guide, x, y_true, z).mean(0)
        classifier = log_q_y.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        per_point = torch.where(labelled, weight * (supervised + alpha * classifier), unlabelled)
    assert loss == pytest.approx(-(NUM_DATA / 5) * per_point.sum().item(), rel=1e-12)

    # α enters exactly as α Σ_labelled -log q(y|x) (the same draws: the α term draws nothing)
    model0 = pair(alpha=0.0, labelled_weight=weight)[0]
    model0.decoder.load_state_dict(model.decoder.state_dict())
    loss0, _ = enum_loss(model0, guide, x_joined)
    aux = -(NUM_DATA / 5) * weight * classifier[labelled].sum().item()
    assert loss - loss0 == pytest.approx(alpha * aux, rel=1e-10)


@pytest.mark.parametrize("y_mode", ["score", "gumbel"])
def test_sampled_modes_give_labelled_points_the_same_supervised_elbo(y_mode: str) -> None:
    """For labelled points y is known, so every mode gives the supervised ELBO; the stand-in y the
    guide draws from the prior adds exactly 0."""
    model, guide = pair(alpha=0.5, y_mode=y_mode)
    x, y, x_joined = batch([1, 4, 9, 2, 2])
    recorder = RecordZ()
    loss = Trace_ELBO().loss(model, recorder(guide), x_joined, torch.arange(5), NUM_DATA)
    with torch.no_grad():
        supervised = supervised_terms(model, guide, x, F.one_hot(y, C).double(), recorder.z)
        classifier = F.log_softmax(guide.classifier(x), -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    assert loss == pytest.approx(-(NUM_DATA / 5) * (supervised + 0.5 * classifier).sum().item(), rel=1e-12)


def test_unlabelled_elbo_per_point_is_the_brute_force_sum() -> None:
    model, guide = pair(alpha=3.0)  # α must not enter: the points are unlabelled
    x, _, _ = batch([-1] * 5)
    pyro.set_rng_seed(4)
    values = unlabelled_elbo(model, guide, x, num_particles=1)
    # the same draws: one z per class, in class order, from the same seed
    pyro.set_rng_seed(4)
    zs = []
    with torch.no_grad():
        for c in range(C):
            z_loc, z_scale = guide.encoder(torch.cat([x, F.one_hot(torch.full((5,), c), C).double()], -1))
            zs.append(torch.distributions.Normal(z_loc, z_scale).rsample())
        z = torch.stack(zs)
        eye = torch.eye(C).unsqueeze(1).expand(C, 5, C)
        log_q_y = F.log_softmax(guide.classifier(x), -1)
        expected = (log_q_y.exp() * (supervised_terms(model, guide, x, eye, z).T - log_q_y)).sum(-1)
    torch.testing.assert_close(values, expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# sampled estimators, against the enumerated value


def _repeat(loss_fn, repeats: int) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    """Loss values and the gradient of the classifier's output bias, one row per independent draw."""
    losses, grads = [], []
    for r in range(repeats):
        pyro.set_rng_seed(100 + r)
        pyro.clear_param_store()
        loss, grad = loss_fn()
        losses.append(loss)
        grads.append(grad)
    return torch.tensor(losses), torch.stack(grads)


def _loss_and_bias_grad(objective, model, guide, x_joined):  # type: ignore[no-untyped-def]
    bias = guide.classifier[-1].bias
    bias.grad = None
    for p in list(guide.encoder.parameters()) + list(model.decoder.parameters()) + list(guide.classifier.parameters()):
        p.grad = None
    loss = objective.loss_and_grads(model, guide, x_joined, torch.arange(x_joined.shape[0]), NUM_DATA)
    return loss, bias.grad.clone()


def _within(sampled: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """|mean difference| / its standard error, two independent samples of draws."""
    se = (sampled.var(0) / len(sampled) + exact.var(0) / len(exact)).sqrt()
    return (sampled.mean(0) - exact.mean(0)).abs() / se


@pytest.mark.parametrize("y_mode", ["score", "gumbel"])
def test_sampled_y_loss_is_unbiased_for_the_enumerated_value(y_mode: str) -> None:
    model, guide = pair(alpha=1.0)
    _, _, x_joined = batch([-1, 5, -1, -1, 2])
    sampled = guide.with_mode(y_mode)
    # each call averages 8 vectorized draws; the repeats are independent
    enum = TraceEnum_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=1)
    elbo = Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=1)
    exact, _ = _repeat(lambda: _loss_and_bias_grad(enum, model, guide, x_joined), 100)
    draws, _ = _repeat(lambda: _loss_and_bias_grad(elbo, model, sampled, x_joined), 300)
    assert _within(draws, exact) < Z_MAX


def test_score_function_gradient_of_q_y_is_unbiased_for_the_enumerated_gradient() -> None:
    model, guide = pair(alpha=0.0)
    _, _, x_joined = batch([-1, -1, -1, 4, -1])
    enum = TraceEnum_ELBO(max_plate_nesting=1)
    elbo = Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=1)
    _, exact = _repeat(lambda: _loss_and_bias_grad(enum, model, guide, x_joined), 200)
    _, draws = _repeat(lambda: _loss_and_bias_grad(elbo, model, guide.with_mode("score"), x_joined), 400)
    z = _within(draws, exact)
    assert z.shape == (C,)
    assert (z < Z_MAX + 0.5).all(), z  # 10 coordinates: the largest of 10 |z| is below 4.5 but for 1e-4 of runs
    # and the test can see a wrong gradient: without its score term (y treated as fixed), it differs
    # by many standard errors in some coordinate
    assert (exact.mean(0).abs() / (exact.std(0) / math.sqrt(len(exact)))).max() > 10


def test_straight_through_samples_are_exact_categorical_draws() -> None:
    logits = torch.tensor([0.3, -1.0, 2.0, 0.0])
    samples = StraightThroughCategorical(0.5, logits).rsample((20000,))
    assert ((samples == 0) | (samples == 1)).all() and (samples.sum(-1) == 1).all()
    probs = logits.softmax(-1)
    se = (probs * (1 - probs) / len(samples)).sqrt()
    assert ((samples.mean(0) - probs).abs() / se < 5).all()
    assert StraightThroughCategorical(0.5, logits).log_prob(samples[:3]) == pytest.approx(
        dist.OneHotCategorical(logits=logits).log_prob(samples[:3]))
    # the gradient is the relaxation's: the logits get one
    leaf = logits.clone().requires_grad_()
    (StraightThroughCategorical(0.5, leaf).rsample() * torch.arange(4.0)).sum().backward()
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# IWAE with an enumerated site


@pytest.mark.parametrize("name", ["iwae", "iwae-dreg", "score", "elbo-stl", "miwae"])
def test_per_datapoint_objectives_refuse_an_enumerated_site_with_the_fix(name: str) -> None:
    model, guide = pair()
    _, _, x_joined = batch([-1, 2, -1, -1, 2])
    with pytest.raises(ValueError, match=r"guide site 'y' is marked for enumeration.*TraceEnum_ELBO.*with_mode"):
        make_objective(name, 2).loss(model, guide, x_joined, torch.arange(5), NUM_DATA)
    # sampled on purpose, IWAE is an importance-sampling bound over (y, z): above the ELBO on average
    iwae = make_objective("iwae", 2).loss(model, guide.with_mode("score"), x_joined, torch.arange(5), NUM_DATA)
    assert math.isfinite(iwae)


def test_importance_sampling_over_y_and_z_matches_log_px_by_quadrature() -> None:
    """pyrovae's evaluation samples y (the enumeration mark only means something to TraceEnum_ELBO):
    with z one-dimensional, log p(x) = logsumexp_y [log p(y) + log ∫ p(x|y,z) N(z) dz] is a
    quadrature on a fine grid, and the K-sample estimate lands within its standard error. q(z|x, y)
    is made wider than p(z) (scale 2), so the weights are bounded and that error is finite (an
    untrained, narrower q has weights of infinite variance: its estimate wanders by nats)."""
    from pyrovae.infer.evaluate import importance_sampling

    torch.manual_seed(1)
    model, guide = m2_pair(X_DIM, 1, C, hidden_sizes=(8,), alpha=4.0)  # α: no effect on unlabelled points
    with torch.no_grad():
        head = guide.encoder.net[-1]
        head.weight[1:] = 0.0
        head.bias[1:] = math.log(math.expm1(2.0))  # softplus⁻¹(2): z_scale = 2
    x, _, _ = batch([-1] * 5)
    index = torch.arange(5)
    with torch.no_grad():
        z = torch.linspace(-12, 12, 24001).reshape(-1, 1, 1, 1)  # (Z, 1, 1, 1): grid × class × point
        y = torch.eye(C).reshape(1, C, 1, C).expand(1, C, 5, C)
        logits = model.decoder(torch.cat([z.expand(-1, C, 5, 1), y.expand(len(z), C, 5, C)], -1))
        log_integrand = torch.distributions.Bernoulli(logits=logits).log_prob(x).sum(-1) + \
            torch.distributions.Normal(0.0, 1.0).log_prob(z.reshape(-1, 1, 1))
        step = (z[1] - z[0]).item()
        log_px_given_y = torch.logsumexp(log_integrand, 0) + math.log(step)  # (C, B); the tails are < 1e-30
        exact = torch.logsumexp(log_px_given_y - math.log(C), 0)
    estimate = importance_sampling(model, guide, x, index, 5, num_samples=20000, chunk_size=2000)
    z_scores = (estimate.log_likelihood - exact).abs() / estimate.log_likelihood_se
    assert (z_scores < 5).all(), z_scores
    assert (estimate.elbo < exact).all()
    # the same ELBO with y summed out exactly (z drawn per class): 20 independent estimates of 100
    # draws each give its mean and standard error
    repeats = torch.stack([unlabelled_elbo(model, guide, x, num_particles=100) for _ in range(20)])
    se = (estimate.elbo_se ** 2 + repeats.var(0) / len(repeats)).sqrt()
    elbo_z = (repeats.mean(0) - estimate.elbo).abs() / se
    assert (elbo_z < 5).all(), elbo_z


@pytest.mark.parametrize("y_mode", ["score", "gumbel"])
def test_iwae_with_one_sample_of_a_sampled_y_is_the_elbo_of_the_same_draw(y_mode: str) -> None:
    """With y sampled, pyrovae's IWAE weighs (y, z) jointly; the α term (a function of x alone) and
    the stand-in y of labelled points enter each log-weight alike, so K = 1 is Trace_ELBO exactly."""
    model, guide = pair(alpha=1.5, y_mode=y_mode)
    _, _, x_joined = batch([-1, 5, -1, -1, 2])
    index = torch.arange(5)
    pyro.set_rng_seed(3)
    iwae = make_objective("iwae", 1).loss(model, guide, x_joined, index, NUM_DATA)
    pyro.set_rng_seed(3)
    assert iwae == pytest.approx(Trace_ELBO().loss(model, guide, x_joined, index, NUM_DATA), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# labels


def test_join_and_split_labels_round_trip_and_survive_binarization() -> None:
    x = torch.rand(6, X_DIM)
    labels = torch.tensor([-1, 0, 9, -1, 3, 3])
    joined = join_labels(x, labels, C)
    assert joined.shape == (6, X_DIM + C)
    binarized = torch.bernoulli(joined)
    pixels, y, labelled = split_labels(binarized, X_DIM, C)
    assert torch.equal(binarized[:, X_DIM:], joined[:, X_DIM:])  # 0/1 columns: Bernoulli keeps them
    assert labelled.tolist() == [False, True, True, False, True, True]
    assert y[labelled].argmax(-1).tolist() == [0, 9, 3, 3]
    assert split_labels(x, X_DIM, C)[2].sum() == 0  # no label columns: all unlabelled
    with pytest.raises(ValueError, match="0..9"):
        join_labels(x, torch.tensor([10, 0, 0, 0, 0, 0]), C)
    with pytest.raises(ValueError, match="features"):
        split_labels(torch.rand(2, X_DIM + 3), X_DIM, C)


def _check_balanced(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    index = balanced_label_subset(labels, n, 10, seed)
    assert index.shape == (n,) and len(index.unique()) == n
    assert torch.bincount(labels[index], minlength=10).tolist() == [n // 10] * 10
    assert torch.equal(index, balanced_label_subset(labels, n, 10, seed))  # deterministic
    return index


def test_balanced_labels_on_synthetic_classes() -> None:
    labels = torch.arange(10).repeat_interleave(torch.arange(40, 50))  # unequal class sizes
    a = _check_balanced(labels, 100, seed=0)
    b = _check_balanced(labels, 100, seed=1)
    assert not torch.equal(a, b)
    seen = partial_labels(labels, 100, seed=0)
    assert torch.equal(seen[a], labels[a]) and (seen >= 0).sum() == 100
    assert (seen[torch.isin(torch.arange(len(labels)), a, invert=True)] == -1).all()
    for bad in (0, 95, 5):
        with pytest.raises(ValueError, match="multiple of num_classes"):
            balanced_label_subset(labels, bad)
    with pytest.raises(ValueError, match="fewer than"):
        balanced_label_subset(labels, 450)  # class 0 has 40 points


def test_balanced_labels_on_mnist(mnist_root) -> None:  # type: ignore[no-untyped-def]
    from pyrovae.data import load_mnist

    labels = load_mnist(mnist_root).train_labels
    subsets = {n: _check_balanced(labels, n, seed=0) for n in (100, 600, 1000, 3000)}
    assert all(0 <= int(s.min()) and int(s.max()) < len(labels) for s in subsets.values())
    # one permutation per class whatever n: more labels add to the fewer (100 ⊂ 600 ⊂ 1000 ⊂ 3000)
    for small, large in ((100, 600), (600, 1000), (1000, 3000)):
        assert torch.isin(subsets[small], subsets[large]).all()


# ---------------------------------------------------------------------------------------------
# end to end


def prototypes_data(num: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three classes of 24-pixel binary images: a class's pixels are on with probability 0.9 in its
    own third of the image and 0.1 elsewhere."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num) % 3
    means = torch.full((3, 24), 0.1)
    for c in range(3):
        means[c, 8 * c: 8 * (c + 1)] = 0.9
    return torch.bernoulli(means[labels], generator=generator), labels


def test_fit_learns_a_classifier_from_few_labels() -> None:
    from pyrovae import fit

    x_train, y_train = prototypes_data(300, seed=0)
    x_test, y_test = prototypes_data(300, seed=1)
    seen = partial_labels(y_train, 12, num_classes=3, seed=0)  # 4 labels per class
    model, guide = m2_pair(24, 2, 3, hidden_sizes=(16,), alpha=paper_alpha(300, 12))
    train = join_labels(x_train, seen, 3)
    history = fit(model, guide, (train, join_labels(x_test, None, 3)), make_objective("elbo-enum"),
                  epochs=15, batch_size=50, lr=1e-2, progress=False)
    error = classification_error(guide, x_test, y_test)
    assert error < 0.1, error  # chance is 2/3
    assert history.test_bound[-1] == pytest.approx(unlabelled_elbo(model, guide, x_test, 20).mean().item(), abs=1.0)


def test_guide_validates() -> None:
    classifier, encoder = torch.nn.Linear(3, 2), torch.nn.Linear(5, 4)
    with pytest.raises(ValueError, match="y_mode"):
        M2Guide(classifier, encoder, 3, 2, y_mode="sample")
    with pytest.raises(ValueError, match="temperature"):
        M2Guide(classifier, encoder, 3, 2, y_mode="gumbel", temperature=0.0)


# ---------------------------------------------------------------------------------------------
# the command line's model="m2"


@pytest.fixture
def float32():  # type: ignore[no-untyped-def]
    """MNIST is float32: this test's networks too (inside the module's float64 fixture)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(old)


def test_config_refuses_an_objective_that_does_not_fit_y_mode_and_options_of_m2_elsewhere() -> None:
    from pyrovae.app.config import ConfigError, TrainConfig

    assert TrainConfig(model="m2", objective="elbo-enum").resolved().labels == 100
    TrainConfig(model="m2", y_mode="gumbel", objective="elbo", labels=600)
    with pytest.raises(ConfigError, match="objective='elbo-enum'"):
        TrainConfig(model="m2", objective="iwae")
    with pytest.raises(ConfigError, match="objective='elbo' or objective='iwae'"):
        TrainConfig(model="m2", y_mode="score", objective="elbo-enum")
    TrainConfig(model="m2", y_mode="score", objective="iwae", num_particles=4)
    with pytest.raises(ConfigError, match="multiple of 10"):
        TrainConfig(model="m2", objective="elbo-enum", labels=105)
    with pytest.raises(ConfigError, match="labels=100 is an option of model 'm2'"):
        TrainConfig(labels=100)


def test_labelled_copies_keep_the_objective_and_put_labels_in_more_batches() -> None:
    """Each labelled point r times, weighted 1/r: the weights of every site sum to one per distinct
    point, so the full-data objective is the one without copies."""
    from pyro import poutine

    from pyrovae.app.build import build
    from pyrovae.app.config import TrainConfig
    from pyrovae.app.families.m2 import semi_supervised_data
    from pyrovae.data import Dataset

    config = TrainConfig(model="m2", objective="elbo-enum", labels=20, labelled_copies=3, z_dim=2,
                         hidden_sizes=(4,)).resolved()
    raw = Dataset(name="mnist", train=torch.rand(60, 784), test=torch.rand(10, 784), likelihood="bernoulli",
                  train_labels=torch.arange(60) % 10, test_labels=torch.arange(10) % 10)
    data = semi_supervised_data(config, raw)
    assert data.train.shape == (60 + 2 * 20, 794) and data.train_labels.shape == (100,)
    assert data.train[:, 784:].sum() == 3 * 20 and torch.equal(data.train[60:80], data.train[80:])
    model, guide = build(config, data)
    assert model.alpha == pytest.approx(0.1 * 60 / 20) and model.labelled_weight == guide.labelled_weight == 1 / 3
    index = torch.arange(100)
    guide_trace = poutine.trace(guide).get_trace(data.train, index, 100)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(data.train, index, 100)
    for trace, name in ((model_trace, "x"), (model_trace, "z"), (guide_trace, "z"), (guide_trace, "y")):
        scale = trace.nodes[name]["scale"]
        assert torch.as_tensor(scale).sum().item() == pytest.approx(60), name
    # the α term, on the labelled rows only (its mask): α per distinct labelled point
    labelled = data.train[:, 784:].sum(-1) == 1
    aux_scale = torch.as_tensor(model_trace.nodes["y_classifier"]["scale"])
    assert aux_scale[labelled].sum().item() == pytest.approx(model.alpha * 20)
    with pytest.raises(ValueError, match="labelled_copies"):
        TrainConfig(model="m2", objective="iwae", y_mode="score", labelled_copies=2)


@pytest.mark.parametrize("y_mode", ["enum", "score", "gumbel"])
def test_train_m2_on_300_mnist_points_writes_a_test_error_below_chance(mnist_root, tmp_path, float32, y_mode: str) -> None:  # type: ignore[no-untyped-def]
    import json

    from pyrovae.app.config import TrainConfig
    from pyrovae.app.run import load_run, train_and_evaluate

    config = TrainConfig(model="m2", labels=100, m2_alpha=50.0, y_mode=y_mode,
                         objective="elbo-enum" if y_mode == "enum" else "elbo", num_train=300, num_test=500,
                         epochs=8, batch_size=50, eval_samples=5, z_dim=10, hidden_sizes=(100,))
    metrics = train_and_evaluate(config, tmp_path / "run", data_dir=str(mnist_root), progress=False)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["test_error"] == metrics["test_error"]
    if y_mode == "enum":
        # chance is 0.9; 8 epochs on 300 points with 100 labels reach about 0.36. The sampled modes'
        # gradient noise (no baseline) leaves them near chance after so few steps (reported, not asserted).
        assert metrics["test_error"] < 0.6, metrics["test_error"]
    assert 0 <= metrics["test_error"] <= 1
    assert metrics["labels"] == 100 and metrics["y_mode"] == y_mode and math.isfinite(metrics["test_elbo_enumerated"])
    run = load_run(tmp_path / "run", data_dir=str(mnist_root))
    seen = run.dataset.train[:, -10:]
    assert seen.sum() == 100 and torch.bincount(seen.argmax(-1)[seen.sum(-1) == 1]).tolist() == [10] * 10
    x_test = run.dataset.test[:, :-10]
    assert classification_error(run.guide, torch.bernoulli(x_test, generator=torch.Generator().manual_seed(0)),
                                run.dataset.test_labels) == pytest.approx(metrics["test_error"], abs=0.05)
