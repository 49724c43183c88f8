"""Seeds mixed many at once are numpy's SeedSequence words, and the generators built from them
draw what the generators built one at a time draw."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raysim.seeding import (
    PooledSeed,
    client_generator,
    client_generators,
    derive_seed,
    derive_seeds,
    numpy_generators,
    pool_states,
    seed_pools,
)

WORD = st.integers(0, 2**32 - 1)


@settings(max_examples=60, deadline=None)
@given(width=st.integers(1, 9), data=st.data(), n_words=st.integers(1, 9))
def test_mixed_pools_give_numpys_seed_sequence_words(width, data, n_words):
    rows = data.draw(st.lists(st.lists(WORD, min_size=width, max_size=width),
                              min_size=1, max_size=4))
    pools = seed_pools(np.array(rows, dtype=np.int64))
    words = pool_states(pools, n_words)
    for row, pool, own in zip(rows, pools, words, strict=True):
        reference = np.random.SeedSequence(row)
        np.testing.assert_array_equal(pool, reference.pool)
        np.testing.assert_array_equal(own, reference.generate_state(n_words))
        np.testing.assert_array_equal(PooledSeed(pool).generate_state(n_words, np.uint64),
                                      reference.generate_state(n_words, np.uint64))
        np.testing.assert_array_equal(PooledSeed(pool, own).generate_state(1),
                                      reference.generate_state(1))
    with pytest.raises(TypeError, match="uint32 or uint64"):
        PooledSeed(pools[0]).generate_state(2, np.int32)


@pytest.mark.parametrize("rows", [
    [[0, 0x53, k] for k in (0, 1, 999_999, 2**32 - 1)],
    [[7, 2**40, 3], [7, 2, 3]],  # a word past 32 bits: mixed one at a time
    [[7, 2**64 + 5, 3], [7, 2, 3]],  # past 64 bits (no int64 array holds it): the same
    [[1, 2], [1, 2, 3]],  # rows of two lengths: mixed one at a time
])
def test_generators_mixed_at_once_draw_the_streams_of_one_at_a_time(rows):
    assert derive_seeds(rows) == [derive_seed(*row) for row in rows]
    for generator, row in zip(numpy_generators(rows), rows, strict=True):
        np.testing.assert_array_equal(generator.standard_normal(64),
                                      np.random.default_rng(row).standard_normal(64))
    assert derive_seeds([]) == [] and numpy_generators([]) == []


def test_client_generators_are_each_clients_own():
    ids = [0, 3, 12, 500_000]
    for generator, client in zip(client_generators(5, 7, ids), ids, strict=True):
        assert torch.equal(torch.randperm(50, generator=generator),
                           torch.randperm(50, generator=client_generator(5, 7, client)))
