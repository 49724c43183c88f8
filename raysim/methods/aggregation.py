"""Aggregation as pure functions whose result does not depend on the order or grouping of the
updates: the sample-weighted sum Σ_k n_k·w_k is held exactly, so a worker may sum its own
clients and the server add the workers' sums, with any number of workers, and the mean is the
same bits as the server summing every client itself.

Exactness comes from fixed-point binning (reproducible summation, as in Demmel and Nguyen's
ReproBLAS): each float64 value n·w is split into pieces on a fixed grid of bins 32 bits apart,
and each bin adds its pieces without rounding (a bin's pieces are multiples of its unit and
small enough that 2^20 of them cannot overflow its 53 bits). Only the parts of a value below
2^-84 are dropped, the same for every value whatever it is summed with.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from raysim.types import Weights

BIN_BITS = 32  # bin j holds multiples of 2^(32·j − 52), from values below 2^(32·j − 21)
HEADROOM_BITS = 20  # a sum may take up to 2^20 values (clients) without rounding
LOWEST_BIN = -1  # parts below 2^(32·LOWEST_BIN − 52) = 2^-84 are dropped
MAX_VALUES = 2**HEADROOM_BITS
CHUNK_VALUES = 2**22  # float64 values stacked per vectorised pass of `add_many` (32 MiB)


def _same_layout(a: Weights, b: Weights) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype
                                        for k in a)


def _unit(j: int) -> float:
    return math.ldexp(1.0, BIN_BITS * j - 52)


def _top_bin(magnitude: float) -> int:
    """The lowest bin whose headroom holds values of this magnitude."""
    _, exponent = math.frexp(magnitude)  # magnitude < 2^exponent <= 2^(32·top − 21)
    return max(LOWEST_BIN, -(-(exponent + 1 + HEADROOM_BITS) // BIN_BITS))


def _split_into(bins: dict[int, np.ndarray], values: np.ndarray, top: int) -> None:
    """Add the values of `values` (float64, (k, ...): k values per element; overwritten) to
    `bins` as pieces on bins top..LOWEST_BIN; the pieces add up to each value rounded to the
    lowest bin's unit. A value's pieces do not depend on the others, and a bin's pieces add
    without rounding, so adding k values at once is adding them one by one. A value below
    a bin's range has no piece there: `top` may be any bin at or above the largest value's."""
    rest, piece = values, np.empty_like(values)
    for j in range(top, LOWEST_BIN - 1, -1):
        anchor = 1.5 * math.ldexp(1.0, BIN_BITS * j)  # rest + anchor rounds rest to bin j's unit
        np.add(rest, anchor, out=piece)
        np.subtract(piece, anchor, out=piece)
        if j > LOWEST_BIN:
            np.subtract(rest, piece, out=rest)
        # [0, ...]: an array of the element shape even for scalars (piece[0] gives a float)
        summed = (piece if len(piece) == 1 else piece.sum(axis=0, keepdims=True))[0, ...]
        if j in bins:
            np.add(bins[j], summed, out=bins[j])
        else:
            bins[j] = summed.copy()


class WeightSum:
    """Σ_k n_k·w_k over a set of updates, exactly, and Σ_k n_k. `add` one update, `merge`
    another sum (in any order, from any process); `mean()` gives the weighted average."""

    def __init__(self) -> None:
        self.bins: dict[str, dict[int, np.ndarray]] = {}  # float tensors: bin → sums
        self.integers: dict[str, np.ndarray] = {}  # integer buffers (exact in int64)
        self.dtypes: dict[str, torch.dtype] = {}
        self.samples = 0
        self.count = 0

    def add(self, weights: Weights, num_samples: int) -> WeightSum:
        return self.add_many([weights], [num_samples])

    def add_many(self, updates: Sequence[Weights], counts: Sequence[int]) -> WeightSum:
        """`add` each update with its sample count, the same sum exactly, in vectorised
        passes over chunks of updates with the same tensors (a client group's uploads)."""
        if self.count + len(updates) > MAX_VALUES:
            raise ValueError(f"a weight sum takes at most {MAX_VALUES} updates")
        start = 0
        while start < len(updates):
            end = start + 1
            first = updates[start]
            size = sum(t.numel() for t in first.values())
            while (end < len(updates) and (end - start + 1) * size <= CHUNK_VALUES
                   and _same_layout(updates[end], first)):
                end += 1
            self._add_stacked(updates[start:end], [int(n) for n in counts[start:end]])
            start = end
        return self

    def _add_stacked(self, updates: Sequence[Weights], counts: list[int]) -> None:
        n = np.array(counts, dtype=np.int64)
        for name, tensor in updates[0].items():
            self.dtypes.setdefault(name, tensor.dtype)
            arrays = [u[name].detach().cpu().numpy() for u in updates]
            shape = (len(arrays),) + (1,) * tensor.dim()
            if not tensor.is_floating_point():
                scaled = (np.stack(arrays).astype(np.int64) * n.reshape(shape)).sum(axis=0)
                total = self.integers.get(name)
                self.integers[name] = scaled if total is None else total + scaled
                continue
            values = np.stack(arrays).astype(np.float64)
            values *= n.reshape(shape)  # exact: a float32 times an integer below 2^29
            magnitude = max(float(values.max()), -float(values.min())) if values.size else 0.0
            if not math.isfinite(magnitude):
                raise ValueError(f"non-finite values in {name!r}")
            _split_into(self.bins.setdefault(name, {}), values, _top_bin(magnitude))
        self.samples += int(n.sum())
        self.count += len(updates)

    def merge(self, other: WeightSum) -> WeightSum:
        if self.count + other.count > MAX_VALUES:
            raise ValueError(f"a weight sum takes at most {MAX_VALUES} updates")
        for name, pieces in other.bins.items():
            self.dtypes.setdefault(name, other.dtypes[name])
            bins = self.bins.setdefault(name, {})
            for j, piece in pieces.items():
                bins[j] = piece.copy() if j not in bins else bins[j] + piece
        for name, total in other.integers.items():
            self.dtypes.setdefault(name, other.dtypes[name])
            mine = self.integers.get(name)
            self.integers[name] = total.copy() if mine is None else mine + total
        self.samples += other.samples
        self.count += other.count
        return self

    def total(self, name: str) -> np.ndarray:
        """Σ_k n_k·w_k of the floating tensor `name`, exactly as held, as float64."""
        return _total(self.bins[name])

    def mean(self) -> Weights:
        """Σ n_k·w_k / Σ n_k, cast back to each tensor's dtype (integer buffers, such as
        BatchNorm's `num_batches_tracked`, rounded to the nearest integer)."""
        if self.count == 0:
            raise ValueError("cannot average zero updates")
        if self.samples <= 0:
            raise ValueError("the updates hold no samples")
        out = {}
        for name, dtype in self.dtypes.items():  # in the order of the first update's tensors
            if name in self.integers:
                mean = np.round(self.integers[name] / self.samples)
            else:
                mean = _total(self.bins[name]) / self.samples
            out[name] = torch.from_numpy(np.asarray(mean)).to(dtype)
        return out


def _total(bins: dict[int, np.ndarray]) -> np.ndarray:
    """The exact sum the bins hold, as float64. The bins are first brought to one canonical
    form (carries go up, each lower bin keeps its remainder in [0, unit of the bin above)), so
    the result depends on that sum alone, not on how it was split into bins."""
    levels = sorted(bins)
    digits = {j: bins[j].copy() for j in levels}
    for low, high in zip(levels[:-1], levels[1:]):  # bins are contiguous: high == low + 1
        unit = _unit(high)
        carry = np.floor(digits[low] / unit) * unit
        digits[low] -= carry
        digits[high] += carry
    total = digits[levels[-1]]
    for j in reversed(levels[:-1]):
        total = total + digits[j]
    return total


def weighted_average(weights: Sequence[Weights], counts: Sequence[float]) -> Weights:
    """Σ_k n_k·w_k / Σ_k n_k per tensor, exact and order-independent (see `WeightSum`)."""
    if not weights:
        raise ValueError("cannot average zero updates")
    return WeightSum().add_many(weights, counts).mean()


def mean(weights: Sequence[Weights]) -> Weights:
    """(1/K) Σ_k w_k per tensor, the unweighted mean (every update counts once, whatever its
    sample count), exact and order-independent like `weighted_average`."""
    return weighted_average(weights, [1] * len(weights))
