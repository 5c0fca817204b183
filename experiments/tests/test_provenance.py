"""Run records (``run.json``): the helper every script calls, the publish step, and every results
folder under docs/ having one (recorded at run time, or reconstructed and saying from what)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from studies import provenance

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def result_folders() -> list[Path]:
    """Every folder under docs/ that holds a results JSON (docs/*/ and docs/iwae_table/**)."""
    return sorted({p.parent for p in DOCS.rglob("*.json") if p.name != provenance.RUN_FILE})


def test_every_results_folder_has_a_run_record() -> None:
    folders = result_folders()
    assert len(folders) >= 15
    missing = [str(f.relative_to(ROOT)) for f in folders if not (f / provenance.RUN_FILE).exists()]
    assert not missing, f"results folders without run.json: {missing}"


@pytest.mark.parametrize("folder", result_folders(), ids=lambda f: str(f.relative_to(DOCS)))
def test_run_record_says_how_it_was_made(folder: Path) -> None:
    record = json.loads((folder / provenance.RUN_FILE).read_text())
    assert record["recorded"] in {"at run time", "reconstructed"}
    assert {"command", "args", "seed", "git", "machine"} <= set(record)
    assert record["git"]["commit"] and len(record["git"]["commit"]) == 40
    if record["recorded"] == "reconstructed":
        # A reconstructed record names where each field came from and which were never recorded.
        assert record["reconstructed_from"]["commit"]
        assert set(record["not_recorded"]) <= {"command", "args", "seed", "machine"}
        for field in record["not_recorded"]:
            assert record[field] is None
    else:
        assert record["machine"]["cpu_count"] >= 1 and record["command"].startswith("python ")
    for earlier in record.get("earlier_runs", []):
        assert earlier["recorded"] in {"at run time", "reconstructed"}


def test_write_run_record_keeps_earlier_runs(tmp_path: Path) -> None:
    first = provenance.write_run_record(tmp_path, {"seed": 3, "out": tmp_path}, argv=["experiments/x.py", "--seed", "3"])
    assert first["seed"] == 3 and first["command"] == "python experiments/x.py --seed 3"
    assert first["args"]["out"] == str(tmp_path)
    assert first["git"]["commit"] and first["machine"]["torch_threads"] >= 1
    second = provenance.write_run_record(tmp_path, {"seed": 4}, role="merge")
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["seed"] == 4 and record["role"] == "merge" and second["seed"] == 4
    assert [r["seed"] for r in record["earlier_runs"]] == [3]
    provenance.write_run_record(tmp_path, {"seed": 5})
    record = json.loads((tmp_path / "run.json").read_text())
    assert [r["seed"] for r in record["earlier_runs"]] == [3, 4]


def test_reconstructed_record_names_what_was_not_recorded() -> None:
    record = provenance.reconstructed_record(commit="0" * 40, command="python x.py", args=None,
                                             sources={"commit": "git log"})
    assert record["recorded"] == "reconstructed" and record["not_recorded"] == ["args", "machine", "seed"]


def test_publish_run_copies_and_records(load_experiment, tmp_path: Path) -> None:
    script = load_experiment("experiments/publish_run.py")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"config": {"seed": 7, "epochs": 2}, "test_nll": 90.0}))
    (run / "curves.png").write_bytes(b"png")
    (run / "checkpoint.pt").write_bytes(b"big")
    record = script.main([str(run), str(tmp_path / "docs")])
    docs = tmp_path / "docs"
    assert json.loads((docs / "metrics.json").read_text())["test_nll"] == 90.0
    assert (docs / "curves.png").exists() and not (docs / "checkpoint.pt").exists()
    assert record["seed"] == 7 and record["configs"]["epochs"] == 2 and record["copied"] == ["metrics.json", "curves.png"]
    with pytest.raises(SystemExit, match="metrics.json"):
        script.main([str(tmp_path / "nothing"), str(docs)])


def test_a_script_writes_its_run_record(load_experiment, tmp_path: Path) -> None:
    script = load_experiment("experiments/why_importance_sampling.py")
    args = script.parse_args(["--dims", "1", "--num-points", "2", "--num-samples", "5", "--replicates", "10",
                              "--one-sample-replicates", "20", "--seed", "2", "--out", str(tmp_path)])
    script.main(args)
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["recorded"] == "at run time" and record["seed"] == 2 and record["args"]["dims"] == [1]


def test_the_record_holds_the_git_state_of_the_start_and_says_when_it_changed(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # A long run during which the tree was committed: the record keeps the state the code ran from,
    # and names the state at the end beside it.
    start = {"commit": "a" * 40, "branch": "main", "uncommitted_changes": ["experiments/x.py"]}
    monkeypatch.setattr(provenance, "_AT_START", start)
    record = provenance.write_run_record(tmp_path, {"seed": 1})
    assert record["git"] == start and record["git_at_end"] == provenance.git_state()
    monkeypatch.setattr(provenance, "_AT_START", provenance.git_state())
    assert "git_at_end" not in provenance.run_record({"seed": 1})
