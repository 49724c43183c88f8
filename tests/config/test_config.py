from __future__ import annotations

import dataclasses
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

from raysim.config import (
    ALGORITHM,
    DATASET,
    MODEL,
    PARTITIONER,
    SINK,
    Config,
    ConfigError,
    apply_override,
    config_class,
    config_to_dict,
    dump_config,
    require,
)
from raysim.data import ArraySplit, Dataset, DatasetSpec
from raysim.registry import DATASETS, MODELS, PARTITIONERS, REGISTRIES, algorithm_class
from raysim.run.validate import config_from_dict, load_config
from raysim.task import build_task


def test_quickstart_file_parses_to_the_documented_values():
    config = load_config("yaml/quickstart.yaml")
    assert isinstance(config, Config)
    assert (config.rounds, config.clients_per_round, config.seed) == (20, 10, 0)
    assert config.data.partition.kind == "dirichlet"
    assert config.data.partition.params.alpha == 0.5
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
    assert config.data.partition.params.alpha == 0.1
    assert config.logging.wandb.tags == ("a", "b")


def test_plugin_defaults_come_from_the_plugin_config():
    config = config_from_dict({"algorithm": {"name": "fedprox"}})
    assert config.algorithm.params.mu == 0.01
    shards = config_from_dict({"data": {"partition": {"kind": "shards"}}})
    assert shards.data.partition.params == PARTITIONERS["shards"].Config(classes_per_client=2)
    organ = config_from_dict({"data": {"dataset": "synthetic_organ", "sites": 6,
                                       "partition": {"kind": "domains", "num_clients": 6}},
                              "model": {"name": "unet"}, "clients_per_round": 6})
    assert organ.data.params == DATASETS["synthetic_organ"].Config(sites=6)
    assert organ.model.params == MODELS["unet"].Config(width=None)


def test_resolved_config_round_trips_through_yaml():
    config = load_config("yaml/quickstart.yaml", ["algorithm.name=fedprox"])
    again = config_from_dict(yaml.safe_load(dump_config(config)))
    assert again == config
    assert config_to_dict(config)["algorithm"] == {"name": "fedprox", "mu": 0.01}
    # a plug-in's keys are written in the section that names it, as a user writes them
    assert config_to_dict(config)["data"]["partition"] == {
        "kind": "dirichlet", "alpha": 0.5, "min_size": 2, "num_clients": 50}


def test_every_section_is_frozen():
    config = load_config("yaml/quickstart.yaml")
    for section in (config, config.data, config.data.partition, config.data.partition.params,
                    config.train, config.logging, config.algorithm):
        with pytest.raises(dataclasses.FrozenInstanceError):
            section.name = "changed"  # type: ignore[misc]


def test_scientific_notation_string_is_accepted_for_floats():
    assert config_from_dict({"train": {"lr": "1e-3"}}).train.lr == pytest.approx(1e-3)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"data": {"partiton": {}}},
         "unknown key 'data.partiton' for dataset 'digits'; did you mean 'data.partition'"),
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
         "model.name: unknown model 'vit'; choose one of cnn, cnn_deep, cnn_wide, logreg, mlp, "
         "resnet10, unet"),
        ({"algorithm": {"name": "fedsomething"}},
         "algorithm.name: unknown algorithm 'fedsomething'; choose one of fedavg, fedavg_ft, "
         "fedbcs, fedgh, fedhpro"),
        ({"algorithm": {"name": "fedprox", "mu": -1}}, "algorithm.mu: must be >= 0"),
        ({"algorithm": {"name": "fedavg", "mu": 0.1}},
         "unknown key 'algorithm.mu' for algorithm 'fedavg'; valid keys here: name"),
        ({"data": {"partition": {"kind": "zipf"}}},
         "data.partition.kind: unknown partition kind 'zipf'; choose one of dirichlet,"),
        ({"data": {"long_tail": {"rho": 0.5}}},
         "data.long_tail.rho: imbalance ratio must be >= 1"),
        ({"resources": {"worker": {"num_gpus": 1.5}}}, "resources.worker.num_gpus: fractions"),
        ({"data": ["digits"]}, "data: expected a mapping of keys, got list"),
        ({"data": {"test_fraction": 1.0}}, r"data.test_fraction: must be in \(0, 1\)"),
        ({"data": {"val_fraction": 1.0}}, r"data.val_fraction: must be in \[0, 1\)"),
        ({"model": {"name": "resnet10", "width": 0}}, "model.width: must be >= 1"),
        ({"logging": {"sinks": ["nowhere"]}},
         r"logging.sinks\[0\]: unknown sink 'nowhere'; choose one of wandb"),
        ({"logging": {"sinks": [{"name": "wandb", "every": 2}]}},
         r"unknown key 'logging.sinks\[0\].every' for sink 'wandb'; valid keys here: name"),
    ],
)
def test_bad_config_gets_one_specific_error(raw, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        # a plug-in rejects a key: the plug-in and the key, with the nearest valid key
        ({"data": {"dataset": "synthetic_organ", "sitez": 6}},
         "unknown key 'data.sitez' for dataset 'synthetic_organ'; did you mean 'data.sites'?"),
        ({"data": {"partition": {"alpah": 0.1}}},
         "unknown key 'data.partition.alpah' for partition kind 'dirichlet'; did you mean "
         "'data.partition.alpha'?"),
        ({"data": {"partition": {"kind": "iid", "alpha": 0.1}}},
         "unknown key 'data.partition.alpha' for partition kind 'iid'; valid keys here: kind, "
         "num_clients"),
        ({"model": {"name": "cnn", "width": 8}},
         "unknown key 'model.width' for model 'cnn'; valid keys here: name"),
        ({"data": {"image_size": 64}},
         "unknown key 'data.image_size' for dataset 'digits'; valid keys here: dataset, root,"),
    ],
)
def test_a_plugin_that_rejects_a_key_names_itself_and_the_key(raw, message):
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"data": {"dataset": "synthetic_organ", "synthetic": {"sites": 6}}},
         "data.synthetic.sites: moved to data.sites"),
        ({"data": {"dataset": "synthetic_fedprox", "synthetic_fedprox": {"alpha": 0.5}}},
         "data.synthetic_fedprox.alpha: moved to data.alpha"),
        ({"data": {"synthetic": {}}}, "data.synthetic: its keys moved to data"),
    ],
)
def test_an_old_spelling_names_the_new_one(raw, message):
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    assert str(info.value) == message


def test_an_old_spelling_in_an_override_names_the_new_one():
    with pytest.raises(ConfigError, match=r"^data.synthetic.image_size: moved to "
                                          r"data.image_size$"):
        load_config("yaml/settings/synthetic_organ.yaml", ["data.synthetic.image_size=32"])


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
    assert config.data.partition.params.alpha == 0.9  # the experiment wins
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


def test_every_plugin_kind_of_the_config_has_a_registry():
    assert set(REGISTRIES) == {ALGORITHM, DATASET, PARTITIONER, MODEL, SINK}


def test_the_config_module_imports_no_plugin():
    """raysim.config holds the core sections and the parser: importing it loads no dataset,
    model, method or registry (plug-ins are resolved by raysim.run.validate)."""
    code = ("import sys, raysim.config\n"
            "print([m for m in sys.modules if m.startswith(('raysim.data', 'raysim.nn', "
            "'raysim.methods', 'raysim.registry', 'algorithms', 'torch'))])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]"


# ------------------------------------------------------------ a plug-in's own keys, end to end


@dataclass(frozen=True)
class BlobsConfig:
    samples: int = 60  # training samples

    def __post_init__(self) -> None:
        require(self.samples >= 10, "samples", f"must be >= 10 (got {self.samples})")


class SizedBlobs:
    """A dataset plug-in (named by import path) with a key of its own."""

    task = "classification"
    Config = BlobsConfig

    def check(self, request) -> None:
        pass

    def load(self, request) -> Dataset:
        rng = np.random.default_rng(request.split_seed)
        n = request.params.samples
        y = np.arange(n) % 4
        x = rng.normal(size=(n, 1, 4, 4)).astype(np.float32)
        split = ArraySplit(x, y.astype(np.int64))
        return Dataset(DatasetSpec("blobs", 4, (1, 4, 4), (0.0,), (1.0,), 1.0, None), split,
                       split)


sized_blobs = SizedBlobs()


def test_a_plugin_dataset_reads_a_key_of_its_own():
    raw = {"data": {"dataset": "test_config:sized_blobs", "samples": 40,
                    "partition": {"kind": "iid", "num_clients": 4}},
           "clients_per_round": 2, "model": {"name": "logreg"}}
    config = config_from_dict(raw)
    assert config.data.params == BlobsConfig(samples=40)
    assert config_to_dict(config)["data"]["samples"] == 40
    assert build_task(config).partition.sizes.sum() == 40
    with pytest.raises(ConfigError, match=r"^data.samples: must be >= 10 \(got 5\)$"):
        config_from_dict(raw, ["data.samples=5"])
    with pytest.raises(ConfigError, match="unknown key 'data.sample' for dataset "
                                          "'test_config:sized_blobs'; did you mean "
                                          "'data.samples'"):
        config_from_dict(raw, ["data.sample=5"])


@dataclass(frozen=True)
class RootConfig:
    root: str = "here"  # a key `data` has already


class Shadowing(SizedBlobs):
    Config = RootConfig


shadowing = Shadowing()


def test_a_plugin_key_that_the_section_has_already_is_refused():
    with pytest.raises(ConfigError, match=r"^data.dataset: the dataset 'test_config:shadowing' "
                                          r"declares keys that data has already: root; "):
        config_from_dict({"data": {"dataset": "test_config:shadowing"}})


@dataclass(frozen=True)
class EveryConfig:
    every: int = 1  # log every this many rounds


class EverySink:
    """A sink plug-in (named by import path) with a key of its own."""

    Config = EveryConfig

    def __init__(self, run_dir: Path, params: EveryConfig) -> None:
        self.run_dir, self.params = run_dir, params

    def start(self, run) -> None: ...

    def log_round(self, result) -> None: ...

    def finish(self, summary) -> None: ...


def test_a_sink_is_a_name_or_a_mapping_of_its_own_keys(tmp_path):
    from raysim.results.sinks import extra_sinks

    name = "test_config:EverySink"
    config = config_from_dict({"logging": {"sinks": [name, {"name": name, "every": 3}]}})
    sinks = extra_sinks(config, tmp_path)
    assert [sink.params for sink in sinks] == [EveryConfig(1), EveryConfig(3)]
    assert all(sink.run_dir == tmp_path for sink in sinks)
    # written with every key, defaults included; a sink without keys as its bare name
    assert config_to_dict(config)["logging"]["sinks"] == [{"name": name, "every": 1},
                                                          {"name": name, "every": 3}]
    assert config_from_dict(yaml.safe_load(dump_config(config))) == config
    bare = config_from_dict({"logging": {"sinks": ["wandb"]}})
    assert config_to_dict(bare)["logging"]["sinks"] == ["wandb"]


# ------------------------------------------------------------ the shipped configs

NOT_EXPERIMENTS = ("sweeps", "cluster", "compare")
EXPERIMENT_CONFIGS = sorted(str(p) for p in Path("yaml").rglob("*.yaml")
                            if p.parent.name not in NOT_EXPERIMENTS)


@pytest.mark.parametrize("path", EXPERIMENT_CONFIGS)
def test_every_shipped_config_is_valid(path):
    config = load_config(path)
    # what a run directory keeps (config.yaml) loads back to the same config
    assert config_from_dict(yaml.safe_load(dump_config(config))) == config
    # and the plug-ins it names resolve, each section holding its own plug-in's keys
    for section, plugin in ((config.data, DATASETS[config.data.dataset]),
                            (config.data.partition, PARTITIONERS[config.data.partition.kind]),
                            (config.model, MODELS[config.model.name]),
                            (config.algorithm, algorithm_class(config.algorithm.name))):
        assert type(section.params) is config_class(plugin)
    assert MODELS[config.model.name].task == DATASETS[config.data.dataset].task
