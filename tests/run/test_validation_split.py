"""Validation splits for classification: held out of the training data, seeded, stratified,
and what the summary selects by (the test split never chooses anything)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import small_config

from raysim.config import ConfigError
from raysim.run import prepare, select_best


def test_val_fraction_holds_out_a_stratified_share_of_train(tmp_path) -> None:
    plain = prepare(small_config(), tmp_path / "a").task.dataset
    held = prepare(small_config(**{"data.val_fraction": 0.2}), tmp_path / "b").task.dataset
    other_seed = prepare(small_config(**{"data.val_fraction": 0.2, "seed": 9}),
                         tmp_path / "c").task.dataset
    assert plain.val is None
    assert len(held.train) + len(held.val) == len(plain.train) == 1347
    # per class, round(20 %) of that class's training samples
    for c in range(10):
        n_c = int((plain.train.y == c).sum())
        assert int((held.val.y == c).sum()) == round(0.2 * n_c)
    # the same samples, split: every training image is in exactly one of train and val
    rows = {r.tobytes() for r in plain.train.x}
    assert {r.tobytes() for r in held.train.x} | {r.tobytes() for r in held.val.x} == rows
    assert not {r.tobytes() for r in held.train.x} & {r.tobytes() for r in held.val.x}
    # the data seed, not the run seed: every run validates on the same samples
    np.testing.assert_array_equal(other_seed.val.x, held.val.x)
    np.testing.assert_array_equal(held.test.x, plain.test.x)  # test untouched


def test_domains_survive_the_split(tmp_path) -> None:
    dataset = prepare(small_config(**{"data.dataset": "digits_domains",
                                      "data.partition.kind": "domains",
                                      "data.val_fraction": 0.25}), tmp_path).task.dataset
    assert dataset.val.domain is not None and dataset.train.domain is not None
    assert set(np.unique(dataset.val.domain)) == set(np.unique(dataset.train.domain))


def test_a_run_reports_val_metrics_and_selects_by_them(tmp_path) -> None:
    from conftest import run_rounds

    config = small_config(**{"data.val_fraction": 0.2, "resources.backend": "local",
                             "rounds": 3})
    results, _, _ = run_rounds(config, tmp_path)
    assert all("val_accuracy" in r.metrics and "test_accuracy" in r.metrics for r in results)
    best = select_best(results, "accuracy")
    assert best["selected_by"] == "val_accuracy"
    chosen = max(results, key=lambda r: (r.metrics["val_accuracy"], -r.round))
    assert best["round"] == chosen.round
    assert best["test_accuracy"] == chosen.metrics["test_accuracy"]


@pytest.mark.parametrize(("overrides", "message"), [
    ({"data.val_fraction": 1.5}, "data.val_fraction: must be in [0, 1) (0: no validation split)"),
    ({"data.dataset": "synthetic_fedprox", "data.partition.kind": "natural",
      "model.name": "logreg", "data.val_fraction": 0.1},
     "data.val_fraction: synthetic_fedprox has no validation split: its test set is held-out "
     "data of its own clients"),
])
def test_bad_val_fraction_is_one_line(overrides, message) -> None:
    with pytest.raises(ConfigError) as error:
        small_config(**overrides)
    assert str(error.value) == message
