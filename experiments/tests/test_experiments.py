"""Every script in experiments/ is smoke-run with tiny flags by some test (Pyro's test_examples)."""

from __future__ import annotations

from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parents[1]
ROOT = EXPERIMENTS.parent
TEST_FILES = [*ROOT.glob("tests/test_*.py"), *EXPERIMENTS.glob("tests/test_*.py")]


def test_every_experiment_has_a_smoke_test():
    scripts = sorted(p.stem for p in EXPERIMENTS.glob("*.py") if not p.stem.startswith("_"))
    test_text = "\n".join(p.read_text() for p in TEST_FILES if p.name != Path(__file__).name)
    missing = [name for name in scripts if f"experiments/{name}.py" not in test_text]
    assert not missing, f"experiments without a smoke test (mention experiments/NAME.py in one): {missing}"
