"""β-VAE on MNIST: how does the KL weight β trade rate against distortion?

Trains the main job's VAE (784-400-50, Bernoulli, dynamically binarized MNIST) with β ∈ {0.5, 1, 2,
4, 8} on the KL term: E_q[log p(x|z)] − β KL(q ‖ p(z)). β = 1 is the plain VAE, exactly the main
job's config. For each β on the test set: the rate R = KL(q(z|x) ‖ p(z)), the distortion
D = −E_q[log p(x|z)] = −(ELBO + R) (the true β = 1 ELBO), active units, the test log-likelihood
(importance sampling, K = --eval-samples), and a latent-traversal figure (the most active units of
one test image, each swept over −3..3 sd with the others held at the image's posterior mean).

Each β is a `pyrovae train` run in --out/beta_<β> (resumable; finished runs are skipped). Writes
--docs/results.json, rate_distortion.png and traversals_beta_<β>.png.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from studies.sweep import add_common_args, run_configs, setup
from studies.provenance import write_run_record

from pyrovae.app.config import TrainConfig
from pyrovae.app.plots import save_image_grid
from pyrovae.app.run import restore, write_json
from pyrovae.infer.evaluate import posterior_means
from pyrovae.train import evaluation_data


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--betas", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0, 8.0])
    parser.add_argument("--out", default="runs/beta_vae", help="one run folder per β")
    parser.add_argument("--docs", default="docs/beta_vae", help="results.json and figures")
    parser.add_argument("--z-dim", type=int, default=50)
    parser.add_argument("--hidden-sizes", type=int, nargs="+", default=[400])
    parser.add_argument("--eval-samples", type=int, default=1000, help="K of the test log-likelihood")
    parser.add_argument("--traversal-units", type=int, default=8, help="units shown in each traversal figure")
    add_common_args(parser)
    return parser.parse_args(argv)


def beta_name(beta: float) -> str:
    return f"beta_{beta:g}"


@torch.no_grad()
def traversal(checkpoint: Path, path: Path, units: int, data_dir: str | None, steps: int = 9) -> list[int]:
    """Decode sweeps of the most active latent units of the first test image; returns the units."""
    config, dataset, model, guide, _ = restore(checkpoint, data_dir=data_dir)
    x = evaluation_data(dataset, "test", config.seed)
    index = torch.arange(x.shape[0], device=x.device)
    means = torch.cat([posterior_means(guide, x[i], i, x.shape[0])["z"] for i in index.split(1000)])
    order = means.var(0).argsort(descending=True)[:units]
    base = means[0]
    values = torch.linspace(-3, 3, steps, device=x.device)
    rows = []
    for unit in order:
        z = base.repeat(steps, 1)
        z[:, unit] = values
        rows.append(model.decode(z))
    save_image_grid(torch.cat(rows).cpu(), path, dataset.image_shape, nrow=steps)
    return order.tolist()


def plot_rate_distortion(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    rate = [r["rate"] for r in rows]
    distortion = [r["distortion"] for r in rows]
    axes[0].plot(rate, distortion, "o-")
    for r in rows:
        axes[0].annotate(f"β={r['beta']:g}", (r["rate"], r["distortion"]), textcoords="offset points", xytext=(5, 5))
    axes[0].set_xlabel("rate R = KL(q(z|x) ‖ p(z)) (nats)")
    axes[0].set_ylabel("distortion D = −E_q log p(x|z) (nats)")
    axes[0].set_title("rate–distortion (test set)")
    betas = [r["beta"] for r in rows]
    axes[1].plot(betas, [-r["test_log_likelihood"] for r in rows], "o-", label="test NLL (importance sampled)")
    axes[1].plot(betas, [-r["test_elbo"] for r in rows], "s--", label="−ELBO (β = 1 bound)")
    axes[1].set_xscale("log", base=2)
    axes[1].set_xlabel("β")
    axes[1].set_ylabel("nats")
    ax2 = axes[1].twinx()
    ax2.plot(betas, [r["active_units"] for r in rows], "^:", color="grey", label="active units")
    ax2.set_ylabel("active units")
    axes[1].legend(fontsize=8, loc="upper left")
    ax2.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    setup(args)
    configs = {
        beta_name(beta): TrainConfig(
            beta=beta, epochs=args.epochs, z_dim=args.z_dim, hidden_sizes=tuple(args.hidden_sizes),
            eval_samples=args.eval_samples, num_train=args.num_train, num_test=args.num_test,
            device=args.device, seed=args.seed,
        )
        for beta in args.betas
    }
    results = run_configs(configs, Path(args.out), data_dir=args.data_dir)
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    rows = []
    for beta in args.betas:
        name = beta_name(beta)
        m = results[name]
        units = traversal(Path(args.out) / name / "checkpoint.pt", docs / f"traversals_{name}.png",
                          args.traversal_units, args.data_dir)
        rows.append({
            "beta": beta, "rate": m["kl"], "distortion": -(m["test_elbo"] + m["kl"]),
            "test_elbo": m["test_elbo"], "test_log_likelihood": m["test_log_likelihood"],
            "active_units": m["active_units"], "traversal_units": units, "epochs": m["epochs"],
            "train_seconds": m["train_seconds"],
        })
        logging.info("β=%g: rate %.2f, distortion %.2f, test log-lik %.2f, %d active units",
                     beta, rows[-1]["rate"], rows[-1]["distortion"], m["test_log_likelihood"], m["active_units"])
    plot_rate_distortion(rows, docs / "rate_distortion.png")
    summary = {"rows": rows, "config": {k: v.to_dict() for k, v in configs.items()}, "eval_samples": args.eval_samples}
    write_json(docs / "results.json", summary)
    write_run_record(docs, args, configs=summary["config"], device=args.device)
    return summary


if __name__ == "__main__":
    main()
