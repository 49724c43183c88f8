from __future__ import annotations

import pytest
import torch

from raysim.algorithm import ClientUpdate
from raysim.engine.server import average_client_metrics
from raysim.methods.diagnostics import (
    anchor_alignment,
    anchor_self_accuracy,
    interclass_cosine,
    server_diagnostics,
)

ANCHORS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])


def test_anchor_alignment_uses_held_classes_with_anchors_only():
    local = torch.tensor([[2.0, 0.0], [1.0, 1.0], [5.0, 5.0]])
    counts = torch.tensor([3, 4, 0])  # class 2 not held
    defined = torch.tensor([True, True, True])
    # cos(class 0) = 1, cos(class 1) = 1/√2
    expected = (1 + 2 ** -0.5) / 2
    assert anchor_alignment(local, counts, ANCHORS, defined) == pytest.approx(expected)
    assert anchor_alignment(local, counts, ANCHORS, torch.tensor([True, False, False])) == 1.0
    assert anchor_alignment(local, torch.tensor([0, 0, 0]), ANCHORS, defined) is None


def test_anchor_self_accuracy_and_interclass_cosine():
    weight, bias = torch.eye(2), torch.zeros(2)
    anchors = torch.tensor([[1.0, 0.0], [2.0, 1.0]])  # the second is classified as class 0
    defined = torch.tensor([True, True])
    assert anchor_self_accuracy(anchors, defined, weight, bias) == 0.5
    assert interclass_cosine(ANCHORS[:2], torch.tensor([True, True])) == pytest.approx(0.0)
    assert interclass_cosine(ANCHORS, torch.tensor([True, False, True])) == pytest.approx(
        2 ** -0.5)
    assert interclass_cosine(ANCHORS, torch.tensor([True, False, False])) is None
    metrics = server_diagnostics(anchors, defined, (weight, bias))
    assert metrics["anchor_self_accuracy"] == 0.5
    assert "anchor_interclass_cosine" in metrics


def test_client_metrics_average_over_the_clients_that_report_them():
    a = ClientUpdate({}, 1, {"loss": 1.0, "anchor_cosine": 0.5})
    b = ClientUpdate({}, 3, {"loss": 3.0})
    assert average_client_metrics([a, b]) == {"loss": 2.5, "anchor_cosine": 0.5}
