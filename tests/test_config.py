"""The application layer's one source of configuration: nested typed groups composed by
TrainConfig (and the flat form every saved run holds), the model/guide registry its choices and
checks come from, the train flags generated from it, and errors that name Python parameters in the
library and flags on the command line."""

from __future__ import annotations

import ast
import dataclasses
import json
import pathlib
import re
from typing import Any, get_args

import pytest
import torch

from pyrovae.app import cli, registry
from pyrovae.app.config import (
    DATASET_DEFAULTS,
    GROUP_OF,
    GROUPS,
    ConfigError,
    DataConfig,
    EvalConfig,
    ModelConfig,
    ObjectiveConfig,
    OptimConfig,
    RuntimeConfig,
    TrainConfig,
    config_differences,
    field_choices,
    option_fields,
)
from pyrovae.app.registry import GuideSpec, ModelSpec, guide_specs, model_specs

ROOT = pathlib.Path(__file__).resolve().parents[1]

#: The flat fields of TrainConfig before it had groups: every checkpoint and metrics.json holds them.
FLAT_FIELDS_BEFORE_GROUPS = (
    "dataset model guide objective num_particles reparameterized z_dim hidden_sizes upper_z_dims "
    "upper_hidden_sizes activation network weight_init data_bias num_codes num_codes_top commitment "
    "codebook_ema likelihood x_scale learn_x_scale x_scale_shape beta epochs batch_size lr lr_decay seed "
    "device binarize num_train num_test eval_samples eval_chunk eval_batch test_time_steps clip_norm "
    "local_steps local_lr extra"
).split()
#: Options added since, each with its own flag (the flat view keeps every old name above).
NEW_FIELDS = ["flow_layers", "flow_hidden_sizes", "num_groups", "ciwae_beta", "prior", "num_pseudo_inputs", "pseudo_input_init",
              "prior_components", "prior_flow", "prior_flow_layers", "fast_path", "labels", "m2_alpha", "y_mode",
              "gumbel_temperature", "labelled_copies", "quadrants", "cvae_baseline_epochs"]

#: The train flags the README lists (and their spellings before the flags were generated).
README_TRAIN_FLAGS = (
    "--dataset --model --network --guide --num-particles --z-dim --objective --epochs --batch-size --lr "
    "--seed --device --data-dir --eval-samples --out --resume --overwrite --clip-norm --beta --hidden-sizes "
    "--upper-z-dims --upper-hidden-sizes --weight-init --data-bias --likelihood --binarize --learn-x-scale "
    "--x-scale-shape --local-steps --local-lr --num-codes --commitment --codebook-ema --num-codes-top "
    "--no-reparameterize --lr-decay --num-train --num-test --eval-chunk --test-time-steps --download "
    "--no-progress"
).split()


def _parse_train(*flags: str) -> TrainConfig:
    return cli.config_from_args(cli.build_parser().parse_args(["train", "--out", "o", *flags]))


# --------------------------------------------------------------------------------------------
# one source: groups, the flat view, JSON


def test_every_option_lives_in_one_group_under_a_unique_name():
    names = [f.name for _, f in option_fields()]
    assert len(names) == len(set(names)) == len(GROUP_OF)
    assert sorted([*names, "extra"]) == sorted(FLAT_FIELDS_BEFORE_GROUPS + NEW_FIELDS)
    assert sorted(TrainConfig().to_dict()) == sorted(FLAT_FIELDS_BEFORE_GROUPS + NEW_FIELDS)
    assert [f.name for f in dataclasses.fields(TrainConfig)] == [*GROUPS, "extra"]


def test_flat_and_nested_construction_agree():
    flat = TrainConfig(dataset="gmm", z_dim=3, lr=1e-2, num_particles=4, eval_samples=7, seed=2)
    nested = TrainConfig(
        data=DataConfig(dataset="gmm"), generative=ModelConfig(z_dim=3), optim=OptimConfig(lr=1e-2),
        loss=ObjectiveConfig(num_particles=4), evaluation=EvalConfig(eval_samples=7), runtime=RuntimeConfig(seed=2),
    )
    assert flat == nested
    assert (flat.lr, flat.optim.lr, flat.z_dim, flat.generative.z_dim) == (1e-2, 1e-2, 3, 3)
    # A flat keyword wins over the group's value, which is what dataclasses.replace relies on.
    assert TrainConfig(optim=OptimConfig(lr=0.5), lr=0.25).lr == 0.25
    again = dataclasses.replace(flat, seed=5, batch_size=7)
    assert (again.seed, again.batch_size, again.lr, flat.seed) == (5, 7, 1e-2, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        flat.optim.lr = 1.0  # type: ignore[misc]
    with pytest.raises(AttributeError):
        flat.lr = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError, match="unknown options \\['learning_rate'\\]"):
        TrainConfig(learning_rate=1.0)
    with pytest.raises(TypeError, match="takes a OptimConfig"):
        TrainConfig(optim=DataConfig())  # type: ignore[arg-type]


def test_json_round_trips_nested_and_flat():
    config = TrainConfig(dataset="gmm", objective="iwae", num_particles=5, hidden_sizes=[32, 16],
                         clip_norm=2.0, extra={"note": "x"})
    assert config.hidden_sizes == (32, 16)
    nested = json.loads(config.to_json())
    assert set(nested) == {*GROUPS, "extra"} and nested["optim"]["clip_norm"] == 2.0
    assert TrainConfig.from_json(config.to_json()) == config
    assert TrainConfig.from_dict(config.to_dict()) == config
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert TrainConfig.from_dict(config.to_nested_dict()) == config
    resolved = config.resolved()
    assert TrainConfig.from_json(resolved.to_json()) == resolved
    with pytest.raises(ConfigError, match="unknown config keys \\['lr'\\] in group 'data'"):
        TrainConfig.from_dict({"data": {"lr": 1.0}})


def _saved_configs(value: Any):
    if isinstance(value, dict):
        if isinstance(value.get("config"), dict) and {"dataset", "model"} <= set(value["config"]):
            yield value["config"]
        for item in value.values():
            yield from _saved_configs(item)
    elif isinstance(value, list):
        for item in value:
            yield from _saved_configs(item)


def test_every_saved_config_in_docs_still_reads():
    """Flat configs of earlier pyrovae versions (some without options added since) read, and write
    back the same values, the missing options at their defaults."""
    found = 0
    for path in sorted((ROOT / "docs").rglob("*.json")):
        for saved in _saved_configs(json.loads(path.read_text())):
            config = TrainConfig.from_dict(saved)
            assert config_differences(saved, config.to_dict()) == {}, path
            found += 1
    assert found >= 1


def test_a_flat_dict_from_before_an_option_existed_reads_with_its_default():
    old = TrainConfig(dataset="gmm").to_dict()
    for name in ("weight_init", "data_bias", "local_steps", "local_lr", "clip_norm", "x_scale_shape"):
        del old[name]
    assert TrainConfig.from_dict(old) == TrainConfig(dataset="gmm")
    assert config_differences(old, TrainConfig(dataset="gmm").to_dict()) == {}
    assert config_differences(old, TrainConfig(dataset="gmm", lr=0.5).to_dict()) == {"lr": (1e-3, 0.5)}


# --------------------------------------------------------------------------------------------
# choices come from the registries


def test_choices_are_the_registries_names():
    from pyrovae.data.dataset import DatasetName
    from pyrovae.data.load import _DATASETS
    from pyrovae.infer.objectives import OBJECTIVES

    fields = {f.name: (group, f) for group, f in option_fields()}
    assert field_choices(*fields["model"]) == tuple(model_specs()) == ("vae", "hvae", "vqvae", "vqvae2", "linear", "m2", "cvae")
    assert field_choices(*fields["guide"]) == tuple(guide_specs()) == (
        "amortized", "per-datapoint", "per-datapoint-full-cov", "per-datapoint-planar", "per-datapoint-sylvester",
        "prior", "full-cov", "iaf", "planar", "sylvester", "spline")
    assert field_choices(*fields["objective"]) == tuple(OBJECTIVES)
    assert field_choices(*fields["dataset"]) == get_args(DatasetName) == tuple(DATASET_DEFAULTS) == tuple(_DATASETS)
    parser = cli.build_parser()
    train = next(a for a in parser._subparsers._group_actions[0].choices["train"]._actions if a.dest == "model")
    assert tuple(train.choices) == tuple(model_specs())
    for name in ("guide", "objective", "dataset", "likelihood", "activation", "network"):
        action = next(a for a in parser._subparsers._group_actions[0].choices["train"]._actions if a.dest == name)
        assert tuple(action.choices) == field_choices(*fields[name]), name


def test_a_registered_model_family_is_a_choice_of_config_cli_and_build(monkeypatch):
    """A new family is one spec and one registration: config, flags, checks and build follow."""
    from pyrovae.app.build import build
    from pyrovae.app.families.vae import build_vae
    from pyrovae.data import gaussian_mixture

    monkeypatch.setattr(registry, "_MODELS", dict(model_specs()))
    built = []

    def build_mine(config, dataset):
        built.append(config.z_dim)
        return build_vae(config, dataset)

    registry.register(ModelSpec(name="mine", build=build_mine, help="my model", guides=("amortized",)))
    with pytest.raises(ValueError, match="registered already"):
        registry.register(ModelSpec(name="mine", build=build_mine, help="again"))
    config = _parse_train("--dataset", "gmm", "--model", "mine", "--z-dim", "3")
    assert config == TrainConfig(dataset="gmm", model="mine", z_dim=3)
    model, _ = build(config, gaussian_mixture(num_train=20, num_test=5))
    assert built == [3] and model.z_dim == 3
    with pytest.raises(ConfigError, match="model='mine' is trained with guide='amortized' only"):
        TrainConfig(model="mine", guide="prior")
    with pytest.raises(ValueError, match="not config fields"):
        registry.register(GuideSpec(name="g", build=lambda c, d, m: None, help="", options=("no_such",)))


def test_each_family_reads_only_options_that_exist():
    for spec in [*model_specs().values(), *guide_specs().values()]:
        assert set(spec.options) <= set(GROUP_OF), spec.name


def test_an_option_no_chosen_family_reads_is_refused_not_ignored():
    cases = {
        "codebook_ema": (dict(codebook_ema=0.9), "model='vqvae' or model='vqvae2'"),
        "num_codes": (dict(num_codes=8), "model='vqvae'"),
        "commitment": (dict(commitment=0.5), "model='vqvae'"),
        "upper_z_dims": (dict(upper_z_dims=(3,)), "model='hvae'"),
        "local_lr": (dict(local_lr=0.1), "guide='per-datapoint'"),
        "x_scale_shape": (dict(dataset="linear", x_scale_shape="pixel"), "model='vae' or model='hvae'"),
    }
    for name, (options, fix) in cases.items():
        with pytest.raises(ConfigError) as info:
            TrainConfig(**options)
        assert str(info.value).startswith(f"{name}=") and "drop it, or choose" in str(info.value), info.value
        assert fix in str(info.value) and info.value.params[0] == name
    # Read by the chosen family: fine.
    TrainConfig(model="vqvae", codebook_ema=0.9, num_codes=8, commitment=0.5)
    TrainConfig(guide="per-datapoint", local_lr=0.1, local_steps=3)
    TrainConfig(model="hvae", upper_z_dims=(3,))


# --------------------------------------------------------------------------------------------
# flags generated from the config


def test_no_flags_give_the_default_config():
    assert _parse_train() == TrainConfig()


def test_every_option_has_a_flag_with_help():
    parser = cli.build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    actions = {a.dest: a for a in train._actions}
    for _, f in option_fields():
        assert f.name in actions, f.name
        assert actions[f.name].help and len(actions[f.name].help) > 10, f.name
    flags = {flag for a in train._actions for flag in a.option_strings}
    assert set(README_TRAIN_FLAGS) <= flags, sorted(set(README_TRAIN_FLAGS) - flags)


def test_the_flags_of_before_still_parse_to_the_same_options():
    config = _parse_train(
        "--dataset", "mnist", "--model", "hvae", "--guide", "amortized", "--num-particles", "5",
        "--z-dim", "10", "--objective", "iwae", "--epochs", "3", "--batch-size", "20", "--lr", "0.01",
        "--seed", "4", "--device", "cpu", "--eval-samples", "50", "--clip-norm", "5", "--beta", "0.5",
        "--hidden-sizes", "200", "200", "--upper-z-dims", "5", "--upper-hidden-sizes", "100", "100",
        "--weight-init", "glorot", "--data-bias", "--likelihood", "bernoulli", "--binarize", "static",
        "--no-reparameterize", "--lr-decay", "0.9", "--num-train", "100", "--num-test", "50",
        "--eval-chunk", "10", "--test-time-steps", "5", "--activation", "tanh",
    )
    assert config == TrainConfig(
        dataset="mnist", model="hvae", guide="amortized", num_particles=5, z_dim=10, objective="iwae", epochs=3,
        batch_size=20, lr=0.01, seed=4, device="cpu", eval_samples=50, clip_norm=5.0, beta=0.5,
        hidden_sizes=(200, 200), upper_z_dims=(5,), upper_hidden_sizes=(100, 100), weight_init="glorot",
        data_bias=True, likelihood="bernoulli", binarize="static", reparameterized=False, lr_decay=0.9,
        num_train=100, num_test=50, eval_chunk=10, test_time_steps=5, activation="tanh",
    )
    assert _parse_train("--model", "vqvae2", "--num-codes", "8", "--num-codes-top", "4", "--commitment", "0.5",
                        "--codebook-ema", "0.99") == TrainConfig(model="vqvae2", num_codes=8, num_codes_top=4,
                                                                 commitment=0.5, codebook_ema=0.99)
    assert _parse_train("--dataset", "gmm", "--learn-x-scale", "--x-scale-shape", "pixel", "--x-scale", "0.5") \
        == TrainConfig(dataset="gmm", learn_x_scale=True, x_scale_shape="pixel", x_scale=0.5)
    assert _parse_train("--guide", "per-datapoint", "--local-steps", "3", "--local-lr", "0.1") \
        == TrainConfig(guide="per-datapoint", local_steps=3, local_lr=0.1)


@pytest.mark.parametrize(
    "config",
    [
        TrainConfig(),
        TrainConfig(dataset="gmm", learn_x_scale=False, reparameterized=False, objective="score", clip_norm=1.5),
        TrainConfig(model="hvae", upper_z_dims=(5, 3), hidden_sizes=(20,), data_bias=True, weight_init="glorot"),
        TrainConfig(model="vqvae2", num_codes=8, num_codes_top=4, codebook_ema=0.5, z_dim=3, seed=-1),
        TrainConfig(dataset="linear", guide="per-datapoint", local_steps=2, lr_decay=0.5, device="cuda:1"),
    ],
)
def test_flags_config_flags_round_trip(config):
    argv = cli.config_to_argv(config)
    assert _parse_train(*argv) == config
    assert cli.config_to_argv(_parse_train(*argv)) == argv


# --------------------------------------------------------------------------------------------
# errors: Python parameters in the library, flags on the command line


LIBRARY_ERRORS = [
    (dict(batch_size=0), "batch_size must be an integer >= 1, got 0", "--batch-size"),
    (dict(lr=-1.0), "lr must be positive, got -1.0", "--lr"),
    (dict(num_particles=1.5), "num_particles must be an integer >= 1, got 1.5", "--num-particles"),
    (dict(local_steps=2), "local_steps=2 is an option of guide 'per-datapoint'", "--local-steps 2"),
    (dict(model="hvae", guide="prior"), "guide='prior' does not fit it: use guide='amortized'", "--guide amortized"),
    (dict(model="vqvae", objective="iwae"), "use objective='elbo', num_particles=1", "--objective elbo, --num-particles 1"),
    (dict(hidden_sizes=(0,)), "hidden_sizes must hold positive integers, got (0,)", "--hidden-sizes"),
    (dict(upper_z_dims=(5, 3)), "upper_z_dims=(5, 3) is an option of model 'hvae'", "--upper-z-dims 5 3"),
    (dict(data_bias=True, network="conv"), "data_bias=True sets the output bias", "--data-bias sets"),
    (dict(device="tpu"), "device='tpu' is not a device pyrovae runs on", "--device tpu"),
    (dict(dataset="linear", reparameterized="no"), "reparameterized must be True or False", "--reparameterize"),
    (dict(model="linear", dataset="mnist"), "not likelihood='bernoulli': use likelihood='gaussian'", "--likelihood gaussian"),
]


@pytest.mark.parametrize("options, library, command_line", LIBRARY_ERRORS)
def test_library_errors_name_parameters_and_the_cli_says_flags(options, library, command_line):
    with pytest.raises(ConfigError) as info:
        TrainConfig(**options)
    assert library in str(info.value)
    assert not re.search(r"--[a-z]", str(info.value)), info.value
    assert info.value.params and set(info.value.params) <= {*GROUP_OF, "dataset"}
    said = cli.flag_message(info.value)
    assert command_line in said, said
    assert not re.search(r"\b[a-z]+_[a-z_]+=", said), said  # no Python keyword left


def test_flag_message_translates_values_switches_and_names():
    error = ConfigError(
        "out='/tmp/a b' holds a run: pass resume=True, or overwrite=True; reparameterized=False and "
        "hidden_sizes=(200, 200) with learn_x_scale=False, clip_norm=None; choose another `out`; "
        "lr=1e-3 works", "out",
    )
    assert cli.flag_message(error) == (
        "--out /tmp/a b holds a run: pass --resume, or --overwrite; --no-reparameterize and "
        "--hidden-sizes 200 200 with --no-learn-x-scale, --clip-norm unset; choose another --out; "
        "--lr 1e-3 works"
    )
    # The parameter at fault is named in front when the message has no flag of it.
    assert cli.flag_message(ConfigError("eval_samples must be an integer >= 1, got 0", "eval_samples")) == \
        "--eval-samples: eval_samples must be an integer >= 1, got 0"
    # Words that happen to be parameter names, and errors that are not ConfigErrors, are left alone.
    assert cli.flag_message(ConfigError("the linear model is a model", "model")) == "--model: the linear model is a model"
    assert cli.flag_message(ValueError("batch_size=5000 is larger")) == "batch_size=5000 is larger"


def test_run_errors_name_parameters(tmp_path):
    from pyrovae.app import run

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "metrics.json").write_text("{}")
    checks = [
        (lambda: run.prepare_output(tmp_path / "full"), "pass resume=True to continue that run, overwrite=True"),
        (lambda: run.prepare_output(tmp_path / "full", resume=True, overwrite=True), "resume=True continues the run"),
        (lambda: run.prepare_output(tmp_path / "full" / "metrics.json"), "is a file, not a folder"),
        (lambda: run.check_output_file(tmp_path), "is a folder; name a file"),
        (lambda: run.check_output_file(tmp_path / "full" / "metrics.json" / "x"), "is a file, not a folder"),
        (lambda: run.check_device("cuda:x"), "device='cuda:x' is not a device"),
        (lambda: run.load_data(TrainConfig(dataset="linear", num_train=2001)), "num_train=2001 is more than the 2000"),
        (lambda: run.sample_checkpoint(tmp_path / "c.pt", 0, tmp_path / "s.png"), "num=0 samples"),
        (lambda: run.sample_checkpoint(tmp_path / "c.pt", 2, tmp_path / "s.bmp"), "cannot write .bmp images"),
    ]
    if not torch.cuda.is_available():
        checks.append((lambda: run.check_device("cuda"), "device='cuda' was requested but CUDA is not available"))
    for call, message in checks:
        with pytest.raises(ConfigError) as info:
            call()
        assert message in str(info.value), info.value
        assert not re.search(r"--[a-z]", str(info.value)), info.value


def _strings_outside_docstrings(path: pathlib.Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_library_modules_do_not_speak_of_flags():
    """Only cli.py writes a --flag into a message (docstrings may say how the CLI spells an option)."""
    app = ROOT / "pyrovae" / "app"
    for path in [app / "config.py", app / "registry.py", app / "build.py", app / "run.py",
                 *sorted((app / "families").glob("*.py"))]:
        for line, text in _strings_outside_docstrings(path):
            assert not re.search(r"--[a-z]", text), f"{path.name}:{line} speaks of a flag: {text!r}"
    assert any(re.search(r"--[a-z]", text) for _, text in _strings_outside_docstrings(app / "cli.py"))


# --------------------------------------------------------------------------------------------
# evaluation reads the spec and the protocols, not attributes


def test_evaluation_uses_the_family_spec_and_the_protocols(monkeypatch):
    from pyrovae.app import run
    from pyrovae.app.families.vae import build_vae
    from pyrovae.data import linear_gaussian
    from pyrovae.protocols import ExactLikelihood, Reconstructs

    monkeypatch.setattr(registry, "_MODELS", dict(model_specs()))
    own = {"test_elbo": -1.0, "test_log_likelihood": -1.0, "test_nll": 1.0, "kl": 0.0, "active_units": 0}
    registry.register(ModelSpec(name="own-metrics", build=build_vae, help="a VAE with its own metrics",
                                evaluate=lambda model, guide, x: {**own, "num_test": len(x)}))
    dataset = linear_gaussian(num_train=20, num_test=6, seed=0)
    config = TrainConfig(dataset="linear", model="own-metrics", eval_samples=2)
    model, guide = run.build(config, dataset)
    metrics, used = run.evaluate_run(config, dataset, model, guide)
    assert used is guide and metrics["num_test"] == 6 and metrics["test_nll"] == 1.0 and "eval_seconds" in metrics
    assert not isinstance(model, (ExactLikelihood, Reconstructs))
    linear, linear_guide = run.build(TrainConfig(dataset="linear", eval_samples=2), dataset)
    assert isinstance(linear, ExactLikelihood)
    assert "test_log_likelihood_exact" in run.evaluate_run(TrainConfig(dataset="linear", eval_samples=2), dataset,
                                                           linear, linear_guide)[0]
    for source in ("run.py", "build.py"):
        text = (ROOT / "pyrovae" / "app" / source).read_text()
        assert "hasattr(" not in text and "isinstance(model, VQ" not in text and "getattr(guide" not in text, source
