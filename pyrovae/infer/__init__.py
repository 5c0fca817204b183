"""Inference: per-data-point importance weights, the objectives built on them, evaluation, diagnostics,
test-time per-datapoint fits and the optimisers (lazy Adam for per-datapoint rows)."""
