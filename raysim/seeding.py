"""Deterministic seeds. Every random draw in a run comes from a generator derived from the run
seed plus a purpose tag and coordinates (round, client id), so results do not depend on how many
workers there are or in which order they pick up clients. The global torch RNG is never reseeded."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from numpy.random.bit_generator import ISeedSequence

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


def client_generators(seed: int, round_index: int,
                      client_ids: Sequence[int]) -> list[torch.Generator]:
    """`client_generator` of each client, their seeds mixed at once (a group's clients)."""
    return [torch.Generator().manual_seed(s)
            for s in derive_seeds([[seed, CLIENT, round_index, c] for c in client_ids])]


# ------------------------------------------------------------------------ many seeds at once
# numpy's SeedSequence mixing (numpy/random/bit_generator.pyx), vectorised over many entropy
# rows: one SeedSequence costs ~7 µs of Python, which a group of 500 clients pays 1,500 times
# a round. The words are numpy's own (tests/test_seeding.py checks them against SeedSequence).
_POOL_SIZE, _XSHIFT = 4, np.uint32(16)
_INIT_A, _MULT_A = np.uint32(0x43B0D7E5), np.uint32(0x931E8875)
_INIT_B, _MULT_B = np.uint32(0x8B51F9DD), np.uint32(0x58F38DED)
_MIX_MULT_L, _MIX_MULT_R = np.uint32(0xCA01F9DD), np.uint32(0x4973F715)


def seed_pools(entropy: np.ndarray) -> np.ndarray:
    """The entropy pool `SeedSequence(row)` mixes from each row of `entropy` (N, W): (N, 4)
    uint32. Every word must be below 2**32 (a SeedSequence takes each such int as one word)."""
    entropy = np.asarray(entropy, dtype=np.uint32)
    rows, width = entropy.shape
    hash_const = _INIT_A

    def hashmix(value: np.ndarray) -> np.ndarray:
        nonlocal hash_const
        value = value ^ hash_const
        hash_const = hash_const * _MULT_A
        value = value * hash_const
        return value ^ (value >> _XSHIFT)

    def mix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        result = _MIX_MULT_L * x - _MIX_MULT_R * y
        return result ^ (result >> _XSHIFT)

    with np.errstate(over="ignore"):  # uint32 arithmetic wraps, as in SeedSequence's C
        zeros = np.zeros(rows, dtype=np.uint32)
        pool = [hashmix(entropy[:, i] if i < width else zeros) for i in range(_POOL_SIZE)]
        for source in range(_POOL_SIZE):  # late words reach early ones
            for target in range(_POOL_SIZE):
                if source != target:
                    pool[target] = mix(pool[target], hashmix(pool[source]))
        for source in range(_POOL_SIZE, width):  # entropy beyond the pool's size
            for target in range(_POOL_SIZE):
                pool[target] = mix(pool[target], hashmix(entropy[:, source]))
    return np.stack(pool, axis=1)


def pool_states(pools: np.ndarray, n_words: int) -> np.ndarray:
    """`generate_state(n_words)` (uint32) of the SeedSequences whose pools are `pools`."""
    out = np.empty((len(pools), n_words), dtype=np.uint32)
    hash_const = _INIT_B
    with np.errstate(over="ignore"):
        for i in range(n_words):
            value = pools[:, i % _POOL_SIZE] ^ hash_const
            hash_const = hash_const * _MULT_B
            value = value * hash_const
            out[:, i] = value ^ (value >> _XSHIFT)
    return out


class PooledSeed(ISeedSequence):
    """A SeedSequence whose pool `seed_pools` mixed ahead (and, optionally, its first state
    words, uint32): what a bit generator draws its state from, without mixing it again."""

    def __init__(self, pool: np.ndarray, words: np.ndarray | None = None) -> None:
        self.pool, self.words = pool, words

    def generate_state(self, n_words: int, dtype: type = np.uint32) -> np.ndarray:
        wide = np.dtype(dtype) == np.dtype(np.uint64)
        if not wide and np.dtype(dtype) != np.dtype(np.uint32):
            raise TypeError("only support uint32 or uint64")
        needed = n_words * (2 if wide else 1)
        words = self.words[:needed] if self.words is not None and len(self.words) >= needed \
            else pool_states(self.pool[None, :], needed)[0]
        if wide:  # as SeedSequence: pairs of words, low first
            return words[0::2].astype(np.uint64) | (words[1::2].astype(np.uint64) << 32)
        return words


def _entropy(rows: Sequence[Sequence[int]]) -> np.ndarray | None:
    """`rows` as the (N, W) entropy `seed_pools` takes, or None where it cannot (rows of unequal
    lengths, a word outside [0, 2**32)): each row is then mixed on its own."""
    try:
        entropy = np.array(rows, dtype=np.int64)
    except (ValueError, OverflowError):  # ragged rows; a word past int64
        return None
    if entropy.ndim != 2 or not ((entropy >= 0) & (entropy < 2**32)).all():
        return None
    return entropy


def derive_seeds(rows: Sequence[Sequence[int]]) -> list[int]:
    """`derive_seed(*row)` for every row (rows of one length), mixed at once."""
    entropy = _entropy(rows)
    if entropy is None:
        return [derive_seed(*row) for row in rows]
    state = pool_states(seed_pools(entropy), 2).astype(np.int64)
    return (((state[:, 0] << 31) ^ state[:, 1]) & (2**63 - 1)).tolist()


def numpy_generators(rows: Sequence[Sequence[int]]) -> list[np.random.Generator]:
    """`np.random.default_rng(row)` for every row (rows of one length): the same streams,
    their seeds mixed at once."""
    entropy = _entropy(rows)
    if entropy is None:
        return [np.random.default_rng([int(p) for p in row]) for row in rows]
    pools = seed_pools(entropy)
    words = pool_states(pools, 8)  # what PCG64 asks for: 4 uint64 words
    return [np.random.Generator(np.random.PCG64(PooledSeed(pool, own)))
            for pool, own in zip(pools, words, strict=True)]


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
