"""NumPyro's jit-compiled SVI step on Pyro's VAE tutorial network: the peer of pyrovae's step in
``experiments/benchmark_speed.py``, run by it in a separate interpreter (one process per variant).

It imports JAX and NumPyro only (never torch), so it runs in its own environment::

    python -m venv np && np/bin/pip install numpyro "jax[cpu]"
    python experiments/benchmark_speed.py --numpyro-python np/bin/python

(or ``pip install 'pyrovae[bench]'`` into one environment). A GPU peer needs a CUDA jaxlib
(``pip install "jax[cuda12]"``); the benchmark skips the NumPyro rows on ``--device cuda`` when
the peer reports a CPU backend.

The network is the tutorial's, built with ``jax.example_libraries.stax``: encoder Dense(400),
Softplus, then loc = Dense(50) and scale = exp(Dense(50)); decoder Dense(400), Softplus,
Dense(784) (Bernoulli logits). The model subsamples N points in batches of B
(``numpyro.plate("data", N, subsample_size=B)``) with a N(0, I) prior on the 50-dimensional z; the
guide is N(loc, scale). ``SVI(model, guide, Adam(1e-3), Trace_ELBO())`` for K=1 and
``RenyiELBO(alpha=0, num_particles=K)`` (the IWAE bound) for K>1, ``update = jax.jit(svi.update)``,
on a fixed random binary batch (which images does not matter for timing).

For every ``--config OBJECTIVE:K:B`` it compiles (the first call), warms up, chooses the number of
calls per repeat from ``--step-seconds``, then times ``--repeats`` repeats of that many calls,
blocking on the result (``block_until_ready``) at the end of each repeat. It prints one JSON
object: per config the seconds per call of each repeat, the compile time, and the JAX/NumPyro
versions, backend, devices and ``XLA_FLAGS``. ``--probe`` prints only the versions and backend.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from jax.example_libraries import stax
from numpyro.infer import SVI, RenyiELBO, Trace_ELBO

X_DIM, HIDDEN, Z_DIM = 784, 400, 50


def encoder_net():
    return stax.serial(stax.Dense(HIDDEN), stax.Softplus, stax.FanOut(2),
                       stax.parallel(stax.Dense(Z_DIM), stax.serial(stax.Dense(Z_DIM), stax.Exp)))


def decoder_net():
    return stax.serial(stax.Dense(HIDDEN), stax.Softplus, stax.Dense(X_DIM))


def make_svi(objective: str, k: int, batch_size: int, num_data: int, lr: float = 1e-3) -> SVI:
    def model(x):
        decode = numpyro.module("decoder", decoder_net(), (batch_size, Z_DIM))
        with numpyro.plate("data", num_data, subsample_size=batch_size):
            z = numpyro.sample("z", dist.Normal(0, 1).expand([Z_DIM]).to_event(1))
            numpyro.sample("x", dist.Bernoulli(logits=decode(z)).to_event(1), obs=x)

    def guide(x):
        encode = numpyro.module("encoder", encoder_net(), (batch_size, X_DIM))
        loc, scale = encode(x)
        with numpyro.plate("data", num_data, subsample_size=batch_size):
            numpyro.sample("z", dist.Normal(loc, scale).to_event(1))

    if objective == "elbo" and k == 1:
        loss = Trace_ELBO()
    elif objective == "iwae":
        loss = RenyiELBO(alpha=0, num_particles=k)
    else:
        raise ValueError(f"unsupported config {objective}:{k} (elbo:1 or iwae:K)")
    return SVI(model, guide, numpyro.optim.Adam(lr), loss)


def time_config(objective: str, k: int, batch_size: int, num_data: int, repeats: int, step_seconds: float,
                seed: int) -> dict:
    svi = make_svi(objective, k, batch_size, num_data)
    x = (jax.random.uniform(jax.random.PRNGKey(seed + 1), (batch_size, X_DIM)) < 0.3).astype(jnp.float32)
    state = svi.init(jax.random.PRNGKey(seed), x)
    update = jax.jit(svi.update)
    start = time.perf_counter()
    state, loss = update(state, x)  # traces and compiles
    loss.block_until_ready()
    compile_seconds = time.perf_counter() - start
    for _ in range(3):
        state, loss = update(state, x)
    loss.block_until_ready()
    start = time.perf_counter()
    state, loss = update(state, x)
    loss.block_until_ready()
    calls = max(1, int(step_seconds / max(time.perf_counter() - start, 1e-6)))
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            state, loss = update(state, x)
        loss.block_until_ready()
        seconds.append((time.perf_counter() - start) / calls)
    return {"objective": objective, "k": k, "batch_size": batch_size, "calls": calls, "seconds": seconds,
            "compile_seconds": compile_seconds, "final_loss": float(loss)}


def environment() -> dict:
    import jaxlib

    return {"jax_version": jax.__version__, "jaxlib_version": jaxlib.__version__,
            "numpyro_version": numpyro.__version__, "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()], "xla_flags": os.environ.get("XLA_FLAGS"),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "python": sys.version.split()[0],
            "torch_imported": "torch" in sys.modules}


def parse_config(text: str) -> tuple[str, int, int]:
    objective, k, batch_size = text.split(":")
    return objective, int(k), int(batch_size)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", type=parse_config, default=[],
                        help="OBJECTIVE:K:BATCH, e.g. elbo:1:32 or iwae:50:100 (repeatable)")
    parser.add_argument("--num-data", type=int, default=60000, help="N of the data plate")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--step-seconds", type=float, default=0.5, help="target seconds per repeat")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--probe", action="store_true", help="print the environment only")
    args = parser.parse_args(argv)
    out = environment()
    if not args.probe:
        out["configs"] = [time_config(objective, k, batch_size, args.num_data, args.repeats, args.step_seconds, args.seed)
                          for objective, k, batch_size in args.config]
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
