"""Untrusted inputs fail safely: CIFAR pickles cannot run code, and broken dataset or config
files give one error line naming the file instead of a traceback."""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from raysim.config import ConfigError, read_yaml
from raysim.data import DatasetFormatError, load_dataset, safe_pickle

REPO = Path(__file__).resolve().parents[2]
_BIN = Path(sys.executable).parent / "raysim"
RAYSIM = [str(_BIN)] if _BIN.is_file() else [sys.executable, "-m", "raysim.cli"]


def run_cli(*args: str, ray_address: str | None) -> subprocess.CompletedProcess:
    # ray_address=None drops RAY_ADDRESS: `launch` checks a configured cluster before it loads
    # data, so a dead address would fail first; an unset one starts Ray only after the data
    # loaded, which these runs never reach.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if ray_address is not None:
        env["RAY_ADDRESS"] = ray_address
    return subprocess.run(
        [*RAYSIM, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=180
    )


@pytest.fixture
def cli_lines(monkeypatch, capsys):
    """`raysim ARGS` in this process, with RAY_ADDRESS as `run_cli` sets it: the exit code and
    the stderr lines (the real `raysim` process is the malicious-root test's)."""
    from raysim.cli.main import main

    def run(*args: str, ray_address: str | None) -> tuple[int, list[str]]:
        if ray_address is None:
            monkeypatch.delenv("RAY_ADDRESS", raising=False)
        else:
            monkeypatch.setenv("RAY_ADDRESS", ray_address)
        monkeypatch.chdir(REPO)
        capsys.readouterr()
        code = main(list(args))
        return code, capsys.readouterr().err.strip().splitlines()

    return run


# --- CIFAR batches as the official files store them ------------------------------------------


def _py2_str(data: bytes) -> bytes:
    """A Python 2 `str` at protocol 2 (SHORT_BINSTRING / BINSTRING)."""
    if len(data) < 256:
        return b"U" + bytes([len(data)]) + data
    return b"T" + struct.pack("<i", len(data)) + data


def _py2_int(value: int) -> bytes:
    if 0 <= value < 256:
        return b"K" + bytes([value])
    return b"J" + struct.pack("<i", value)


def _py2_value(value: object) -> bytes:
    if isinstance(value, str):
        return _py2_str(value.encode("latin1"))
    if isinstance(value, int):
        return _py2_int(value)
    if isinstance(value, list):
        return b"](" + b"".join(_py2_value(v) for v in value) + b"e"
    assert isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 2
    return (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R"
        b"(K\x01" + _py2_int(value.shape[0]) + _py2_int(value.shape[1]) + b"\x86"
        b"cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
        b"\x89" + _py2_str(value.tobytes()) + b"tb"
    )


def py2_pickle(batch: dict[str, object]) -> bytes:
    """The bytes Python 2's cPickle writes at protocol 2 for a CIFAR batch dict, as in the
    official cifar-10-python.tar.gz: str keys, numpy.core.multiarray._reconstruct arrays."""
    items = b"".join(_py2_str(k.encode()) + _py2_value(v) for k, v in batch.items())
    return b"\x80\x02}(" + items + b"u."


def _batch(rng: np.random.Generator, n: int, label_key: str = "labels") -> dict[str, object]:
    return {
        "batch_label": "training batch 1 of 5",
        label_key: [int(v) for v in rng.integers(0, 10, n)],
        "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        "filenames": [f"img_{i}.png" for i in range(n)],
    }


def _encode(batch: dict[str, object], form: str) -> bytes:
    if form == "py2":
        return py2_pickle(batch)
    protocol = int(form.removeprefix("py3-protocol"))
    keyed = {k.encode(): v for k, v in batch.items()}  # re-pickled copies keep bytes keys
    return pickle.dumps(keyed, protocol=protocol)


def cifar10_root(tmp_path: Path, form: str = "py2") -> tuple[Path, list[dict[str, object]]]:
    """A data.root in the layout torchvision extracts: cifar-10-batches-py/data_batch_1..5,
    test_batch, batches.meta."""
    rng = np.random.default_rng(0)
    directory = tmp_path / "cifar-10-batches-py"
    directory.mkdir(parents=True)
    batches = []
    for file, n in [*((f"data_batch_{i}", 3) for i in range(1, 6)), ("test_batch", 4)]:
        batch = _batch(rng, n)
        (directory / file).write_bytes(_encode(batch, form))
        batches.append(batch)
    meta = {"label_names": [f"c{i}" for i in range(10)], "num_cases_per_batch": 10000,
            "num_vis": 3072}
    (directory / "batches.meta").write_bytes(_encode(meta, form))
    return tmp_path, batches


def test_py2_pickle_helper_matches_the_stock_unpickler() -> None:
    # The hand-written stream must be a real pickle, or the loading test below proves nothing.
    batch = _batch(np.random.default_rng(1), 2)
    stock = pickle.loads(py2_pickle(batch), encoding="latin1")
    assert stock.keys() == batch.keys()
    np.testing.assert_array_equal(stock["data"], batch["data"])
    assert stock["labels"] == batch["labels"]


@pytest.mark.parametrize("form", ["py2", "py3-protocol2", "py3-protocol4", "py3-protocol5"])
def test_valid_cifar10_root_loads(tmp_path: Path, form: str) -> None:
    root, batches = cifar10_root(tmp_path, form)
    ds = load_dataset("cifar10", str(root))
    train_rows = np.concatenate([b["data"] for b in batches[:5]])
    assert ds.train.x.shape == (15, 3, 32, 32) and ds.train.x.dtype == np.uint8
    np.testing.assert_array_equal(ds.train.x.reshape(15, -1), train_rows)
    np.testing.assert_array_equal(ds.train.y, sum((b["labels"] for b in batches[:5]), []))
    assert ds.train.y.dtype == np.int64
    np.testing.assert_array_equal(ds.test.x.reshape(4, -1), batches[5]["data"])
    np.testing.assert_array_equal(ds.test.y, batches[5]["labels"])


def test_valid_cifar100_root_loads(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    directory = tmp_path / "cifar-100-python"
    directory.mkdir()
    train, test = _batch(rng, 4, "fine_labels"), _batch(rng, 2, "fine_labels")
    train["fine_labels"] = [99, 0, 57, 12]
    (directory / "train").write_bytes(py2_pickle(train))
    (directory / "test").write_bytes(py2_pickle(test))
    (directory / "meta").write_bytes(py2_pickle({"fine_label_names": ["a"] * 100}))
    ds = load_dataset("cifar100", str(tmp_path))
    np.testing.assert_array_equal(ds.train.y, [99, 0, 57, 12])
    np.testing.assert_array_equal(ds.test.x.reshape(2, -1), test["data"])


# --- Truncated, corrupt or wrongly shaped batches --------------------------------------------


@pytest.mark.parametrize(
    ("damage", "detail"),
    [
        (lambda b: b[: len(b) // 2], "truncated or corrupted: "),
        (lambda b: b[:-1], "truncated or corrupted: "),  # only the STOP opcode missing
        (lambda b: b"", "truncated or corrupted: Ran out of input"),
        (lambda b: b"PK\x03\x04 not a pickle at all", "truncated or corrupted: "),
    ],
    ids=["half", "no-stop", "empty", "zip-bytes"],
)
def test_damaged_batch_is_one_format_error_naming_the_file(tmp_path, damage, detail) -> None:
    root, _ = cifar10_root(tmp_path)
    path = root / "cifar-10-batches-py" / "data_batch_1"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DatasetFormatError) as caught:
        load_dataset("cifar10", str(root))
    message = str(caught.value)
    assert message.startswith(f"cifar10: {path}: not a CIFAR batch file (")
    assert detail in message
    assert "\n" not in message


_DATA_SHAPE = "'data' must be a uint8 array of N rows × 3072 values"


@pytest.mark.parametrize(
    ("change", "detail"),
    [
        ({"data": np.zeros((3, 1024), np.uint8)},
         f"{_DATA_SHAPE}, got uint8 array of shape (3, 1024)"),
        ({"data": np.zeros((3, 3072), np.float32)},
         f"{_DATA_SHAPE}, got float32 array of shape (3, 3072)"),
        ({"data": [[0] * 3072] * 3}, f"{_DATA_SHAPE}, got list"),
        ({"labels": [1, 2]}, "'labels' has 2 entries but 'data' has 3 rows"),
        ({"labels": [1, 2, 10]}, "'labels' must lie in 0..9, found 1..10"),
        ({"labels": ["cat", "dog", "cat"]}, "'labels' must be a flat list of ints"),
        ({"labels": None}, "no 'labels' entry"),
    ],
)
def test_wrong_contents_name_the_file(tmp_path: Path, change: dict, detail: str) -> None:
    root, _ = cifar10_root(tmp_path)
    path = root / "cifar-10-batches-py" / "data_batch_3"
    batch = {**_batch(np.random.default_rng(3), 3), **change}
    batch = {k: v for k, v in batch.items() if v is not None}
    path.write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DatasetFormatError) as caught:
        load_dataset("cifar10", str(root))
    assert str(caught.value) == f"cifar10: {path}: not a CIFAR batch file ({detail})"


def test_a_non_dict_pickle_is_not_a_batch(tmp_path: Path) -> None:
    root, _ = cifar10_root(tmp_path)
    path = root / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(DatasetFormatError) as caught:
        load_dataset("cifar10", str(root))
    assert str(caught.value) == (
        f"cifar10: {path}: not a CIFAR batch file (expected a dict of 'data' and 'labels', "
        "got list)"
    )


# --- Pickles that would run code ---------------------------------------------------------------


class _System:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Open:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


class _Subprocess:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return subprocess.call, (["touch", str(self.marker)],)


class _Exec:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


PAYLOADS = {
    "os.system": (_System, os.system.__module__ + ".system"),
    "builtins.open": (_Open, "io.open"),
    "subprocess.call": (_Subprocess, "subprocess.call"),
    "builtins.exec": (_Exec, "builtins.exec"),
}


def _malicious(kind: str, marker: Path, protocol: int) -> tuple[bytes, str]:
    cls, global_name = PAYLOADS[kind]
    return pickle.dumps(cls(marker), protocol=protocol), global_name


@pytest.mark.parametrize("kind", PAYLOADS)
def test_payload_really_runs_under_plain_pickle(tmp_path: Path, kind: str) -> None:
    # A control: the same bytes do create the marker when loaded the unsafe way.
    marker = tmp_path / "pwned"
    payload, _ = _malicious(kind, marker, 2)
    result = pickle.loads(payload)
    if hasattr(result, "close"):
        result.close()
    assert marker.exists()


@pytest.mark.parametrize("protocol", [0, 2, 5])
@pytest.mark.parametrize("kind", PAYLOADS)
def test_code_running_pickle_is_refused(tmp_path: Path, kind: str, protocol: int) -> None:
    root, _ = cifar10_root(tmp_path / "data")
    marker = tmp_path / "pwned"
    path = root / "cifar-10-batches-py" / "data_batch_1"
    payload, global_name = _malicious(kind, marker, protocol)
    path.write_bytes(payload)
    with pytest.raises(DatasetFormatError) as caught:
        load_dataset("cifar10", str(root))
    assert not marker.exists()
    assert str(caught.value) == (
        f"cifar10: {path}: refuses to load: the file references {global_name} "
        "(a pickle that could run code), not a CIFAR batch"
    )


def test_payload_hidden_inside_a_valid_batch_is_refused(tmp_path: Path) -> None:
    root, _ = cifar10_root(tmp_path / "data")
    marker = tmp_path / "pwned"
    path = root / "cifar-10-batches-py" / "data_batch_5"
    batch = _batch(np.random.default_rng(4), 3)
    batch["filenames"] = ["a.png", _System(marker), "c.png"]
    path.write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DatasetFormatError, match="refuses to load: the file references posix"):
        load_dataset("cifar10", str(root))
    assert not marker.exists()


def test_codecs_encode_is_admitted_only_for_latin1(tmp_path: Path) -> None:
    # Other codecs are looked up by name (importing modules); only the bytes-at-protocol-2 form.
    ok = b"\x80\x02c_codecs\nencode\nX\x02\x00\x00\x00hiX\x06\x00\x00\x00latin1\x86R."
    assert safe_pickle.load(ok) == b"hi"
    with pytest.raises(pickle.UnpicklingError, match="only allowed as"):
        safe_pickle.load(ok.replace(b"X\x06\x00\x00\x00latin1", b"X\x05\x00\x00\x00rot13"))


def test_object_arrays_are_refused() -> None:
    with pytest.raises(pickle.UnpicklingError, match="object-dtype"):
        safe_pickle.load(pickle.dumps(np.array([1, "a"], dtype=object), protocol=2))


# --- The command line: one `raysim: error:` line, exit 2 ---------------------------------------


def _cifar_config(tmp_path: Path, root: Path) -> Path:
    config = tmp_path / "cifar.yaml"
    config.write_text(yaml.safe_dump({
        "name": "cifar-safe",
        "rounds": 1,
        "clients_per_round": 2,
        "data": {"dataset": "cifar10", "root": str(root),
                 "partition": {"kind": "iid", "num_clients": 2}},
        "model": {"name": "cnn"},
        "logging": {"wandb": {"mode": "disabled"}},
    }))
    return config


def test_cli_refuses_a_malicious_cifar_root(tmp_path: Path) -> None:
    root, _ = cifar10_root(tmp_path / "data")
    marker = tmp_path / "pwned"
    path = root / "cifar-10-batches-py" / "data_batch_1"
    path.write_bytes(_malicious("os.system", marker, 2)[0])
    result = run_cli("launch", str(_cifar_config(tmp_path, root)), "--run-dir",
                     str(tmp_path / "run"), ray_address=None)
    assert result.returncode == 2, result.stderr
    assert not marker.exists()
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"raysim: error: data: cifar10: {path}: refuses to load: the file references "
        f"{PAYLOADS['os.system'][1]} (a pickle that could run code), not a CIFAR batch"
    ]
    assert "ray" not in result.stdout.lower()


def test_cli_names_a_truncated_cifar_batch(tmp_path: Path, cli_lines) -> None:
    root, _ = cifar10_root(tmp_path / "data")
    path = root / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(path.read_bytes()[:100])
    code, lines = cli_lines("launch", str(_cifar_config(tmp_path, root)), "--run-dir",
                            str(tmp_path / "run"), ray_address=None)
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        f"raysim: error: data: cifar10: {path}: not a CIFAR batch file (truncated or corrupted: "
    )


# An address nothing listens on: config errors must come before any cluster contact.
UNREACHABLE = "127.0.0.1:9"


@pytest.mark.parametrize(
    ("content", "byte", "offset"),
    [
        ("name: café\n".encode("latin-1"), 0xE9, 9),  # a latin-1 file
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", 0x89, 0),  # a binary file
    ],
    ids=["latin-1", "binary"],
)
def test_cli_non_utf8_config(tmp_path: Path, content: bytes, byte: int, offset: int,
                            cli_lines) -> None:
    config = tmp_path / "exp.yaml"
    config.write_bytes(content)
    assert cli_lines("launch", str(config), ray_address=UNREACHABLE) == (2, [
        f"raysim: error: {config}: not a UTF-8 text file (byte 0x{byte:02x} at offset "
        f"{offset}); save it as UTF-8"
    ])


def test_cli_yaml_syntax_error_is_one_line_with_position(tmp_path: Path, cli_lines) -> None:
    config = tmp_path / "exp.yaml"
    config.write_text("name: x\nrounds: 3\ndata: {dataset: digits\nmodel: {name: cnn}\n")
    assert cli_lines("launch", str(config), ray_address=UNREACHABLE) == (2, [
        f"raysim: error: {config}:4:6: not valid YAML: expected ',' or '}}', but got ':' "
        "(while parsing a flow mapping)"
    ])


# --- read_yaml messages ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rounds: [1,\n", "2:1: not valid YAML: expected the node content, but found "
                          "'<stream end>' (while parsing a flow node)"),
        ("a: b: c\n", "1:5: not valid YAML: mapping values are not allowed here"),
        ("a:\n\t- x\n", "2:1: not valid YAML: found character '\\t' that cannot start any token "
                        "(while scanning for the next token)"),
        ("name: 'open\n", "2:1: not valid YAML: found unexpected end of stream "
                          "(while scanning a quoted scalar)"),
        ("seed: 1\nname: a\x00b\n", "2:8: not valid YAML: unacceptable character #x0000 "
                                    "(special characters are not allowed)"),
    ],
)
def test_yaml_errors_are_one_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        read_yaml(path)
    assert str(caught.value) == f"{path}:{message}"


def test_non_utf8_base_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_bytes(b"rounds: 3\nname: \xff\n")
    (tmp_path / "exp.yaml").write_text("base: base.yaml\nseed: 1\n")
    with pytest.raises(ConfigError) as caught:
        read_yaml(tmp_path / "exp.yaml")
    assert str(caught.value) == (
        f"{tmp_path / 'base.yaml'}: not a UTF-8 text file (byte 0xff at offset 16); "
        "save it as UTF-8"
    )


def test_utf8_with_bom_and_non_ascii_text_still_reads(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_bytes("\ufeffname: café\nrounds: 2\n".encode())
    assert read_yaml(path) == {"name": "café", "rounds": 2}
