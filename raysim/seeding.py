"""Deterministic seeds. Every random draw in a run comes from a generator derived from the run
seed plus a purpose tag and coordinates (round, client id), so results do not depend on how many
workers there are or in which order they pick up clients. The global torch RNG is never reseeded."""

from __future__ import annotations

import numpy as np
import torch

# purpose tags keep streams for different uses independent
SAMPLING, CLIENT, MODEL_INIT, SERVER, LEAKAGE = 0x5A, 0xC1, 0x1D, 0x5E, 0x1E
# personalised evaluation: each client's train/val/test parts; who is evaluated; fine-tuning
PERSONAL_SPLIT, PERSONAL_SAMPLE, PERSONAL_EVAL = 0x95, 0x9A, 0x9E
# differential privacy: each client's local noise, the server's noise, Poisson client sampling
CLIENT_NOISE, SERVER_NOISE, POISSON_SAMPLING = 0xD1, 0xD5, 0xD7


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integer coordinates (SeedSequence mixing: nearby inputs decorrelate)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & (2**63 - 1)


def client_generator(seed: int, round_index: int, client_id: int) -> torch.Generator:
    """The generator handed to a client step in `ClientContext.generator`."""
    return torch.Generator().manual_seed(derive_seed(seed, CLIENT, round_index, client_id))


def server_generator(seed: int, round_index: int) -> torch.Generator:
    """The generator handed to a server step in `ServerContext.generator`."""
    return torch.Generator().manual_seed(derive_seed(seed, SERVER, round_index))


def sample_clients(seed: int, round_index: int, num_clients: int, per_round: int) -> list[int]:
    """Uniform sampling without replacement, from its own stream: a method's randomness can
    never change who is sampled."""
    rng = np.random.default_rng(derive_seed(seed, SAMPLING, round_index))
    return sorted(int(c) for c in rng.choice(num_clients, size=per_round, replace=False))


def poisson_sample(seed: int, round_index: int, num_clients: int, rate: float) -> list[int]:
    """Poisson client sampling (`privacy.sampling: poisson`): each client independently with
    probability `rate` (possibly none), from its own stream; sorted ids."""
    rng = np.random.default_rng(derive_seed(seed, POISSON_SAMPLING, round_index))
    return np.flatnonzero(rng.random(num_clients) < rate).tolist()


def round_clients(seed: int, round_index: int, num_clients: int, per_round: int,
                  poisson: bool = False) -> list[int]:
    """The clients of a round: `per_round` of them (`sample_clients`), or with `poisson` each
    with probability per_round / num_clients (`poisson_sample`)."""
    if poisson:
        return poisson_sample(seed, round_index, num_clients, min(per_round / num_clients, 1.0))
    return sample_clients(seed, round_index, num_clients, per_round)
