"""Malformed values in a config file or an override are one line naming the key or the
override, at parsing: overrides that are not YAML or carry a tag, non-finite floats, integers
beyond 64 bits, a negative seed, YAML whose aliases expand without end."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from raysim.cli.main import main
from raysim.config import MAX_YAML_NODES, ConfigError
from raysim.run.validate import config_from_dict, load_config
from raysim.tune.compare import load_comparison

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = str(ROOT / "yaml" / "quickstart.yaml")


def one_line(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("raysim: error: "), err
    assert captured.out == ""  # nothing printed: no config, no partition
    return err[0].removeprefix("raysim: error: ")


@pytest.mark.parametrize("override, message", [
    ("train.lr=[0.1", "override 'train.lr=[0.1': the value is not valid YAML (expected ',' or "
     "']', but got '<stream end>'); quote it to pass it as text"),
    ("train.lr={a: 1", "override 'train.lr={a: 1': the value is not valid YAML ("),
    ("train.lr=!!python/object:os.system x", "override 'train.lr=!!python/object:os.system x': "
     "YAML tags (!...) are not accepted in a value; write the plain value"),
    ("train.lr=!!binary aGVsbG8=", "override 'train.lr=!!binary aGVsbG8=': YAML tags (!...) "
     "are not accepted"),
    ("name=!local x", "override 'name=!local x': YAML tags"),
    ("train.lr=[!!float 1]", "override 'train.lr=[!!float 1]': YAML tags"),
])
def test_an_override_that_is_not_plain_yaml_names_the_override(capsys, override, message):
    assert one_line(capsys, "config", QUICKSTART, "-o", override).startswith(message)


def test_a_tagged_override_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "ran"
    override = f"name=!!python/object/apply:os.system ['touch {marker}']"
    assert "YAML tags (!...) are not accepted" in one_line(
        capsys, "config", QUICKSTART, "-o", override)
    assert not marker.exists()


def test_text_that_looks_like_a_tag_passes_when_quoted():
    assert config_from_dict({}, ["logging.wandb.project='!x'"]).logging.wandb.project == "!x"
    assert config_from_dict({}, ["train.lr=1e-3"]).train.lr == 0.001


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "nan", "inf", "1e999", "-1e999",
                                   str(10**400)])
def test_non_finite_floats_are_refused_at_parsing(value):
    with pytest.raises(ConfigError, match=r"^train\.lr: must be a finite number \(got "):
        config_from_dict({}, [f"train.lr={value}"])


def test_non_finite_floats_are_refused_in_files_and_plugin_keys(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("algorithm: {name: fedprox, mu: .nan}\n")
    assert one_line(capsys, "config", str(path)) == \
        "algorithm.mu: must be a finite number (got nan)"
    path.write_text("fault_tolerance: {min_clients_fraction: .inf}\n")
    assert one_line(capsys, "config", str(path)) == \
        "fault_tolerance.min_clients_fraction: must be a finite number (got inf)"
    path.write_text("data: {partition: {kind: dirichlet, alpha: .inf}}\n")
    assert one_line(capsys, "config", str(path)) == \
        "data.partition.alpha: must be a finite number (got inf)"


def test_integers_beyond_64_bits_are_refused():
    with pytest.raises(ConfigError, match=r"^rounds: 9223372036854775808 does not fit in a "
                       r"64-bit integer$"):
        config_from_dict({}, [f"rounds={2**63}"])
    assert config_from_dict({}, [f"seed={2**63 - 1}"]).seed == 2**63 - 1


def test_a_negative_seed_is_named_as_the_seed(tmp_path, capsys):
    """It used to reach the partition's generator first and be reported as data.partition."""
    with pytest.raises(ConfigError, match=r"^seed: must be >= 0 \(got -1\)$"):
        config_from_dict({}, ["seed=-1"])
    out = tmp_path / "split.parquet"
    assert one_line(capsys, "partition", QUICKSTART, "-o", "seed=-1", "--out", str(out)) == \
        "seed: must be >= 0 (got -1)"
    assert not out.exists()
    fedprox = {"data": {"dataset": "synthetic_fedprox", "seed": -2,
                        "partition": {"kind": "natural"}}, "model": {"name": "logreg"}}
    with pytest.raises(ConfigError, match=r"^data\.seed: must be >= 0 \(got -2\)$"):
        config_from_dict(fedprox)


def billion_laughs(levels: int = 12) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nname: *a{levels - 1}\n"


def test_yaml_whose_aliases_expand_without_end_is_one_line(tmp_path, capsys, monkeypatch):
    """10^12 values once copied out, in 700 bytes: refused before the config is copied."""
    path = tmp_path / "laughs.yaml"
    path.write_text(billion_laughs())
    assert path.stat().st_size < 1000
    assert one_line(capsys, "config", str(path)) == (
        f"{path}: expands to more than {MAX_YAML_NODES:,} values once its aliases (*name) are "
        "copied out")
    monkeypatch.setattr("raysim.config.MAX_YAML_NODES", 5)  # an override's value: 7 values
    with pytest.raises(ConfigError, match=r"^override 'name=\[&a \[1, 1\], \*a\]': "
                       "expands to more than 5 values"):
        config_from_dict({}, ["name=[&a [1, 1], *a]"])


def test_self_referencing_and_deeply_nested_yaml_is_one_line(tmp_path):
    loop = tmp_path / "loop.yaml"
    loop.write_text("name: &a [*a]\n")
    with pytest.raises(ConfigError, match=r"nested deeper than 100 levels, or an alias \(\*name\) "
                       "refers to the value that holds it"):
        load_config(loop)
    deep = tmp_path / "deep.yaml"
    deep.write_text("name: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match=rf"^{deep}: (not valid YAML: )?nested"):
        load_config(deep)


def test_a_comparison_override_is_read_the_same_way(tmp_path):
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump({"name": "c", "setting": str(ROOT / "yaml" / "settings" /
                                                                "digits_a0.5.yaml"),
                                    "methods": ["fedavg"], "seeds": [0]}))
    with pytest.raises(ConfigError, match=r"^override 'budget\.trials=\[2': the value is not "
                       "valid YAML"):
        load_comparison(path, ["budget.trials=[2"])
    with pytest.raises(ConfigError, match=r"^override 'seeds=!!binary AA==': YAML tags"):
        load_comparison(path, ["seeds=!!binary AA=="])


def test_an_integer_of_thousands_of_digits_is_one_line(tmp_path):
    path = tmp_path / "digits.yaml"
    path.write_text("rounds: " + "1" * 5000 + "\n")
    with pytest.raises(ConfigError, match=rf"^{path}: a value YAML cannot read \(Exceeds the "
                       r"limit \(4300 digits\) for integer string conversion"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"^override 'rounds=1+': a value YAML cannot read"):
        config_from_dict({}, ["rounds=" + "1" * 5000])
