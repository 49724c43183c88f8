"""The tensor transport: every dtype numpy can carry crosses as the same bits (bfloat16 as its
16-bit patterns), the receiver owns a writable copy, a dtype numpy has no match for is refused,
and on Ray tensors really travel this way, to and from a worker process."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raysim.engine.transport import register_tensor_transport, tensor_from_wire, tensor_to_wire

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8,
          torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64]


def bits(tensor: torch.Tensor) -> bytes:
    """The tensor's raw bytes (NaN payloads and the sign of zero included)."""
    return tensor.contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() \
        else b""


def sample(dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.rand(3, 5, generator=g) > 0.5
    if dtype.is_floating_point:
        values = torch.randn(3, 5, generator=g, dtype=torch.float64) * 1e3
        special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-30],
                               dtype=torch.float64)
        return torch.cat([values.flatten(), special]).view(4, 5).to(dtype)
    if dtype.is_complex:
        return torch.randn(3, 5, generator=g, dtype=dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, (3, 5), generator=g, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_tensor_round_trips_bit_for_bit(dtype):
    tensor = sample(dtype)
    wire = tensor_to_wire(tensor)
    assert isinstance(wire[0], np.ndarray) and wire[1] == str(dtype)
    back = tensor_from_wire(wire)
    assert back.dtype == dtype and back.shape == tensor.shape
    assert bits(back) == bits(tensor)


def test_views_scalars_empty_and_trainable_tensors_arrive_as_plain_values():
    base = torch.arange(24, dtype=torch.float32).view(4, 6)
    for tensor in (base.t(), base[:, 1::2], base[2], torch.tensor(3.5), torch.empty(0, 3)):
        back = tensor_from_wire(tensor_to_wire(tensor))
        assert back.shape == tensor.shape and torch.equal(back, tensor)
        assert back.is_contiguous()
    weight = torch.ones(2, 3, requires_grad=True) * 2
    back = tensor_from_wire(tensor_to_wire(weight))
    assert not back.requires_grad and torch.equal(back, weight.detach())


def test_the_receiver_owns_a_writable_copy_of_the_read_only_buffer():
    array, dtype = tensor_to_wire(torch.arange(5, dtype=torch.int64))
    array = array.copy()
    array.flags.writeable = False  # as the object store hands buffers out
    back = tensor_from_wire((array, dtype))
    back += 1  # a receiver may write in place
    assert back.tolist() == [1, 2, 3, 4, 5] and array.tolist() == [0, 1, 2, 3, 4]


def test_a_dtype_numpy_cannot_carry_is_refused_not_corrupted():
    with pytest.raises(TypeError):
        tensor_to_wire(torch.zeros(2, dtype=torch.float8_e4m3fn))


def test_on_ray_tensors_travel_as_numpy_both_ways(ray_session):
    """torch's own reducer would keep `requires_grad`; the transport sends values only, so a
    tensor that arrives without it came this way (to a task, and back from it)."""
    ray = ray_session
    register_tensor_transport()

    @ray.remote(num_cpus=0)
    def echo(tensors: dict) -> dict:
        register_tensor_transport()  # as every raysim worker and server process does
        arrived = {name: t.requires_grad for name, t in tensors.items()}
        return {"arrived_trainable": arrived,
                "back": {name: t.detach().requires_grad_(t.is_floating_point())
                         for name, t in tensors.items()}}

    tensors = {str(dtype): sample(dtype) for dtype in DTYPES}
    tensors["weight"] = torch.randn(4, 3, requires_grad=True)
    stored = ray.get(ray.put(tensors["weight"]))
    assert not stored.requires_grad and torch.equal(stored, tensors["weight"].detach())
    got = ray.get(echo.remote(tensors))
    assert not any(got["arrived_trainable"].values())
    for name, tensor in tensors.items():
        back = got["back"][name]
        assert not back.requires_grad
        assert back.dtype == tensor.dtype and bits(back) == bits(tensor.detach()), name
