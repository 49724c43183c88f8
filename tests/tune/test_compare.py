"""`raysim compare`: every method's declared search space, the comparison file's mistakes (one
line, before Ray), and a tiny comparison end to end whose table is recomputed here from the
run directories it points to."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from pathlib import Path

import pandas as pd
import pytest
import yaml

from raysim.algorithm import PersonalModel, search_space_of
from raysim.cli.main import main
from raysim.config import read_yaml, set_dotted
from raysim.registry import algorithm_class, algorithm_names
from raysim.results.compare_report import markdown_table
from raysim.run.validate import config_from_dict, load_config
from raysim.tune.compare import load_comparison
from raysim.tune.compare_run import COMPARISON_RECORD, check_directory, write_record
from raysim.tune.sweep import parse_search

ROOT = Path(__file__).resolve().parents[2]
COMPARE = ROOT / "yaml" / "compare"
SETTING = {"classification": ROOT / "yaml" / "settings" / "digits_a0.5.yaml",
           "segmentation": ROOT / "yaml" / "settings" / "synthetic_organ.yaml"}
# Each run trains in its Tune trial's process (the local backend): the comparison's own work
# (trials, seeds, tables, resume) is what is tested here; runs on Ray workers are test_tune's.
TINY = {"rounds": 2, "clients_per_round": 4, "data.partition.num_clients": 12,
        "train.local_epochs": 1, "resources.num_workers": 1, "resources.backend": "local",
        "logging.progress": False, "logging.curves": False, "data.val_fraction": 0.15}


@pytest.mark.parametrize("name", algorithm_names())
def test_every_method_declares_a_valid_search_space(name):
    cls = algorithm_class(name)
    space = search_space_of(cls)
    assert space["train.lr"]["loguniform"][0] < space["train.lr"]["loguniform"][1]
    fields = {f for f in cls.Config.__dataclass_fields__}
    for key in space:
        assert key.startswith(("train.", "algorithm.")), key
        if key.startswith("algorithm."):
            assert key.split(".", 1)[1] in fields, f"{name}: {key} is not a Config field"
    # every corner of the space is a valid config of the method on a task it runs
    task = cls.tasks[0]
    for dim in parse_search(space):
        for value in dim.corners():
            raw = read_yaml(SETTING[task])
            raw["algorithm"] = {"name": name}
            if issubclass(cls, PersonalModel):  # scored only on the clients' own test parts
                raw["evaluation"] = {"personal": {}}
            set_dotted(raw, dim.key, value)
            config = config_from_dict(raw)
            section, _, leaf = dim.key.partition(".")
            target = config.algorithm.params if section == "algorithm" else config.train
            assert getattr(target, leaf) == value


def test_the_shared_learning_rate_is_drawn_alike_for_every_method():
    comparison = load_comparison(COMPARE / "digits_a0.5.yaml")
    lr = {m.label: m.search["train.lr"] for m in comparison.methods}
    assert len({json.dumps(v) for v in lr.values()}) == 1
    fedhpro = next(m for m in comparison.methods if m.label == "fedhpro_paper")
    assert fedhpro.algorithm == {"name": "fedhpro_paper"}
    assert set(fedhpro.search) == {"train.lr", "algorithm.tau", "algorithm.hp_lr",
                                   "algorithm.lambda_hpcl"}
    sweep = comparison.tuning_sweep(fedhpro)
    assert (sweep.metric, sweep.mode, sweep.rank_by, sweep.num_samples) == \
        ("val_accuracy", "max", "best", 8)
    assert sweep.trial_config({"train.lr": 0.01}).algorithm.name == "fedhpro_paper"
    seeds = comparison.seed_sweep(fedhpro, {"train.lr": 0.02, "algorithm.tau": 0.1})
    assert [d.key for d in seeds.search] == ["seed"] and seeds.scheduler.name == "none"
    config = seeds.trial_config({"seed": 2})
    assert (config.seed, config.train.lr, config.algorithm.params.tau) == (2, 0.02, 0.1)


@pytest.mark.parametrize("path", sorted(COMPARE.glob("*.yaml")), ids=lambda p: p.stem)
def test_ready_comparisons_are_valid(path):
    comparison = load_comparison(path)
    assert len(comparison.seeds) >= 3 and comparison.trials >= 4


def test_every_method_draws_the_same_learning_rates_and_its_own_keys_independently():
    comparison = load_comparison(COMPARE / "synthetic_nuclei.yaml")
    points = {m.label: comparison.tuning_sweep(m).drawn_points() for m in comparison.methods}
    assert all(len(p) == comparison.trials for p in points.values())
    lrs = {label: [p["train.lr"] for p in drawn] for label, drawn in points.items()}
    assert len({tuple(v) for v in lrs.values()}) == 1 and len(set(lrs["fedavg"])) == 8
    low, high = comparison.methods[0].search["train.lr"]["loguniform"]
    assert all(low <= lr <= high for lr in lrs["fedavg"])
    # a key of one name draws within each method's own range and kind
    taus = {label: [p["algorithm.tau"] for p in points[label]] for label in ("moon", "fpl")}
    assert taus["moon"] != taus["fpl"] and set(taus["moon"]) <= {0.1, 0.5, 1.0}
    # more trials append to the draws; another comparison seed draws others
    fedavg = comparison.tuning_sweep(comparison.methods[0])
    more = dataclasses.replace(fedavg, num_samples=12).drawn_points()
    assert more[:8] == points["fedavg"]
    assert dataclasses.replace(fedavg, seed=1).drawn_points() != points["fedavg"]
    # draws: tune leaves drawing to Tune's one generator, as `raysim tune` does by default
    tune_drawn = dataclasses.replace(comparison, draws="tune")
    assert tune_drawn.tuning_sweep(comparison.methods[0]).drawn_points() == []


def test_search_overrides_replace_ranges_for_the_methods_that_have_the_key(tmp_path):
    path = write_comparison(tmp_path, methods=["fedavg", "fedprox", "fedproto"],
                            search_overrides={"train.lr": {"loguniform": [1e-4, 1e-2]},
                                              "algorithm.mu": {"choice": [0.1]}})
    methods = {m.label: m.search for m in load_comparison(path).methods}
    assert all(s["train.lr"] == {"loguniform": [1e-4, 1e-2]} for s in methods.values())
    assert methods["fedprox"]["algorithm.mu"] == {"choice": [0.1]}
    assert "algorithm.mu" not in methods["fedavg"] and "algorithm.mu" not in methods["fedproto"]


def write_comparison(folder: Path, **fields) -> Path:
    spec = {"name": "tiny", "setting": str(SETTING["classification"]), "overrides": TINY,
            "methods": ["fedavg"], "budget": {"trials": 2}, "seeds": [0, 1], **fields}
    path = folder / "compare.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def compare_error(path: Path, capsys, *overrides: str) -> str:
    args = [a for o in overrides for a in ("-o", o)]
    assert main(["compare", str(path), *args, "--out", str(path.parent / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("raysim: error: "), err
    assert not (path.parent / "out").exists()
    return err[0]


def test_comparison_mistakes_are_one_line_before_ray(tmp_path, capsys):
    path = write_comparison(tmp_path)
    assert "unknown algorithm 'fedfoo'; choose one of" in compare_error(
        path, capsys, "methods=[fedavg,fedfoo]")
    error = compare_error(path, capsys, "methods=[fedavg,fedbcs]")
    assert "methods[1]: fedbcs does not run classification tasks" in error
    assert "methods that do: fedavg, fedavg_ft, fedgh, fedhpro, fedhpro_paper, fedper" in error
    assert "budget.trials: must be an integer >= 1" in compare_error(
        path, capsys, "budget.trials=0")
    assert "budget.draws: must be one of tune, per_key (got 'paired')" in compare_error(
        path, capsys, "budget.draws=paired")
    assert "seeds: missing; list the seeds" in compare_error(path, capsys, "seeds=[]")
    assert "seeds: a seed is listed twice" in compare_error(path, capsys, "seeds=[1,1]")
    assert "setting: it has no validation split" in compare_error(
        path, capsys, "overrides.data.val_fraction=null")
    assert "unknown key 'budgett'" in compare_error(path, capsys, "budgett.trials=2")
    assert "'fedavg' is listed twice" in compare_error(path, capsys, "methods=[fedavg,fedavg]")
    assert "budget.scheduler.grace_period: 5 > rounds (2)" in compare_error(
        path, capsys, "budget.scheduler={name: asha, grace_period: 5}")
    missing = write_comparison(tmp_path, setting="nowhere.yaml")
    assert "not found" in compare_error(missing, capsys)


def test_resume_refuses_what_the_directory_was_not_run_with(tmp_path, capsys):
    """--resume needs the directory of the same comparison: the setting, budget and seeds as
    they were, and a method of an existing label as it was defined; methods may be added."""
    path = write_comparison(tmp_path)
    out = tmp_path / "out"
    write_record(load_comparison(path), out)
    (out / "methods").mkdir()

    def resume_error(*overrides: str) -> str:
        args = [a for o in overrides for a in ("-o", o)]
        assert main(["compare", str(path), *args, "--out", str(out), "--resume"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("raysim: error: compare --resume: "), err
        return err[0]

    assert "was run with other base, name; resume it" in resume_error(
        "overrides.rounds=3", "name=other")
    assert "was run with other trials; resume it" in resume_error("budget.trials=3")
    assert "was run with other draws; resume it" in resume_error("budget.draws=tune")
    assert "method fedavg differs from the one" in resume_error(
        "methods=[{label: fedavg, algorithm: {name: fedprox}}]")
    check_directory(load_comparison(path, ["methods=[fedavg,fedproto]"]), out, resume=True)
    write_record(load_comparison(path, ["methods=[fedproto]"]), out)
    record = json.loads((out / COMPARISON_RECORD).read_text())
    assert sorted(record["methods"]) == ["fedavg", "fedproto"]
    assert main(["compare", str(path), "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "give the comparison directory with --out DIR" in capsys.readouterr().err


def test_a_method_key_that_does_not_exist_names_the_method(tmp_path, capsys):
    path = write_comparison(tmp_path, methods=[
        {"label": "prox", "algorithm": {"name": "fedprox"},
         "search": {"algorithm.muu": {"choice": [0.1]}}}])
    error = compare_error(path, capsys)
    assert error.startswith("raysim: error: methods.prox: search point algorithm.muu=0.1")


def test_markdown_table_rows():
    summary = {"reported": "test_accuracy", "methods": {
        "fedavg": {"test_accuracy_mean": 0.9123, "test_accuracy_std": 0.0101,
                   "parts": {"mnist": 0.95}, "tuned": {"train.lr": 0.0123456},
                   "trials": 8, "tuning_seconds": 90.0, "seeds_seconds": 30.0},
        "fpl": {"test_accuracy_mean": math.nan, "test_accuracy_std": math.nan, "parts": {},
                "tuned": {}, "trials": 8, "tuning_seconds": 6.0, "seeds_seconds": 0.0,
                "stopped": ["seed 2 failed after round 11"]}}}
    lines = markdown_table(summary).splitlines()
    assert lines[0] == ("| method | test_accuracy (%) | mnist | tuned | trials | minutes | "
                        "runs stopped |")
    assert lines[2] == "| fedavg | 91.2 ± 1.0 | 95.0 | lr=0.0123 | 8 | 2.0 | - |"
    assert lines[3] == "| fpl | failed | - | - | 8 | 0.1 | seed 2 failed after round 11 |"


@pytest.mark.slow
def test_ready_digits_comparison_end_to_end(ray_session, tmp_path, capsys):
    """The ready digits comparison at a tiny budget: the table it prints is recomputed here from
    the seed runs' metrics, the tuned seed-0 rerun repeats its tuning trial bit for bit, and a
    comparison cut short in a method's seed runs is finished by --resume with the same table."""
    out = tmp_path / "out"
    overrides = [f"overrides.{k}={json.dumps(v)}" for k, v in TINY.items()]
    args = ["compare", str(COMPARE / "digits_a0.5.yaml"), "-o", "methods=[fedavg,fedproto]",
            "-o", "budget.trials=2", "-o", "budget.scheduler=none", "-o", "seeds=[0,1]",
            *[a for o in overrides for a in ("-o", o)], "--out", str(out)]
    assert main(args) == 0
    for name in ("table.md", "results.csv", "compare.parquet", "curves.png", "summary.json",
                 "best/fedavg.yaml", "best/fedproto.yaml"):
        assert (out / name).stat().st_size > 0, name
    results = pd.read_csv(out / "results.csv")
    assert sorted(zip(results["method"], results["seed"])) == \
        [("fedavg", 0), ("fedavg", 1), ("fedproto", 0), ("fedproto", 1)]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["draws"] == "per_key"
    curves = pd.read_parquet(out / "compare.parquet")
    for _, row in results.iterrows():
        # the reported test value is the test metric at the round of the best validation value
        run = pd.read_parquet(Path(row["run_dir"]) / "metrics.parquet")
        val = run[run["metric"] == "val_accuracy"].set_index("round")["value"]
        test = run[run["metric"] == "test_accuracy"].set_index("round")["value"]
        assert row["round"] == val.idxmax() and row["test_accuracy"] == test[val.idxmax()]
        mine = curves[(curves["method"] == row["method"]) & (curves["seed"] == row["seed"])]
        assert list(mine[mine["metric"] == "test_accuracy"]["value"]) == list(test)
    file = load_comparison(COMPARE / "digits_a0.5.yaml")
    shared_lr = [p["train.lr"] for p in file.tuning_sweep(file.methods[0]).drawn_points()]
    for label, method in summary["methods"].items():
        values = results[results["method"] == label]["test_accuracy"]
        assert method["test_accuracy_mean"] == pytest.approx(statistics.fmean(values))
        assert method["test_accuracy_std"] == pytest.approx(statistics.stdev(values))
        # the tuned values are those of the tuning trial with the best validation round
        trials = pd.read_csv(out / "methods" / label / "tuning" / "trials.csv")
        assert len(trials) == 2 == method["trials"]
        # Tune ran the drawn learning rates, the same two for both methods (draws: per_key)
        assert list(trials.sort_values("trial")["train.lr"]) == shared_lr[:2]
        best = trials.loc[trials["best_val_accuracy"].idxmax()]
        assert method["tuned"]["train.lr"] == best["train.lr"]
        config = load_config(out / "best" / f"{label}.yaml")
        assert config.train.lr == best["train.lr"] and config.algorithm.name == label
        # the seed-0 rerun (the setting's seed) is the same run as that tuning trial
        rerun = pd.read_parquet(Path(results[(results["method"] == label) &
                                             (results["seed"] == 0)]["run_dir"].iloc[0])
                                / "metrics.parquet")
        trial = pd.read_parquet(Path(best["run_dir"]) / "metrics.parquet")
        keep = ~rerun["metric"].isin(["round_seconds", "samples_per_second"])
        assert rerun[keep].reset_index(drop=True).equals(
            trial[~trial["metric"].isin(["round_seconds", "samples_per_second"])]
            .reset_index(drop=True))
    table = (out / "table.md").read_text().splitlines()
    assert table[0].startswith("| method | test_accuracy (%) |") and len(table) == 4
    # the report rebuilt from the directory alone (a comparison cut short) says the same
    live = (out / "results.csv").read_text()
    assert main([*args, "--report"]) == 0
    assert (out / "results.csv").read_text() == live
    rebuilt = json.loads((out / "summary.json").read_text())
    for label, method in summary["methods"].items():
        assert rebuilt["methods"][label]["tuned"] == method["tuned"]
        assert rebuilt["methods"][label]["test_accuracy_mean"] == method["test_accuracy_mean"]

    # A second comparison into the same directory is refused; one resumed with other seeds too.
    capsys.readouterr()
    assert main(args) == 2
    assert "already holds a comparison: add --resume" in capsys.readouterr().err
    assert main([*args, "-o", "seeds=[0]", "--resume"]) == 2
    assert "was run with other seeds; resume it with the file" in capsys.readouterr().err
    # Cut short: fedproto's seed-1 run never finished. --resume keeps fedavg as it is, reruns
    # fedproto's seeds only, and reports what the uninterrupted comparison reported.
    kept = {p: p.stat().st_mtime_ns for p in (out / "methods" / "fedavg").rglob("*")
            if p.is_file()} | {p: p.stat().st_mtime_ns for p in
                               (out / "methods" / "fedproto" / "tuning").rglob("*.csv")}
    seed_1 = Path(results[(results["method"] == "fedproto") & (results["seed"] == 1)]
                  ["run_dir"].iloc[0])
    (seed_1 / "summary.json").unlink()
    assert main([*args, "--report"]) == 0
    assert len(pd.read_csv(out / "results.csv")) == 3
    assert main([*args, "--resume"]) == 0
    assert "fedavg: finished before, kept" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    resumed = pd.read_csv(out / "results.csv")
    same = ["method", "seed", "round", "val_accuracy", "test_accuracy", "run_dir"]
    assert resumed[same].equals(results[same])
