"""Algorithm state as files that cannot execute code when read.

Server state, client state and the engine's own records are *state trees*: tensors, numpy
arrays, numbers, strings, None, lists, tuples, dicts (string or integer keys) and the frozen
message dataclasses registered with `register_state_types` (the contract's, and their
subclasses in method files). A tree is written as one JSON structure plus one safetensors
file holding every tensor; neither format can carry code. Dataclasses are rebuilt only from
classes already imported (the registered types and their subclasses), looked up by name:
reading a tree never imports anything.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np
import torch

FORMAT = 1


class StateFormatError(ValueError):
    """A state file that is not what raysim writes (truncated, corrupted, or foreign)."""


# The message and state types whose subclasses a tree may hold; the method contract
# (`raysim.algorithm`) registers its own, so this format knows nothing above it.
_ROOTS: list[type] = []


def register_state_types(*classes: type) -> None:
    """Let trees hold instances of `classes` and of their subclasses (rebuilt by name)."""
    _ROOTS.extend(cls for cls in classes if cls not in _ROOTS)


def _known_dataclasses() -> dict[str, type]:
    found: dict[str, type] = {}
    stack = list(_ROOTS)
    while stack:
        cls = stack.pop()
        found[f"{cls.__module__}.{cls.__qualname__}"] = cls
        stack.extend(cls.__subclasses__())
    return found


def to_tree(value: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """(JSON-ready structure, tensors by key) of a state tree. Tensors are stored once per
    object, so two references to one tensor come back as one tensor."""
    tensors: dict[str, torch.Tensor] = {}
    by_id: dict[int, str] = {}
    storages: set[tuple[int, int]] = set()
    alive: list[torch.Tensor] = []  # keeps ids unique while encoding

    def tensor_key(t: torch.Tensor) -> str:
        original = id(t)
        if original in by_id:
            return by_id[original]
        alive.append(t)
        key = f"t{len(tensors)}"
        t = t.detach().cpu()
        storage = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        # safetensors refuses tensors that share memory: views of one buffer get their own copy
        t = t.clone() if storage in storages or not t.is_contiguous() else t
        storages.add(storage)
        tensors[key] = t
        by_id[original] = key
        return key

    def encode(v: Any) -> Any:
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, torch.Tensor):
            return {"tensor": tensor_key(v)}
        if isinstance(v, np.ndarray):
            return {"ndarray": tensor_key(torch.from_numpy(np.ascontiguousarray(v)))}
        if isinstance(v, np.generic):
            return v.item()
        if isinstance(v, list):
            return {"list": [encode(x) for x in v]}
        if isinstance(v, tuple):
            return {"tuple": [encode(x) for x in v]}
        if isinstance(v, dict):
            for key in v:
                if not isinstance(key, (str, int)) or isinstance(key, bool):
                    raise TypeError(f"state dict keys must be str or int, got {key!r}")
            return {"dict": [[k, encode(x)] for k, x in v.items()]}
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            name = f"{type(v).__module__}.{type(v).__qualname__}"
            return {"dataclass": name,
                    "fields": {f.name: encode(getattr(v, f.name)) for f in dataclasses.fields(v)}}
        raise TypeError(
            f"state must be data (tensors, numbers, strings, lists, dicts, state dataclasses); "
            f"got {type(v).__name__}: keep a module's state_dict() instead of the module"
        )

    return encode(value), tensors


def from_tree(structure: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The state tree `to_tree` encoded."""
    classes = _known_dataclasses()

    def decode(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        if len(node) == 1:
            (tag, payload), = node.items()
            if tag in ("tensor", "ndarray"):
                if payload not in tensors:
                    raise StateFormatError(f"missing tensor {payload!r}")
                t = tensors[payload]
                return t.numpy() if tag == "ndarray" else t
            if tag == "list":
                return [decode(x) for x in payload]
            if tag == "tuple":
                return tuple(decode(x) for x in payload)
            if tag == "dict":
                return {k: decode(x) for k, x in payload}
        if set(node) == {"dataclass", "fields"}:
            cls = classes.get(node["dataclass"])
            if cls is None:
                raise StateFormatError(
                    f"state names the type {node['dataclass']!r}, which is not a state type of "
                    "the algorithm in use (was it written by another method?)")
            return cls(**{k: decode(x) for k, x in node["fields"].items()})
        raise StateFormatError(f"unexpected node {str(node)[:80]!r}")

    try:
        return decode(structure)
    except (TypeError, ValueError, KeyError) as error:
        if isinstance(error, StateFormatError):
            raise
        raise StateFormatError(f"malformed state: {error}") from None


def pack(value: Any) -> bytes:
    """A state tree as one safetensors file: the tensors, with the structure as JSON in the
    file's metadata."""
    from safetensors.torch import save

    structure, tensors = to_tree(value)
    text = json.dumps({"format": FORMAT, "tree": structure}, allow_nan=True)
    return save(tensors, metadata={"raysim": text})


def unpack(blob: bytes) -> Any:
    """The state tree of `pack`. Any damage raises StateFormatError; nothing is executed."""
    from safetensors.torch import load

    try:
        tensors = load(blob)
    except Exception as error:  # safetensors raises its own error types on bad headers
        raise StateFormatError(f"not a safetensors file ({error})") from None
    # the header is JSON after its 8-byte little-endian length (the safetensors layout)
    header_length = int.from_bytes(blob[:8], "little")
    try:
        header = json.loads(blob[8 : 8 + header_length])
        text = header.get("__metadata__", {}).get("raysim")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        raise StateFormatError(f"damaged safetensors header ({error})") from None
    try:
        document = json.loads(text) if text is not None else None
    except json.JSONDecodeError as error:
        raise StateFormatError(f"damaged state structure ({error})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise StateFormatError("not a raysim state file (no raysim structure in its metadata)")
    return from_tree(document["tree"], tensors)
