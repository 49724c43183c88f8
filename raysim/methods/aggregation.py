"""Aggregation as pure functions: deterministic (client-id order, float64 accumulation)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from raysim.algorithm import Weights


def weighted_average(weights: Sequence[Weights], counts: Sequence[float]) -> Weights:
    """Σ_k n_k·w_k / Σ_k n_k per tensor, summed in the given order in float64 and cast back.

    Integer buffers (BatchNorm's `num_batches_tracked`) are rounded to the nearest integer.
    """
    if not weights:
        raise ValueError("cannot average zero updates")
    total = float(sum(counts))
    if total <= 0:
        raise ValueError("the updates hold no samples")
    out = {}
    for name, reference in weights[0].items():
        acc = torch.zeros(reference.shape, dtype=torch.float64)
        for w, n in zip(weights, counts):
            acc.add_(w[name].detach().to("cpu", torch.float64), alpha=float(n) / total)
        if reference.is_floating_point():
            out[name] = acc.to(reference.dtype)
        else:
            out[name] = acc.round().to(reference.dtype)
    return out
