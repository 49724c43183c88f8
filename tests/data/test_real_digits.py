"""The Digits benchmark from real files: USPS (LIBSVM, checked against torchvision's own
reader), SynthDigits (SVHN's .mat form and Digit-Five's), MNIST-M (PNG folders and label lists)
and `data.dataset: domains` built from them, each from small files in the real format that
this test writes."""

from __future__ import annotations

import bz2
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import metrics_of
from PIL import Image
from scipy.io import savemat
from test_datasets import _idx_images, _idx_labels, _write_idx

from raysim.cli.main import main
from raysim.config import ConfigError
from raysim.data.datasets import DatasetNotFoundError
from raysim.data.digit_sets import load_mnist_m, load_synth_digits, read_usps
from raysim.data.multi_domain import to_shape
from raysim.run import build_checked_task
from raysim.run.validate import config_from_dict, load_config
from raysim.task import dataset_request

ROOT = Path(__file__).resolve().parents[2]


def write_usps(path: Path, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    values = rng.uniform(-1, 1, size=(n, 256)).round(6)
    labels = np.arange(n) % 10 + 1
    lines = [f"{label} " + " ".join(f"{j + 1}:{v:.6f}" for j, v in enumerate(row))
             for label, row in zip(labels, values)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with bz2.open(path, "wt") as f:
        f.write("\n".join(lines) + "\n")
    return values, labels


def test_usps_reads_as_torchvision_reads_it(tmp_path):
    from torchvision.datasets import USPS

    write_usps(tmp_path / "usps.bz2", 12, 0)
    ours = read_usps(tmp_path / "usps.bz2")
    reference = USPS(str(tmp_path), train=True)
    assert ours.x.shape == (12, 1, 16, 16) and ours.x.dtype == np.uint8
    np.testing.assert_array_equal(ours.x[:, 0], reference.data)
    assert ours.y.tolist() == list(reference.targets)


def test_synth_digits_in_both_distributed_forms(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(32, 32, 3, 5), dtype=np.uint8)
    svhn_form = tmp_path / "svhn_form"
    svhn_form.mkdir()
    savemat(str(svhn_form / "synth_train_32x32.mat"), {"X": x, "y": [[10], [1], [2], [3], [9]]})
    savemat(str(svhn_form / "synth_test_32x32.mat"), {"X": x[..., :2], "y": [[4], [10]]})
    train, test = load_synth_digits(svhn_form)
    np.testing.assert_array_equal(train.x, x.transpose(3, 2, 0, 1))
    assert train.y.tolist() == [0, 1, 2, 3, 9] and test.y.tolist() == [4, 0]
    five = tmp_path / "digit_five"
    five.mkdir()
    nhwc = x.transpose(3, 0, 1, 2)
    savemat(str(five / "syn_number.mat"), {"train_data": nhwc, "train_label": [[0], [1], [2],
                                           [3], [4]], "test_data": nhwc[:1], "test_label": [[7]]})
    train, test = load_synth_digits(five)
    np.testing.assert_array_equal(train.x, x.transpose(3, 2, 0, 1))
    assert train.y.tolist() == [0, 1, 2, 3, 4] and test.y.tolist() == [7]


def write_mnist_m(root: Path, n: int) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(2)
    written = {}
    for part in ("mnist_m_train", "mnist_m_test"):
        folder = root / "mnist_m" / part
        folder.mkdir(parents=True)
        lines, images = [], []
        for i in range(n):
            image = rng.integers(0, 256, size=(28, 28, 3), dtype=np.uint8)
            Image.fromarray(image).save(folder / f"{i:08d}.png")
            lines.append(f"{i:08d}.png {i % 10}")
            images.append(image)
        (root / "mnist_m" / f"{part}_labels.txt").write_text("\n".join(lines) + "\n")
        written[part] = images
    return written


def test_mnist_m_reads_the_extracted_archive(tmp_path):
    written = write_mnist_m(tmp_path, 4)
    train, test = load_mnist_m(tmp_path)
    assert train.x.shape == (4, 3, 28, 28) and train.y.tolist() == [0, 1, 2, 3]
    np.testing.assert_array_equal(test.x[2], written["mnist_m_test"][2].transpose(2, 0, 1))


def test_images_are_brought_to_one_shape():
    gray = np.arange(16, dtype=np.uint8).reshape(1, 1, 4, 4) * 16
    rgb = to_shape(gray, (3, 4, 4))
    assert rgb.shape == (1, 3, 4, 4) and all(np.array_equal(rgb[0, c], gray[0, 0])
                                             for c in range(3))
    back = to_shape(rgb, (1, 4, 4))
    np.testing.assert_array_equal(back, gray)  # the luminance weights sum to 1
    up = to_shape(gray, (1, 8, 8))
    assert up.shape == (1, 1, 8, 8) and up.dtype == np.uint8


def write_digit_files(root: Path) -> dict[str, Path]:
    """Tiny MNIST (idx), USPS (LIBSVM), SVHN (.mat), SynthDigits (.mat) and MNIST-M (PNGs)."""
    rng = np.random.default_rng(4)
    roots = {name: root / name for name in ("mnist", "usps", "svhn", "syn", "mnist_m")}
    images = rng.integers(0, 256, size=(40, 28, 28), dtype=np.uint8)
    labels = np.arange(40) % 10
    _write_idx(roots["mnist"] / "MNIST" / "raw", {
        "train-images-idx3-ubyte": _idx_images(images[:30]),
        "train-labels-idx1-ubyte": _idx_labels(labels[:30]),
        "t10k-images-idx3-ubyte": _idx_images(images[30:]),
        "t10k-labels-idx1-ubyte": _idx_labels(labels[30:])}, gz=False)
    write_usps(roots["usps"] / "usps.bz2", 30, 5)
    write_usps(roots["usps"] / "usps.t.bz2", 10, 6)
    x = rng.integers(0, 256, size=(32, 32, 3, 40), dtype=np.uint8)
    y = (np.arange(40) % 10)[:, None]
    roots["svhn"].mkdir()
    savemat(str(roots["svhn"] / "train_32x32.mat"), {"X": x[..., :30], "y": np.where(
        y[:30] == 0, 10, y[:30])})
    savemat(str(roots["svhn"] / "test_32x32.mat"), {"X": x[..., 30:], "y": np.where(
        y[30:] == 0, 10, y[30:])})
    roots["syn"].mkdir()
    savemat(str(roots["syn"] / "synth_train_32x32.mat"), {"X": x[..., :30], "y": y[:30]})
    savemat(str(roots["syn"] / "synth_test_32x32.mat"), {"X": x[..., 30:], "y": y[30:]})
    write_mnist_m(roots["mnist_m"], 20)
    return roots


def domains_config(roots: dict[str, Path], tmp: Path, shape=(3, 32, 32), **data) -> Path:
    datasets = {"mnist": "mnist", "usps": "usps", "svhn": "svhn", "syn": "synth_digits",
                "mnist_m": "mnist_m"}
    spec = {"name": "digits_real_tiny", "rounds": 2, "clients_per_round": 5,
            "data": {"dataset": "domains", "domain_shape": list(shape) if shape else None,
                     "domains": [{"name": n, "dataset": d, "root": str(roots[n])}
                                 for n, d in datasets.items()],
                     "partition": {"kind": "domains", "num_clients": 5}, **data},
            "train": {"local_epochs": 1, "batch_size": 8},
            "resources": {"backend": "local"}, "logging": {"progress": False}}
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_domains_from_five_datasets(tmp_path):
    roots = write_digit_files(tmp_path / "data")
    task = build_checked_task(load_config(domains_config(roots, tmp_path, **{
        "val_fraction": 0.2, "test_domains": ["mnist_m"]})))
    ds = task.dataset
    assert ds.spec.domains == ("mnist", "usps", "svhn", "syn", "mnist_m")
    assert ds.spec.input_shape == (3, 32, 32) and ds.train.x.dtype == np.uint8
    sizes = {d: int((ds.train.domain == i).sum() + (ds.val.domain == i).sum())
             for i, d in enumerate(ds.spec.domains)}
    assert sizes == {"mnist": 30, "usps": 30, "svhn": 30, "syn": 30, "mnist_m": 0}
    assert len(ds.unseen.y) == 20 and set(ds.unseen.domain) == {4}
    # every client holds one training domain
    owners = [set(ds.train.domain[task.partition.client_indices[k]]) for k in range(5)]
    assert all(len(o) == 1 for o in owners) and set().union(*owners) == {0, 1, 2, 3}
    # SVHN's images are its files' (no resize needed), MNIST's gray repeated over channels
    svhn = ds.test.x[ds.test.domain == 2]
    assert svhn.shape == (10, 3, 32, 32)


def test_domain_mistakes_are_named(tmp_path):
    roots = write_digit_files(tmp_path / "data")
    with pytest.raises(ConfigError, match=r"the domains' images differ \(1×28×28 \(mnist\), "
                                          r"1×16×16 \(usps\), 3×32×32 \(svhn\)"):
        build_checked_task(load_config(domains_config(roots, tmp_path, shape=None)))
    (roots["usps"] / "usps.t.bz2").unlink()
    with pytest.raises(ConfigError, match=r"data.domains\[1\] \(usps\): dataset 'usps' not "
                                          r"found: expected .*usps.bz2, usps.t.bz2\), missing "
                                          r"usps.t.bz2 \(it holds usps.bz2\)"):
        build_checked_task(load_config(domains_config(roots, tmp_path)))
    base = {"clients_per_round": 2, "data": {"dataset": "domains", "partition": {
        "kind": "domains", "num_clients": 2}}}
    with pytest.raises(ConfigError, match="data.domains: list the domains"):
        config_from_dict(base)
    with pytest.raises(ConfigError, match="two domains are named 'a'"):
        config_from_dict({**base, "data": {**base["data"], "domains": [
            {"name": "a", "dataset": "mnist"}, {"name": "a", "dataset": "usps"}]}})
    with pytest.raises(ConfigError, match=r"data.domains\[0\].dataset: synthetic_organ is not "
                                          "a classification dataset"):
        config_from_dict({**base, "data": {**base["data"], "domains": [
            {"name": "a", "dataset": "synthetic_organ"}]}})
    with pytest.raises(ConfigError, match="unknown key 'data.domains' for dataset 'digits'"):
        config_from_dict({"data": {"domains": [{"name": "a", "dataset": "mnist"}]}})
    with pytest.raises(ConfigError, match=r"unknown key 'data.domains\[0\].sites' for dataset "
                                          "'mnist'"):
        config_from_dict({**base, "data": {**base["data"], "domains": [
            {"name": "a", "dataset": "mnist", "sites": 2}]}})


def test_a_root_of_another_layout_says_what_it_holds(tmp_path):
    from raysim.data.digit_sets import mnist_m, synth_digits

    (tmp_path / "svhn_files").mkdir()
    (tmp_path / "svhn_files" / "train_32x32.mat").write_bytes(b"")
    config = config_from_dict({"data": {"dataset": "synth_digits",
                                        "root": str(tmp_path / "svhn_files")}})
    with pytest.raises(DatasetNotFoundError, match="expected synth_train_32x32.mat .* it holds "
                                        "train_32x32.mat"):
        synth_digits.check(dataset_request(config))
    (tmp_path / "empty").mkdir()
    empty = config_from_dict({"data": {"dataset": "mnist_m", "root": str(tmp_path / "empty")}})
    with pytest.raises(DatasetNotFoundError, match="missing mnist_m_train, .* it is empty"):
        mnist_m.check(dataset_request(empty))


def test_ready_real_digits_configs_load():
    for path in sorted((ROOT / "yaml" / "digits_real").glob("*.yaml")):
        config = load_config(path)
        assert [d.name for d in config.data.params.domains] == ["mnist", "usps", "svhn", "syn"]
        assert config.data.params.domain_shape == (3, 32, 32)


@pytest.mark.slow
def test_a_run_on_real_digit_domains(tmp_path):
    roots = write_digit_files(tmp_path / "data")
    run_dir = tmp_path / "run"
    assert main(["launch", str(domains_config(roots, tmp_path)), "--run-dir", str(run_dir),
                 "--quiet", "-o", "algorithm.name=fedproto"]) == 0
    final = {k: v for (r, k), v in metrics_of(run_dir).items() if r == 2}
    parts = [final[f"test_accuracy/{d}"] for d in ("mnist", "usps", "svhn", "syn", "mnist_m")]
    assert final["test_accuracy"] == pytest.approx(np.mean(parts))
    assert (run_dir / "partition.png").stat().st_size > 0
