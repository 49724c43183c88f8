"""How tensors cross process boundaries. Ray pickles torch tensors through torch's own
reducer, several times slower than numpy arrays, which Ray serialises zero-copy (pickle 5).
Registering this serializer in every raysim process sends tensors as numpy buffers."""

from __future__ import annotations

import numpy as np
import torch

# numpy has no bfloat16: such tensors travel as their raw 16-bit patterns
_VIEW_AS = {torch.bfloat16: torch.int16}


def tensor_to_wire(tensor: torch.Tensor) -> tuple[np.ndarray, str]:
    t = tensor.detach().cpu()
    dtype = str(t.dtype)
    if t.dtype in _VIEW_AS:
        t = t.view(_VIEW_AS[t.dtype])
    return t.contiguous().numpy(), dtype


def tensor_from_wire(wire: tuple[np.ndarray, str]) -> torch.Tensor:
    array, dtype = wire
    # copy out of the (read-only, shared) object-store buffer: receivers may write in place
    t = torch.from_numpy(np.array(array, copy=True))
    target = getattr(torch, dtype.removeprefix("torch."))
    return t.view(target) if t.dtype != target else t


def register_tensor_transport() -> None:
    import ray.util

    ray.util.register_serializer(
        torch.Tensor, serializer=tensor_to_wire, deserializer=tensor_from_wire
    )
