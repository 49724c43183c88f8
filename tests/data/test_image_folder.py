"""Image-folder domains (`root/<domain>/<class>/*.png|jpg`) from files this test writes, domains
held out of training (`data.test_domains`) and reported apart, and the layout mistakes that
stop a run before Ray with one line naming the file or folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import metrics_of
from PIL import Image

from raysim.cli.main import main
from raysim.config import ConfigError
from raysim.data.image_folder import CACHE_DIR, load_image_folder
from raysim.run import build_checked_task
from raysim.run.validate import load_config

DOMAINS = {"photo": (200, 60, 60), "sketch": (230, 230, 230), "cartoon": (40, 160, 40)}
CLASSES = ("dog", "house", "tree")


def picture(domain: str, label: int, i: int, size: int = 20) -> np.ndarray:
    """A domain's colour as background, the class as a bright bar (row, column or diagonal)."""
    rng = np.random.default_rng([label, i, len(domain)])
    image = np.empty((size, size, 3), np.uint8)
    image[:] = DOMAINS[domain]
    image = np.clip(image + rng.integers(-20, 20, image.shape), 0, 255).astype(np.uint8)
    where = np.zeros((size, size), bool)
    if label == 0:
        where[size // 2 - 2:size // 2 + 2] = True
    elif label == 1:
        where[:, size // 2 - 2:size // 2 + 2] = True
    else:
        where[np.abs(np.subtract.outer(np.arange(size), np.arange(size))) < 3] = True
    image[where] = 255 - image[where]
    return image


def write_folder(root: Path, per_class: int = 6, domains=tuple(DOMAINS)) -> Path:
    for domain in domains:
        for label, name in enumerate(CLASSES):
            folder = root / domain / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                suffix = ".jpg" if (i + label) % 2 else ".png"
                Image.fromarray(picture(domain, label, i)).save(folder / f"{i:03d}{suffix}")
    return root


def config_for(root: Path, tmp: Path, **keys) -> Path:
    spec = {"name": "folders", "rounds": 2, "clients_per_round": 4,
            "data": {"dataset": "image_folder", "root": str(root), "image_size": 16,
                     "partition": {"kind": "domains", "num_clients": 4}},
            "train": {"local_epochs": 1, "batch_size": 8},
            "resources": {"backend": "local"}, "logging": {"progress": False}, **keys}
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_domains_classes_split_and_decoding(tmp_path):
    root = write_folder(tmp_path / "data")
    ds = load_image_folder(root, image_size=20, test_fraction=0.5)
    assert ds.spec.domains == ("cartoon", "photo", "sketch")  # sorted folder names
    assert ds.spec.num_classes == 3 and ds.spec.input_shape == (3, 20, 20)
    assert len(ds.train.y) + len(ds.test.y) == 3 * 3 * 6
    for split in (ds.train, ds.test):  # every domain and class on both sides, half and half
        for d in range(3):
            assert np.bincount(split.y[split.domain == d], minlength=3).tolist() == [3, 3, 3]
    # the PNGs decode to exactly what was written (at their own size)
    png = [(d, i) for d, name in enumerate(ds.spec.domains) for i in range(6) if i % 2 == 0]
    d, i = png[0]
    expected = picture(ds.spec.domains[d], 0, i).transpose(2, 0, 1)
    assert any(np.array_equal(x, expected) for x in ds.train.x[ds.train.domain == d]) or \
        any(np.array_equal(x, expected) for x in ds.test.x[ds.test.domain == d])
    # same seed, same split
    again = load_image_folder(root, image_size=20, test_fraction=0.5)
    assert np.array_equal(again.train.y, ds.train.y) and np.array_equal(again.test.x, ds.test.x)


def test_decoded_arrays_are_cached_and_a_changed_file_is_decoded_again(tmp_path):
    root = write_folder(tmp_path / "data", per_class=2)
    first = load_image_folder(root, image_size=16)
    (cache,) = (root / CACHE_DIR).glob("image_folder-16-*.npz")
    assert cache.stat().st_size > 0
    assert np.array_equal(load_image_folder(root, image_size=16).train.x, first.train.x)
    target = root / "photo" / "dog" / "000.png"
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(target)
    changed = load_image_folder(root, image_size=16)
    assert len(list((root / CACHE_DIR).glob("image_folder-16-*.npz"))) == 2
    assert not np.array_equal(np.concatenate([changed.train.x, changed.test.x]),
                              np.concatenate([first.train.x, first.test.x]))


def test_the_datasets_own_split_files_are_used(tmp_path):
    root = write_folder(tmp_path / "data", per_class=4)
    for domain in DOMAINS:
        for part, keep in (("train", (0, 1, 2)), ("test", (3,))):
            lines = [f"{domain}/{name}/{i:03d}{'.jpg' if (i + label) % 2 else '.png'} {label}"
                     for label, name in enumerate(CLASSES) for i in keep]
            (root / f"{domain}_{part}.txt").write_text("\n".join(lines) + "\n")
    ds = load_image_folder(root, image_size=16)
    assert len(ds.train.y) == 3 * 3 * 3 and len(ds.test.y) == 3 * 3


def layout_error(config: Path, capsys) -> str:
    assert main(["launch", str(config), "--run-dir", str(config.parent / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("raysim: error: "), err
    return err[0]


def test_layout_mistakes_are_one_line_before_ray(tmp_path, capsys):
    root = write_folder(tmp_path / "data", per_class=2)
    config = config_for(root, tmp_path)
    # a class missing in one domain names the class and both domains
    for image in (root / "sketch" / "tree").iterdir():
        image.unlink()
    (root / "sketch" / "tree").rmdir()
    error = layout_error(config, capsys)
    assert "class 'tree' is in domain 'cartoon'" in error and "not in domain 'sketch'" in error
    (root / "sketch" / "tree").mkdir()
    Image.fromarray(picture("sketch", 2, 0)).save(root / "sketch" / "tree" / "000.png")
    # an image that cannot be decoded is named
    bad = root / "photo" / "house" / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    assert f"cannot decode image {bad}" in layout_error(config, capsys)
    bad.unlink()
    # a root of another layout says what it found
    flat = tmp_path / "flat"
    (flat / "dog").mkdir(parents=True)
    Image.fromarray(picture("photo", 0, 0)).save(flat / "dog" / "0.png")
    error = layout_error(config_for(flat, tmp_path), capsys)
    assert f"{flat / 'dog'} has images directly in it (0.png)" in error
    assert "root/<domain>/<class>/<image>.jpg" in error
    assert "is not a folder" in layout_error(config_for(tmp_path / "none", tmp_path), capsys)
    assert not (tmp_path / "run").exists()


def test_held_out_domain_mistakes_name_the_key(tmp_path):
    root = write_folder(tmp_path / "data", per_class=2)
    with pytest.raises(ConfigError, match="data.test_domains: 'clipart' is not a domain of "
                                          "image_folder; its domains: cartoon, photo, sketch"):
        build_checked_task(load_config(config_for(root, tmp_path),
                                       ["data.test_domains=[clipart]"]))
    with pytest.raises(ConfigError, match="data.test_domains: 'sketch' is also a training "
                                          "domain"):
        build_checked_task(load_config(config_for(root, tmp_path), [
            "data.test_domains=[sketch]", "data.train_domains=[photo,sketch]"]))
    with pytest.raises(ConfigError, match="every domain is held out"):
        build_checked_task(load_config(config_for(root, tmp_path), [
            "data.test_domains=[sketch,photo,cartoon]"]))
    with pytest.raises(ConfigError, match="dataset 'digits' has no domains to hold out"):
        build_checked_task(load_config(None, ["data.test_domains=[mnist]"]))


def test_a_held_out_domain_never_trains_and_is_reported_apart(tmp_path):
    root = write_folder(tmp_path / "data", per_class=4)
    task = build_checked_task(load_config(config_for(root, tmp_path),
                                          ["data.test_domains=[sketch]"]))
    names = task.dataset.spec.domains
    sketch = names.index("sketch")
    assert sketch not in set(task.dataset.train.domain) | set(task.dataset.test.domain)
    assert set(task.dataset.unseen.domain) == {sketch} and len(task.dataset.unseen.y) == 3 * 1
    owners = task.dataset.train.domain[np.concatenate(
        [task.partition.client_indices[k] for k in range(4)])]
    assert set(owners) == {names.index("cartoon"), names.index("photo")}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fedavg", "fedproto", "fedhpro"])
def test_methods_run_on_image_folders_with_an_unseen_domain(tmp_path, method):
    root = write_folder(tmp_path / "data", per_class=8)
    extra = {"hp_steps": 2, "meta_steps": 2, "crt_epochs": 2, "batch_real": 4} \
        if method == "fedhpro" else {}
    config = config_for(root, tmp_path, algorithm={"name": method, **extra})
    run_dir = tmp_path / "run"
    assert main(["launch", str(config), "-o", "data.test_domains=[sketch]", "--run-dir",
                 str(run_dir), "--quiet"]) == 0
    metrics = metrics_of(run_dir)
    final = {k: v for (r, k), v in metrics.items() if r == 2}
    assert set(k for k in final if k.startswith("test_accuracy")) == {
        "test_accuracy", "test_accuracy/cartoon", "test_accuracy/photo",
        "test_accuracy/unseen", "test_accuracy/unseen/sketch"}
    assert final["test_accuracy"] == pytest.approx(
        (final["test_accuracy/cartoon"] + final["test_accuracy/photo"]) / 2)
    assert final["test_accuracy/unseen"] == final["test_accuracy/unseen/sketch"]
    assert 0.0 <= final["test_accuracy/unseen"] <= 1.0


@pytest.mark.slow
def test_an_unseen_domain_gives_the_same_metrics_on_ray_and_locally(ray_session, tmp_path):
    runs = {}
    for backend in ("ray", "local"):
        run_dir = tmp_path / backend
        assert main(["launch", "yaml/settings/digits_domains.yaml", "-o", "rounds=2",
                     "-o", "data.test_domains=[svhn]", "-o", "clients_per_round=4",
                     "-o", "train.local_epochs=1", "-o", f"resources.backend={backend}",
                     "-o", "resources.num_workers=1",
                     "--run-dir", str(run_dir), "--quiet"]) == 0
        runs[backend] = metrics_of(run_dir)
    assert runs["ray"] == runs["local"]
    assert (2, "test_accuracy/unseen/svhn") in runs["ray"]
    assert (2, "test_accuracy/svhn") not in runs["ray"]
