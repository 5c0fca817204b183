"""Library functions behind the scripts in ``experiments/``: each study is importable and tested;
the scripts only parse flags, call these, and write JSON and figures."""
