"""Synthetic(α, β): the synthetic federated dataset of the FedProx paper (Li et al., MLSys
2020), as LEAF generates it, with any number of clients.

Per client k (60 features, 10 classes):

    u_k ~ N(0, α²),  B_k ~ N(0, β²)                       (α, β are standard deviations, as
    W_k ∈ R^{60×10}, b_k ∈ R^10 with entries ~ N(u_k, 1)    in the paper's code)
    v_k ∈ R^60 with entries ~ N(B_k, 1)
    x ~ N(v_k, Σ),  Σ diagonal, Σ_jj = j^-1.2 (j = 1..60)
    y = argmax softmax(W_k x + b_k)

α controls how much the clients' optimal models differ, β how much their inputs do. With
`iid: true` every client shares one W, b ~ N(0, 1) and v = 0 (the paper's IID variant).
Client sizes follow the paper's lognormal: n_k = ⌊LogNormal(4, 2)⌋ + 50.

Nothing is generated up front. A client's parameters and samples come from its own seeded
stream (dataset seed, client id), so client k is the same whoever generates it and however
many clients there are: a million registered clients cost their sizes (8 bytes each) until
they are sampled, and a worker generates a sampled client's data when it trains. The test set
is held-out data of `test_clients` clients spread evenly over the ids, drawn from a stream of
their own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from raysim.config import ConfigError, require
from raysim.data.datasets import (
    MAX_GENERATED_BYTES,
    ArraySplit,
    Dataset,
    DatasetRequest,
    DatasetSpec,
    format_bytes,
    require_generated_fits,
)
from raysim.seeding import numpy_generators

FEATURES, CLASSES = 60, 10
# stream tags: sizes, per-client parameters, train samples, test samples, the IID model
_SIZES, _CLIENT, _TRAIN, _TEST, _SHARED = 0x51, 0x52, 0x53, 0x54, 0x55
_STD = np.power(np.arange(1, FEATURES + 1, dtype=np.float64), -1.2) ** 0.5  # √Σ_jj

SPEC = DatasetSpec(name="synthetic_fedprox", num_classes=CLASSES, input_shape=(1, 1, FEATURES),
                   mean=(0.0,), std=(1.0,), scale=1.0, augment=None)


@dataclass(frozen=True)
class ClientModel:
    """What defines client k's distribution: its labelling model and its input mean."""

    weight: np.ndarray  # W_k (60, 10)
    bias: np.ndarray  # b_k (10,)
    input_mean: np.ndarray  # v_k (60,)


@dataclass(frozen=True)
class FedProxClients:
    """The clients of one Synthetic(α, β) dataset; `client(k)` generates client k's samples."""

    alpha: float
    beta: float
    iid: bool
    seed: int
    sizes: np.ndarray  # (num_clients,) int64

    @classmethod
    def build(cls, num_clients: int, alpha: float, beta: float, iid: bool = False,
              seed: int = 0, size_mu: float = 4.0, size_sigma: float = 2.0,
              size_min: int = 50) -> FedProxClients:
        draws = draw_sizes(num_clients, seed, size_mu, size_sigma)
        largest = float(draws.max()) + size_min
        if not largest <= MAX_CLIENT_SAMPLES:  # inf or nan would cast to a negative size
            raise ValueError(f"a client of {largest:.3g} samples (size_mu {size_mu}, "
                             f"size_sigma {size_sigma}): at most {MAX_CLIENT_SAMPLES:,}")
        return cls(alpha, beta, iid, seed, draws.astype(np.int64) + size_min)

    @property
    def num_clients(self) -> int:
        return len(self.sizes)

    def model(self, k: int, rng: np.random.Generator | None = None) -> ClientModel:
        """Client k's labelling model (W_k, b_k) and input mean v_k (`rng`: its stream,
        seeded ahead)."""
        if self.iid:
            shared = np.random.default_rng([self.seed, _SHARED])
            weight = shared.normal(0.0, 1.0, (FEATURES, CLASSES))
            bias = shared.normal(0.0, 1.0, CLASSES)
            return ClientModel(weight, bias, np.zeros(FEATURES))
        rng = rng or np.random.default_rng([self.seed, _CLIENT, int(k)])
        u = rng.normal(0.0, self.alpha)
        b_mean = rng.normal(0.0, self.beta)
        input_mean = rng.normal(b_mean, 1.0, FEATURES)
        weight = rng.normal(u, 1.0, (FEATURES, CLASSES))
        bias = rng.normal(u, 1.0, CLASSES)
        return ClientModel(weight, bias, input_mean)

    def samples(self, k: int, n: int, stream: int = _TRAIN,
                rngs: tuple[np.random.Generator, np.random.Generator] | None = None,
                ) -> tuple[np.ndarray, np.ndarray]:
        """n samples of client k's distribution: x (n, 1, 1, 60) float32, y (n,) int64
        (`rngs`: the streams of its model and of these samples, seeded ahead)."""
        model_rng, rng = rngs or (None, np.random.default_rng([self.seed, stream, int(k)]))
        model = self.model(k, model_rng)
        x = rng.standard_normal((n, FEATURES))
        x *= _STD  # in place: the same values as v_k + z·√Σ
        x += model.input_mean
        y = np.argmax(x @ model.weight + model.bias, axis=1)
        return x.astype(np.float32).reshape(n, 1, 1, FEATURES), y.astype(np.int64)

    def client(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Client k's training samples."""
        return self.samples(k, int(self.sizes[k]))

    def many(self, ids: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        """`client(k)` for each of `ids`, their streams seeded at once (a worker's group)."""
        ids = [int(k) for k in ids]
        models = numpy_generators([[self.seed, _CLIENT, k] for k in ids]) if not self.iid \
            else [None] * len(ids)
        streams = numpy_generators([[self.seed, _TRAIN, k] for k in ids])
        return [self.samples(k, int(self.sizes[k]), rngs=(m, s))
                for k, m, s in zip(ids, models, streams, strict=True)]

    def test_split(self, test_clients: int, per_client: int) -> ArraySplit:
        """Held-out samples of `test_clients` clients spread evenly over the ids."""
        ids = np.unique(np.linspace(0, self.num_clients - 1, min(test_clients,
                                                                 self.num_clients)).round())
        parts = [self.samples(int(k), per_client, _TEST) for k in ids]
        return ArraySplit(np.concatenate([x for x, _ in parts]),
                          np.concatenate([y for _, y in parts]))


def draw_sizes(num_clients: int, seed: int, size_mu: float, size_sigma: float) -> np.ndarray:
    """The clients' LogNormal(size_mu, size_sigma) draws (float64, before ⌊·⌋ + size_min),
    in one sequence: client k's size does not depend on how many follow it."""
    return np.random.default_rng([seed, _SIZES]).lognormal(size_mu, size_sigma, num_clients)


# What generating costs, per client registered (its LogNormal draw and its size, the offsets
# of the partition) and per sample (60 features as float64 while generated).
BYTES_PER_CLIENT, BYTES_PER_SAMPLE = 24, FEATURES * 8
MAX_CLIENT_SAMPLES = MAX_GENERATED_BYTES // BYTES_PER_SAMPLE


def check_sizes(num_clients: int, own: FedProxSyntheticConfig) -> None:
    """ConfigError naming the key, before anything is generated, when the registered clients,
    the test set or the largest client would not fit in memory."""
    require_generated_fits("data.partition.num_clients", num_clients, BYTES_PER_CLIENT,
                           "clients × 24 bytes (each one's size, drawn up front)")
    test_clients = min(own.test_clients, num_clients)
    if own.test_per_client >= test_clients:
        require_generated_fits("data.test_per_client", own.test_per_client,
                               test_clients * BYTES_PER_SAMPLE,
                               f"samples × {test_clients} test clients × {FEATURES} features")
    else:
        require_generated_fits("data.test_clients", test_clients,
                               own.test_per_client * BYTES_PER_SAMPLE,
                               f"test clients × {own.test_per_client} samples × {FEATURES} "
                               "features")
    require_generated_fits("data.size_min", own.size_min, BYTES_PER_SAMPLE,
                           f"samples (the smallest client) × {FEATURES} features")
    draws = draw_sizes(num_clients, own.seed, own.size_mu, own.size_sigma)
    client = int(np.argmax(draws))  # the draws are finite or inf, never nan
    largest = float(draws[client]) + own.size_min
    if largest > MAX_CLIENT_SAMPLES:
        shown = (f"{largest:.3g} samples × {FEATURES} features "
                 f"({format_bytes(largest * BYTES_PER_SAMPLE)})" if largest < math.inf
                 else "more samples than a float can count")
        raise ConfigError(f"data.size_mu: client {client} would hold {shown}: its size is "
                          f"⌊LogNormal(size_mu={own.size_mu}, size_sigma={own.size_sigma})⌋ + "
                          f"{own.size_min}; a client holds at most {MAX_CLIENT_SAMPLES:,} "
                          f"samples ({format_bytes(MAX_GENERATED_BYTES)}): lower size_mu or "
                          "size_sigma")


@dataclass(frozen=True)
class FedProxSyntheticConfig:
    """The keys of `synthetic_fedprox` (under `data`)."""

    alpha: float = 1.0  # spread of the clients' labelling models (std of u_k)
    beta: float = 1.0  # spread of the clients' input means (std of B_k)
    iid: bool = False  # the paper's IID variant: one shared model, zero input means
    seed: int = 0  # the dataset's own seed: the same clients for every run seed
    size_mu: float = 4.0  # client sizes: ⌊LogNormal(size_mu, size_sigma)⌋ + size_min
    size_sigma: float = 2.0
    size_min: int = 50
    test_clients: int = 100  # the test set: held-out samples of this many clients
    test_per_client: int = 100

    def __post_init__(self) -> None:
        require(self.seed >= 0, "seed", f"must be >= 0 (got {self.seed})")
        require(self.alpha >= 0, "alpha", f"must be >= 0 (got {self.alpha})")
        require(self.beta >= 0, "beta", f"must be >= 0 (got {self.beta})")
        require(self.size_sigma >= 0, "size_sigma", f"must be >= 0 (got {self.size_sigma})")
        require(self.size_min >= 1, "size_min", "must be >= 1")
        require(self.test_clients >= 1, "test_clients", "must be >= 1")
        require(self.test_per_client >= 1, "test_per_client", "must be >= 1")


class SyntheticFedProx:
    """The `synthetic_fedprox` dataset plug-in (its keys under `data`: alpha, beta, ...)."""

    task = "classification"
    generates_clients = True  # its partition is its own: data.partition.kind natural
    Config = FedProxSyntheticConfig

    def check(self, request: DatasetRequest) -> None:
        check_sizes(request.num_clients, request.params)  # nothing on disk: only its sizes

    def load(self, request: DatasetRequest) -> Dataset:
        own = request.params
        clients = FedProxClients.build(
            request.num_clients, own.alpha, own.beta, own.iid, own.seed,
            own.size_mu, own.size_sigma, own.size_min)
        return Dataset(spec=SPEC, train=None,
                       test=clients.test_split(own.test_clients, own.test_per_client),
                       clients=clients)


synthetic_fedprox = SyntheticFedProx()
