"""The param store is the source of truth: stale names are refused, loaded values reach the networks,
and inspection finds every param, the per-datapoint rows and the networks of a user's own Pyro code."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from torch import nn

from pyrovae import (
    VAE,
    AmortizedGuide,
    Decoder,
    GaussianEncoder,
    PerDatapointGuide,
    params,
)
from pyrovae.infer.optim import make_pyro_optimizer
from pyrovae.runtime.checkpoint import load_params, save_params

X_DIM, Z_DIM, N = 6, 2, 40


def _pair(seed: int = 0) -> tuple[VAE, AmortizedGuide]:
    torch.manual_seed(seed)
    model = VAE(Decoder(Z_DIM, X_DIM, [8]), Z_DIM)
    guide = AmortizedGuide(GaussianEncoder(X_DIM, Z_DIM, [8]))
    return model, guide


def _data() -> torch.Tensor:
    return torch.bernoulli(torch.full((N, X_DIM), 0.3), generator=torch.Generator().manual_seed(1))


def _train(model, guide, x, steps: int = 5) -> None:
    svi = SVI(model, guide, make_pyro_optimizer(1e-2), Trace_ELBO())
    index = torch.arange(N)
    for _ in range(steps):
        svi.step(x, index, N)


def _flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def test_a_second_guide_under_the_same_name_is_the_one_that_trains() -> None:
    # With plain pyro.module, the second encoder got the first one's tensors from the store and
    # its own weights never changed under SVI, with no error.
    x = _data()
    model, first = _pair()
    _train(model, first, x)
    second = AmortizedGuide(GaussianEncoder(X_DIM, Z_DIM, [8]))
    first_weights, second_weights = _flat(first.encoder).clone(), _flat(second.encoder).clone()
    _train(model, second, x)
    assert not torch.equal(_flat(second.encoder), second_weights), "the new encoder must train"
    assert torch.equal(_flat(first.encoder), first_weights), "the old one is no longer trained"
    store = pyro.get_param_store()
    assert all(store._params[f"encoder$$${n}"] is p for n, p in second.encoder.named_parameters())
    # A user's own network under a reused name: the same through pyrovae.params.inspect (fit runs it).
    net_a, net_b = nn.Linear(Z_DIM, X_DIM), nn.Linear(Z_DIM, X_DIM)

    def user_model(net):
        def model(x, index=None, num_data=None):
            pyro.module("net", net)
            with pyro.plate("data", num_data, subsample=index):
                z = pyro.sample("z", dist.Normal(torch.zeros(len(index), Z_DIM), 1.0).to_event(1))
                pyro.sample("x", dist.Bernoulli(logits=net(z)).to_event(1), obs=x)
        return model

    params.inspect(user_model(net_a), first, (x[:2], torch.arange(2), N))
    params.inspect(user_model(net_b), first, (x[:2], torch.arange(2), N))
    assert store._params["net$$$weight"] is net_b.weight


def test_values_loaded_with_pyros_own_param_store_load_reach_a_fresh_network(tmp_path) -> None:
    # Pyro's docs ask for pyro.module(..., update_module_params=True) after param_store.load; without
    # it the fresh network computed with its own random weights. pyrovae's models and guides adopt.
    x = _data()
    model, guide = _pair(seed=0)
    _train(model, guide, x)
    z_loc, _ = guide.encoder(x)
    pyro.get_param_store().save(tmp_path / "store.pt")
    pyro.clear_param_store()
    model2, guide2 = _pair(seed=123)  # other initial weights
    assert not torch.allclose(guide2.encoder(x)[0], z_loc)
    pyro.get_param_store().load(tmp_path / "store.pt")
    guide2(x, torch.arange(N), N)
    model2(x, torch.arange(N), N)
    torch.testing.assert_close(guide2.encoder(x)[0], z_loc, rtol=0, atol=0)
    torch.testing.assert_close(_flat(model2.decoder), _flat(model.decoder), rtol=0, atol=0)
    # ... and the store now holds the networks' own tensors, so training moves what they compute with.
    store = pyro.get_param_store()
    assert all(store._params[f"encoder$$${n}"] is p for n, p in guide2.encoder.named_parameters())
    before = _flat(guide2.encoder).clone()
    _train(model2, guide2, x, steps=1)
    assert not torch.equal(_flat(guide2.encoder), before)


class _UserNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(Z_DIM, X_DIM)
        self.norm = nn.BatchNorm1d(X_DIM)  # a buffer-carrying layer: running mean/var are not params

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        flat = z.reshape(-1, z.shape[-1])
        return self.norm(self.linear(flat)).reshape(*z.shape[:-1], X_DIM)


def _user_pair(net: nn.Module):
    def model(x, index=None, num_data=None):
        pyro.module("net", net)
        scale = pyro.param("x_scale", torch.tensor(1.0), constraint=dist.constraints.positive)
        with pyro.plate("data", num_data, subsample=index):
            z = pyro.sample("z", dist.Normal(torch.zeros(len(index), Z_DIM), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(net(z), scale).to_event(1), obs=x)

    guide = AutoNormal(model, create_plates=lambda x, index=None, num_data=None: pyro.plate("data", num_data, subsample=index))
    return model, guide


def test_inspect_finds_params_rows_and_networks_of_user_code() -> None:
    net = _UserNet()
    model, guide = _user_pair(net)
    x = torch.randn(N, X_DIM)
    index = torch.arange(5)
    sites = params.inspect(model, guide, (x[index], index, N))
    assert {"net$$$linear.weight", "net$$$linear.bias", "net$$$norm.weight", "net$$$norm.bias", "x_scale",
            "AutoNormal.locs.z", "AutoNormal.scales.z"} == set(sites.names)
    assert dict(sites.local) == {"AutoNormal.locs.z": N, "AutoNormal.scales.z": N}
    assert not sites.amortized
    assert sites.modules == {"net": net}
    # Ours: the per-datapoint guide's rows, and an amortized guide's none.
    local = PerDatapointGuide(N, Z_DIM)
    vae, amortized = _pair()
    assert dict(params.inspect(vae, local, (torch.zeros(5, X_DIM), index, N)).local) == {
        "local.z_loc": N, "local.z_scale": N}
    assert params.inspect(vae, amortized, (torch.zeros(5, X_DIM), index, N)).amortized


def test_state_and_load_state_carry_user_weights_and_buffers_into_fresh_networks() -> None:
    net = _UserNet()
    model, guide = _user_pair(net)
    x = torch.randn(N, X_DIM)
    index = torch.arange(N)
    svi = SVI(model, guide, make_pyro_optimizer(1e-2), Trace_ELBO())
    for _ in range(3):
        svi.step(x, index, N)
    sites = params.inspect(model, guide, (x, index, N))
    saved = params.state(sites.names, sites.modules)
    assert set(saved["buffers"]["net"]) == {"norm.running_mean", "norm.running_var", "norm.num_batches_tracked"}
    expected = {n: p.detach().clone() for n, p in net.state_dict().items()}
    expected_loc = pyro.param("AutoNormal.locs.z").detach().clone()

    pyro.clear_param_store()
    torch.manual_seed(99)
    fresh = _UserNet()
    model2, guide2 = _user_pair(fresh)
    params.load_state(saved)
    params.inspect(model2, guide2, (x, index, N))  # binds the loaded weights into `fresh`
    for name, value in fresh.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)
    torch.testing.assert_close(pyro.param("AutoNormal.locs.z").detach(), expected_loc, rtol=0, atol=0)


def test_inspect_leaves_the_random_stream_alone() -> None:
    model, guide = _pair()
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    params.inspect(model, guide, (torch.zeros(4, X_DIM), torch.arange(4), N))
    assert torch.equal(torch.rand(3), expected)


def test_save_params_and_load_params_in_a_fresh_process(tmp_path) -> None:
    x = _data()
    model, guide = _pair()
    _train(model, guide, x)
    with torch.no_grad():
        z_loc = guide.encoder(x)[0]
    torch.save(x, tmp_path / "x.pt")
    torch.save(z_loc, tmp_path / "z_loc.pt")
    save_params(tmp_path / "params.pt", extra={"note": "five SVI steps"})
    script = textwrap.dedent(f"""
        import torch
        from pyrovae import VAE, AmortizedGuide, Decoder, GaussianEncoder
        from pyrovae.runtime.checkpoint import load_params
        torch.manual_seed(7)
        model = VAE(Decoder({Z_DIM}, {X_DIM}, [8]), {Z_DIM})
        guide = AmortizedGuide(GaussianEncoder({X_DIM}, {Z_DIM}, [8]))
        x = torch.load({str(tmp_path / 'x.pt')!r})
        extra = load_params({str(tmp_path / 'params.pt')!r}, model, guide, (x[:1],))
        assert extra == {{"note": "five SVI steps"}}, extra
        with torch.no_grad():
            torch.testing.assert_close(guide.encoder(x)[0], torch.load({str(tmp_path / 'z_loc.pt')!r}), rtol=0, atol=0)
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_load_params_reads_a_file_of_pyros_param_store_save(tmp_path) -> None:
    x = _data()
    model, guide = _pair()
    _train(model, guide, x)
    expected = _flat(guide.encoder).clone()
    pyro.get_param_store().save(tmp_path / "pyro.pt")
    pyro.clear_param_store()
    model2, guide2 = _pair(seed=3)
    assert load_params(tmp_path / "pyro.pt", model2, guide2, (x[:1],)) == {}
    assert torch.equal(_flat(guide2.encoder), expected)


def test_a_loaded_weight_of_another_shape_is_refused_with_the_reason() -> None:
    model, guide = _pair()
    guide(torch.zeros(2, X_DIM), torch.arange(2), N)
    saved = params.state()
    pyro.clear_param_store()
    wider = AmortizedGuide(GaussianEncoder(X_DIM, Z_DIM, [16]))
    params.load_state(saved)
    with pytest.raises(ValueError, match="another architecture"):
        wider(torch.zeros(2, X_DIM), torch.arange(2), N)
