"""fit() with the user's own Pyro code: plain functions with pyro.module/pyro.param and Pyro's
autoguides train, checkpoint everything in the param store they use, and resume bit for bit;
fit takes tensors as well as a Dataset, and its dry run sees what training sees."""

from __future__ import annotations

import io

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoDelta, AutoDiagonalNormal, AutoNormal
from torch import nn

from pyrovae import fit, load_mnist, make_objective
from pyrovae.data import Dataset, index_batches
from pyrovae.runtime.checkpoint import load_checkpoint
from pyrovae.infer.loop import Hook

X_DIM, Z_DIM, NUM_TRAIN = 6, 2, 48


def grey_data(seed: int = 0, binarize: str = "dynamic") -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    probs = torch.rand(NUM_TRAIN + 12, X_DIM, generator=generator)
    if binarize == "static":
        probs = torch.bernoulli(probs, generator=generator)
    return Dataset(name="toy", train=probs[:NUM_TRAIN], test=probs[NUM_TRAIN:], likelihood="bernoulli",
                   binarize=binarize)


class Shifted(nn.Module):
    """A network with a buffer drawn at construction: a fresh one differs unless the checkpoint
    restores it."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)
        self.register_buffer("shift", torch.randn(d_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x + self.shift)


def data_plate(x, index=None, num_data=None):
    return pyro.plate("data", num_data, subsample=index)


class UserPair:
    """A user's model written as a plain Pyro function with their own network under their own
    name, a global pyro.param and a Bernoulli likelihood straight from pyro.distributions; the
    guide is a function with its own encoder, or one of Pyro's autoguides."""

    def __init__(self, guide_kind: str = "functions") -> None:
        self.net = Shifted(Z_DIM, X_DIM)
        self.encoder = Shifted(X_DIM, 2 * Z_DIM)
        if guide_kind == "functions":
            self.model, self.guide = self.local_model, self.function_guide
        elif guide_kind == "diagonal":  # one global latent: AutoContinuous guides take no plates
            self.model = self.global_model
            self.guide = AutoDiagonalNormal(self.model)
        else:
            self.model = self.local_model
            self.guide = {"normal": AutoNormal, "delta": AutoDelta}[guide_kind](self.model, create_plates=data_plate)

    def local_model(self, x, index=None, num_data=None):
        pyro.module("net", self.net)
        bias = pyro.param("bias", torch.zeros(X_DIM))
        with data_plate(x, index, num_data):
            z = pyro.sample("z", dist.Normal(torch.zeros(Z_DIM), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.net(z) + bias).to_event(1), obs=x)

    def global_model(self, x, index=None, num_data=None):
        pyro.module("net", self.net)
        bias = pyro.param("bias", torch.zeros(X_DIM))
        w = pyro.sample("w", dist.Normal(torch.zeros(Z_DIM), 1.0).to_event(1))
        with data_plate(x, index, num_data):
            pyro.sample("x", dist.Bernoulli(logits=self.net(w) + bias).expand([len(x), X_DIM]).to_event(1), obs=x)

    def function_guide(self, x, index=None, num_data=None):
        pyro.module("enc", self.encoder)
        with data_plate(x, index, num_data):
            loc, log_scale = self.encoder(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


def trained_values(pair: UserPair) -> dict[str, torch.Tensor]:
    values = {f"net.{k}": v.detach().clone() for k, v in pair.net.state_dict().items()}
    if pair.guide == pair.function_guide:  # the encoder is used by the function guide only
        values.update({f"enc.{k}": v.detach().clone() for k, v in pair.encoder.state_dict().items()})
    store = pyro.get_param_store()
    values.update({name: store[name].detach().clone() for name in store.keys()})
    return values


@pytest.mark.parametrize("guide_kind", ["functions", "normal", "diagonal", "delta"])
def test_user_code_checkpoints_everything_and_resumes_bit_for_bit(tmp_path, guide_kind):
    # Statically binarized data, so this test sees the checkpoint alone (the dry run on dynamically
    # binarized data is tested below).
    dataset = grey_data(binarize="static")

    def run(epochs, path, resume):
        pyro.clear_param_store()  # a fresh process: an empty store ...
        pyro.set_rng_seed(17 if resume else 3)  # ... whose seed state must not matter
        pair = UserPair(guide_kind)  # ... and freshly built networks (other weights, other buffers)
        history = fit(pair.model, pair.guide, dataset, make_objective("elbo"), epochs=epochs, batch_size=16,
                      lr=1e-2, seed=5, checkpoint_path=path, resume=resume, progress=False)
        return pair, history

    full, history_full = run(4, tmp_path / "full.pt", False)
    values_full = trained_values(full)
    run(2, tmp_path / "split.pt", False)
    used = set(pyro.get_param_store().keys())
    saved = load_checkpoint(tmp_path / "split.pt")
    # Every param the run used is in the checkpoint, the user's networks and buffers included.
    assert "net$$$linear.weight" in used and "bias" in used
    assert set(saved["params"]["params"]) == used
    assert "shift" in saved["modules"]["net"]
    assert ("enc" in saved["modules"]) == (guide_kind == "functions")
    resumed, history_split = run(4, tmp_path / "split.pt", True)
    assert history_split.epoch == [1, 2, 3, 4]
    assert history_split.train_bound == history_full.train_bound
    values_split = trained_values(resumed)
    assert set(values_split) == set(values_full)
    for name, value in values_full.items():
        assert torch.equal(values_split[name], value), name
    # The user's networks are the ones that trained: no copy in the store drifted away from them.
    store = pyro.get_param_store()
    assert torch.equal(store["net$$$linear.weight"], resumed.net.linear.weight)
    pyro.clear_param_store()
    assert not torch.equal(UserPair(guide_kind).net.linear.weight, resumed.net.linear.weight)


class RowWatch(Hook):
    """After every step: the rows of ``name`` that changed are rows of the step's batch."""

    def __init__(self, name: str, batch_size: int) -> None:
        self.name, self.batch_size, self.before, self.checked = name, batch_size, None, 0

    def on_step_end(self, trainer, state, result):
        rows = pyro.param(self.name).detach().clone()
        if self.before is not None:
            batch = state.order.split(self.batch_size)[state.step - 1]
            in_batch = torch.zeros(len(rows), dtype=torch.bool)
            in_batch[batch] = True
            moved = (rows != self.before).any(-1)
            assert not moved[~in_batch].any(), (state.epoch, state.step, moved.nonzero().flatten())
            assert moved[in_batch].all()
            self.checked += 1
        self.before = rows


@pytest.mark.parametrize("guide_kind", ["normal", "delta"])
def test_autoguide_rows_are_per_datapoint_and_rows_outside_the_batch_never_move(guide_kind):
    # AutoNormal/AutoDelta(create_plates=...) keep one row per data point: fit finds them in the
    # param store and steps them lazily, so a row whose point is not in the batch keeps its value
    # (dense Adam would move it by its momentum), and such a guide gets no test bound.
    dataset = grey_data(binarize="static")
    pair = UserPair(guide_kind)
    name = "AutoNormal.locs.z" if guide_kind == "normal" else "AutoDelta.z"
    watch = RowWatch(name, 8)
    history = fit(pair.model, pair.guide, dataset, make_objective("elbo"), epochs=3, batch_size=8, lr=1e-2,
                  progress=False, hooks=[watch])
    assert pyro.param(name).shape == (NUM_TRAIN, Z_DIM)
    assert watch.checked == 3 * NUM_TRAIN // 8 - 1
    assert history.test_bound == [None, None, None]


def test_fit_takes_plain_tensors_and_a_train_test_pair():
    dataset = grey_data()
    x_train = torch.bernoulli(dataset.train, generator=torch.Generator().manual_seed(1))
    x_test = torch.bernoulli(dataset.test, generator=torch.Generator().manual_seed(2))
    pair = UserPair()
    history = fit(pair.model, pair.guide, x_train, make_objective("elbo"), epochs=2, batch_size=16, progress=False)
    assert history.epoch == [1, 2] and history.test_bound == [None, None]
    history = fit(pair.model, pair.guide, (x_train, x_test), make_objective("elbo"), epochs=1, batch_size=16,
                  progress=False)
    assert history.test_bound[0] is not None and history.test_bound[0] < 0
    with pytest.raises(ValueError, match="Dataset"):
        fit(pair.model, pair.guide, [1, 2, 3], make_objective("elbo"), epochs=1, progress=False)


def test_dry_run_binarizes_like_training_without_taking_its_random_numbers(mnist_root):
    full = load_mnist(mnist_root)
    dataset = Dataset(name="mnist", train=full.train[:64], test=full.test[:16], likelihood="bernoulli",
                      binarize="dynamic", image_shape=full.image_shape)
    x_dim = dataset.x_dim
    net = nn.Linear(Z_DIM, x_dim)
    encoder = nn.Linear(x_dim, 2 * Z_DIM)
    seen = []

    def model(x, index=None, num_data=None):
        pyro.module("net", net)
        seen.append(x.clone())
        with pyro.plate("data", num_data, subsample=index):
            z = pyro.sample("z", dist.Normal(torch.zeros(Z_DIM), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=net(z)).to_event(1), obs=x)

    def guide(x, index=None, num_data=None):
        pyro.module("enc", encoder)
        with pyro.plate("data", num_data, subsample=index):
            loc, log_scale = encoder(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))

    # Pyro's validation is on (conftest): grey levels would be refused as Bernoulli observations.
    fit(model, guide, dataset, make_objective("elbo"), epochs=1, batch_size=32, seed=4, test_bound=False,
        progress=False)
    assert all(((x == 0) | (x == 1)).all() for x in seen)
    # The training batches are those of a run without any dry run: the same generator draws.
    generator = torch.Generator().manual_seed(4)
    order = torch.cat(list(index_batches(64, 32, generator=generator)))
    expected = [dataset.batch(dataset.train[index], generator) for index in order.split(32)]
    assert len(seen) == 1 + len(expected)
    for got, want in zip(seen[1:], expected):
        assert torch.equal(got, want)


def test_an_existing_checkpoint_is_never_overwritten_without_resume(tmp_path):
    dataset = grey_data(binarize="static")
    path = tmp_path / "run.pt"
    pair = UserPair()
    fit(pair.model, pair.guide, dataset, make_objective("elbo"), epochs=1, batch_size=16, checkpoint_path=path,
        progress=False)
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"resume=True.*(delete|another)"):
        fit(pair.model, pair.guide, dataset, make_objective("elbo"), epochs=1, batch_size=16,
            checkpoint_path=path, progress=False)
    assert path.read_bytes() == before


def test_progress_is_one_line_per_epoch_in_a_log(capsys):
    dataset = grey_data(binarize="static")
    pair = UserPair()
    fit(pair.model, pair.guide, dataset, make_objective("elbo"), epochs=3, batch_size=8, progress=True)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "\r" not in err, err[:500]
    assert len(lines) == 3 and all(line.startswith(f"epoch {i + 1}/3") for i, line in enumerate(lines)), lines


def test_progress_bars_on_a_terminal(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    pair = UserPair()
    fit(pair.model, pair.guide, grey_data(binarize="static"), make_objective("elbo"), epochs=2, batch_size=8)
    shown = terminal.getvalue()
    assert "\r" in shown and "epochs: 100%" in shown and "2/2" in shown, shown[-500:]
