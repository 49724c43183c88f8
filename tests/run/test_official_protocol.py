"""`evaluation.protocol: official`, FedBCS's published protocol beside the default one: the
maximum test Dice over rounds, one-sided ASD, area-resized labels, nuclei trained on the whole
train list; each part checked by hand, and on a run."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from test_segmentation_data import _make_nuclei

from raysim.config import ConfigError, dump_config
from raysim.data.medical import _resize, label_resize_of, load_nuclei, nuclei_val_fraction
from raysim.nn.objectives import objective_of
from raysim.nn.segmentation import asd_per_image
from raysim.results.sinks import RunDirectory
from raysim.run import execute, prepare, select_best
from raysim.run.validate import config_from_dict, load_config
from raysim.task import dataset_request

ROOT = Path(__file__).resolve().parents[2]
NUCLEI = {"data": {"dataset": "nuclei", "root": "/data", "partition": {"kind": "domains",
                                                                       "num_clients": 4}},
          "model": {"name": "unet"}, "clients_per_round": 4}


def test_the_protocol_implies_what_the_user_left_unset(tmp_path):
    """The official protocol's data settings are computed from it, never written into the
    config: the resolved config keeps what the user wrote."""
    def implied(config) -> tuple[str, float]:
        request = dataset_request(config)
        return label_resize_of(request), nuclei_val_fraction(request)

    default = config_from_dict(NUCLEI)
    assert (default.data.params.label_resize, default.data.val_fraction) == (None, None)
    assert implied(default) == ("nearest", 0.2)
    official = config_from_dict({**NUCLEI, "evaluation": {"protocol": "official"}})
    assert (official.data.params.label_resize, official.data.val_fraction) == (None, None)
    assert implied(official) == ("area", 0.0)
    kept = config_from_dict({**NUCLEI, "evaluation": {"protocol": "official"},
                             "data": {**NUCLEI["data"], "val_fraction": 0.2,
                                      "label_resize": "nearest"}})
    assert implied(kept) == ("nearest", 0.2)
    # the resolved config is what the run directory keeps, and it loads back the same
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(official))
    assert load_config(path) == official


def test_protocol_mistakes_name_the_key():
    with pytest.raises(ConfigError, match="evaluation.protocol: official is FedBCS's "
                                          "segmentation protocol; dataset 'digits' is not"):
        config_from_dict({"evaluation": {"protocol": "official"}})
    with pytest.raises(ConfigError, match="evaluation.protocol: choose one of default, official"):
        config_from_dict({"evaluation": {"protocol": "paper"}})
    with pytest.raises(ConfigError, match="data.label_resize: choose nearest or area"):
        config_from_dict({**NUCLEI, "data": {**NUCLEI["data"], "label_resize": "bilinear"}})


def test_area_resized_labels_keep_only_wholly_foreground_pixels():
    y = np.array([[[1, 1, 0, 1], [1, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1]]], dtype=np.uint8)
    x = np.zeros((1, 3, 4, 4), dtype=np.uint8)
    _, area = _resize(x, y, 2, "area")
    # block means 1, 0.75, 0.25, 1, truncated as the official `.long()` casts
    assert area.tolist() == [[[1, 0], [0, 1]]]
    _, nearest = _resize(x, y, 2, "nearest")
    assert set(np.unique(nearest)) <= {0, 1} and nearest.shape == (1, 2, 2)


def test_nuclei_trains_on_the_whole_list_without_a_validation_split(tmp_path):
    _make_nuclei(tmp_path, {"TNBC": (10, 3), "KIRC": (6, 2)})
    whole = load_nuclei(tmp_path, val_fraction=0.0)
    assert whole.val is None and len(whole.train) == 16 and len(whole.test) == 5
    held = load_nuclei(tmp_path, val_fraction=0.2)
    assert len(held.train) + len(held.val) == 16


def test_official_metrics_take_asd_one_sided():
    g = torch.Generator().manual_seed(0)
    y = torch.zeros(2, 32, 32, dtype=torch.long)
    y[0, 4:20, 4:20] = 1
    y[1, 10:14, 3:30] = 1
    logits = torch.randn(2, 2, 32, 32, generator=g)
    logits[:, 1, 6:22, 6:22] += 4.0
    default = objective_of("segmentation").evaluate(logits, y)
    official = objective_of("segmentation", "official").evaluate(logits, y)
    pred = logits.argmax(1)
    assert official["asd"] == pytest.approx(asd_per_image(pred, y, symmetric=False).sum())
    assert default["asd"] == pytest.approx(asd_per_image(pred, y, symmetric=True).sum())
    assert official["asd"] != pytest.approx(default["asd"])
    assert official["dice"] == default["dice"] and official["hd95"] == default["hd95"]


def test_official_selection_is_the_maximum_test_value_over_rounds():
    rounds = [SimpleNamespace(round=r, metrics={"val_dice": v, "test_dice": t})
              for r, v, t in [(1, 0.5, 0.6), (2, 0.7, 0.5), (3, 0.6, 0.8)]]
    assert select_best(rounds, "dice") == {"selected_by": "val_dice", "round": 2,
                                           "val_dice": 0.7, "test_dice": 0.5}
    assert select_best(rounds, "dice", "official") == {"selected_by": "test_dice", "round": 3,
                                                       "test_dice": 0.8}


@pytest.mark.slow
def test_an_official_run_reports_its_best_test_round(tmp_path):
    config = load_config(ROOT / "yaml" / "synthetic_organ" / "fedavg.yaml", [
        "rounds=3", "logging.progress=false", "logging.curves=false", "train.lr=0.003",
        "data.sites=2", "data.partition.num_clients=2", "clients_per_round=2",
        "data.train_per_site=8", "data.val_per_site=4",
        "data.test_per_site=4", "data.image_size=32",
        "resources.backend=local", "evaluation.protocol=official"])
    summary = execute(prepare(config, tmp_path), [RunDirectory(tmp_path)])
    metrics = pd.read_parquet(tmp_path / "metrics.parquet")
    test = metrics[metrics["metric"] == "test_dice"].set_index("round")["value"]
    assert summary.protocol == "official"
    assert summary.best == {"selected_by": "test_dice", "round": int(test.idxmax()),
                               "test_dice": test.max()}
