"""What `raysim tune --resume` and `raysim compare --report/--resume` read back from a sweep or
comparison directory, damaged for real (truncated, not text, a key missing): one line naming
the file and what to do, before Ray starts, and no report written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from raysim.cli.main import main
from raysim.tune.compare import load_comparison
from raysim.tune.compare_run import COMPARISON_RECORD, write_record
from raysim.tune.records import MAX_RECORD_BYTES
from raysim.tune.trials import SWEEP_SOURCE

ROOT = Path(__file__).resolve().parents[2]
SETTING = ROOT / "yaml" / "settings" / "digits_a0.5.yaml"


def one_line(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("raysim: error: "), err
    return err[0].removeprefix("raysim: error: ")


@pytest.mark.parametrize("content, problem", [
    ('{"path": "/x/sweep.ya',
     "damaged (not JSON: Unterminated string starting at, line 1 column 10)"),
    ("", "damaged (not JSON: Expecting value, line 1 column 1)"),
    (b"\x80\x81", "damaged (not UTF-8 text)"),
    ('{"file": "sweep.yaml"}', "damaged ('path' is missing)"),
    ('{"path": 3}', "damaged ('path' is 3)"),
    ("[1, 2]", "damaged (expected a mapping, found list)"),
])
def test_a_damaged_sweep_source_names_the_file(tmp_path, capsys, content, problem):
    record = tmp_path / "sweep" / SWEEP_SOURCE
    record.parent.mkdir()
    if isinstance(content, bytes):
        record.write_bytes(content)
    else:
        record.write_text(content)
    assert one_line(capsys, "tune", "--resume", str(record.parent)) == (
        f"{record}: {problem}; start the sweep again from its file (raysim tune SWEEP.yaml "
        "--out DIR)")
    assert sorted(p.name for p in record.parent.iterdir()) == [SWEEP_SOURCE]  # nothing written


def test_a_record_too_large_to_be_one_is_refused_unread(tmp_path, capsys):
    record = tmp_path / "sweep" / SWEEP_SOURCE
    record.parent.mkdir()
    with record.open("wb") as out:  # sparse: no disk and no memory spent on it
        out.truncate(MAX_RECORD_BYTES + 1)
    assert one_line(capsys, "tune", "--resume", str(record.parent)).startswith(
        f"{record}: {MAX_RECORD_BYTES + 1:,} bytes, more than a record of raysim's (64 MiB at "
        "most)")


def write_comparison(folder: Path) -> Path:
    spec = {"name": "tiny", "setting": str(SETTING), "methods": ["fedavg"],
            "overrides": {"rounds": 2, "data.val_fraction": 0.15},
            "budget": {"trials": 2}, "seeds": [0, 1]}
    path = folder / "compare.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def finished_method(out: Path) -> Path:
    """A comparison directory as `raysim compare` leaves it for fedavg: its tuning table,
    a tuning trial and two seed runs, each with its summary.json and config.yaml."""
    base = out / "methods" / "fedavg"
    (base / "tuning").mkdir(parents=True)
    (base / "tuning" / "trials.csv").write_text(
        "trial,status,train.lr,best_val_accuracy\nt_1,TERMINATED,0.01,0.8\n"
        "t_2,TERMINATED,0.1,0.7\n")
    for part, name, seed in (("tuning", "t_1", 0), ("seeds", "s_0", 0), ("seeds", "s_1", 1)):
        run = base / part / "trials" / name
        run.mkdir(parents=True)
        (run / "summary.json").write_text(json.dumps({"wall_seconds": 1.5, "status": "x"}))
        (run / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "rounds": 2}))
    return base


def test_comparison_directory_as_written_reads_back(tmp_path):
    from raysim.tune.compare_run import outcomes_in

    comparison = load_comparison(write_comparison(tmp_path))
    base = finished_method(tmp_path / "out")
    (outcome,) = outcomes_in(comparison, tmp_path / "out")
    assert outcome.tuned == {"train.lr": 0.01}
    assert outcome.seed_runs == [(0, base / "seeds" / "trials" / "s_0"),
                                 (1, base / "seeds" / "trials" / "s_1")]
    assert outcome.tuning_seconds == 1.5 and outcome.seeds_seconds == 3.0


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "binary":
        path.write_bytes(b"\xff\xfe\x00garbage")
    else:
        path.write_text(how)


@pytest.mark.parametrize("file, how, problem, fix", [
    (COMPARISON_RECORD, "truncated", "damaged (not JSON: ",
     "remove it to resume with the comparison file given now, or choose another --out"),
    (COMPARISON_RECORD, '{"shared": {}}', "damaged ('methods' is missing)", "remove it"),
    ("methods/fedavg/tuning/trials.csv", "binary", "damaged (not UTF-8 text)",
     "remove {base} to tune fedavg again (compare --resume)"),
    ("methods/fedavg/tuning/trials.csv", "trial,status,train.l", "damaged (no column "
     "best_val_accuracy, train.lr)", "remove {base} to tune fedavg again"),
    ("methods/fedavg/tuning/trials.csv", "", "damaged (not a CSV table: No columns to parse "
     "from file)", "remove {base}"),
    ("methods/fedavg/tuning/trials/t_1/summary.json", "truncated", "damaged (not JSON: ",
     "remove {base} to tune fedavg again"),
    ("methods/fedavg/seeds/trials/s_1/summary.json", '{"wall_seconds": "1.5"}',
     "damaged ('wall_seconds' is '1.5')",
     "remove {base}/seeds/trials/s_1 to rerun that seed (compare --resume)"),
    ("methods/fedavg/seeds/trials/s_0/config.yaml", "seed: [0", "damaged (not YAML: expected "
     "',' or ']', but got '<stream end>')", "remove {base}/seeds/trials/s_0 to rerun"),
    ("methods/fedavg/seeds/trials/s_0/config.yaml", "rounds: 2", "damaged ('seed' is missing)",
     "remove {base}/seeds/trials/s_0"),
])
@pytest.mark.parametrize("flag", ["--report", "--resume"])
def test_a_damaged_comparison_file_is_one_line_naming_it(tmp_path, capsys, file, how, problem,
                                                         fix, flag):
    path = write_comparison(tmp_path)
    out = (tmp_path / "out").resolve()
    write_record(load_comparison(path), out)
    base = finished_method(out)
    damaged = out / file
    _damage(damaged, how)
    before = sorted(str(p) for p in out.rglob("*"))
    error = one_line(capsys, "compare", str(path), "--out", str(out), flag)
    assert error.startswith(f"{damaged}: {problem}"), error
    assert fix.format(base=base) in error
    assert sorted(str(p) for p in out.rglob("*")) == before  # no report, nothing removed
