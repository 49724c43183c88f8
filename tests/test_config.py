from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from raysim.config import (
    Config,
    ConfigError,
    apply_override,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
)


def test_quickstart_file_parses_to_the_documented_values():
    config = load_config("yaml/quickstart.yaml")
    assert isinstance(config, Config)
    assert (config.rounds, config.clients_per_round, config.seed) == (20, 10, 0)
    assert config.data.partition.kind == "dirichlet"
    assert config.data.partition.alpha == 0.5
    assert config.data.partition.num_clients == 50
    assert config.train.momentum == 0.9
    assert config.resources.worker.num_cpus == 1.0
    assert config.algorithm.name == "fedavg"


def test_dotted_overrides_change_nested_keys_and_parse_values_as_yaml():
    config = load_config(
        "yaml/quickstart.yaml",
        ["algorithm.name=fedprox", "data.partition.alpha=0.1", "algorithm.mu=0.05",
         "logging.wandb.tags=[a, b]"],
    )
    assert config.algorithm.name == "fedprox"
    assert config.algorithm.params.mu == 0.05
    assert config.data.partition.alpha == 0.1
    assert config.logging.wandb.tags == ["a", "b"]


def test_algorithm_defaults_come_from_the_algorithm_config():
    config = config_from_dict({"algorithm": {"name": "fedprox"}})
    assert config.algorithm.params.mu == 0.01


def test_resolved_config_round_trips_through_yaml():
    config = load_config("yaml/quickstart.yaml", ["algorithm.name=fedprox"])
    again = config_from_dict(yaml.safe_load(dump_config(config)))
    assert config_to_dict(again) == config_to_dict(config)
    assert config_to_dict(config)["algorithm"] == {"name": "fedprox", "mu": 0.01}


def test_scientific_notation_string_is_accepted_for_floats():
    assert config_from_dict({"train": {"lr": "1e-3"}}).train.lr == pytest.approx(1e-3)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"data": {"partiton": {}}}, "unknown key 'data.partiton'; did you mean 'data.partition'"),
        ({"roundz": 3}, "unknown key 'roundz'; did you mean 'rounds'"),
        ({"rounds": "ten"}, "rounds: expected int, got str 'ten'"),
        ({"rounds": 2.5}, "rounds: expected int, got float 2.5"),
        ({"logging": {"progress": "yes"}}, "logging.progress: expected bool"),
        ({"data": {"partition": {"alpha": 0}}}, r"data.partition.alpha: must be > 0 \(got 0.0\)"),
        ({"data": {"partition": {"alpha": -1}}}, "data.partition.alpha: must be > 0"),
        ({"clients_per_round": 60}, r"clients_per_round: 60 > data.partition.num_clients \(50\)"),
        ({"data": {"dataset": "imagenet"}},
         "data.dataset: unknown dataset 'imagenet'; choose one of cifar10, cifar100, digits,"),
        ({"model": {"name": "vit"}},
         "model.name: unknown model 'vit'; choose one of cnn, logreg, mlp, resnet10, unet"),
        ({"algorithm": {"name": "fedsomething"}},
         "algorithm.name: unknown algorithm 'fedsomething'; choose one of fedavg, fedbcs, fedhpro"),
        ({"algorithm": {"name": "fedprox", "mu": -1}}, "algorithm.mu: must be >= 0"),
        ({"algorithm": {"name": "fedavg", "mu": 0.1}}, "unknown key 'algorithm.mu'"),
        ({"data": {"partition": {"kind": "zipf"}}},
         "data.partition.kind: unknown partition kind 'zipf'; choose one of dirichlet,"),
        ({"data": {"long_tail": {"rho": 0.5}}},
         "data.long_tail.rho: imbalance ratio must be >= 1"),
        ({"resources": {"worker": {"num_gpus": 1.5}}}, "resources.worker.num_gpus: fractions"),
        ({"data": ["digits"]}, "data: expected a mapping of keys, got list"),
    ],
)
def test_bad_config_gets_one_specific_error(raw, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


def test_bad_override_syntax_and_missing_file():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_override({}, "rounds")
    with pytest.raises(ConfigError, match="'rounds' is not a section"):
        apply_override({"rounds": 3}, "rounds.x=1")
    with pytest.raises(ConfigError, match="config file 'nope.yaml' not found"):
        load_config("nope.yaml")


def test_base_file_is_merged_under_the_experiment(tmp_path):
    (tmp_path / "setting.yaml").write_text(
        "rounds: 7\ndata: {partition: {alpha: 0.2, num_clients: 30}}\ntrain: {lr: 0.1}\n")
    (tmp_path / "exp.yaml").write_text(
        "base: setting.yaml\ndata: {partition: {alpha: 0.9}}\nalgorithm: {name: fedprox}\n")
    config = load_config(tmp_path / "exp.yaml")
    assert config.rounds == 7 and config.train.lr == 0.1
    assert config.data.partition.alpha == 0.9  # the experiment wins
    assert config.data.partition.num_clients == 30  # nested keys merge
    assert config.algorithm.name == "fedprox"


def test_base_loops_and_missing_bases_are_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="`base` chain loops back"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml' not found"):
        load_config(tmp_path / "c.yaml")


NOT_EXPERIMENTS = ("sweeps", "cluster", "compare")
EXPERIMENT_CONFIGS = sorted(str(p) for p in Path("yaml").rglob("*.yaml")
                            if p.parent.name not in NOT_EXPERIMENTS)


@pytest.mark.parametrize("path", EXPERIMENT_CONFIGS)
def test_every_shipped_config_is_valid(path):
    assert load_config(path).name
