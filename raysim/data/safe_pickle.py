"""Unpickling limited to plain containers and numpy arrays.

CIFAR-10/100 ship as Python pickles, and ``pickle.load`` runs whatever callable a pickle
names, so a dataset root holding a crafted file would execute code as the simulator. A pickle
can only call something by naming it as a global, so this unpickler resolves just the globals
that a numpy array's pickle needs and refuses every other one before anything is called.
Dicts, lists, tuples, str, bytes, int, float, bool and None need no globals at all.
"""

from __future__ import annotations

import _compat_pickle
import functools
import importlib
import io
import pickle
from collections.abc import Callable
from typing import IO, Any

import numpy as np

__all__ = ["UnsafePickleError", "load"]


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names a global outside the allowlist, i.e. it could run code when loaded."""

    def __init__(self, module: str, name: str) -> None:
        # Python 3 writes protocol <= 2 pickles with Python 2 names (commands.call,
        # __builtin__.exec); report the name that would actually have been called.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        super().__init__(f"pickle references {module}.{name}, which is not allowed")
        self.global_name = f"{module}.{name}"


def _numpy_attr(submodule: str, name: str) -> Any:
    # numpy 2 moved numpy.core to numpy._core; pickles written under either name must load,
    # and importing the old alias on numpy 2 only emits a deprecation warning.
    for package in ("numpy._core", "numpy.core"):
        try:
            return getattr(importlib.import_module(f"{package}.{submodule}"), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"numpy has no {submodule}.{name}")


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    # Python 3 pickles bytes at protocol <= 2 as _codecs.encode(str, "latin1"). Only that
    # form is admitted: other codecs are looked up by name, which imports modules.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode is only allowed as (str, 'latin1'), "
                                     f"got ({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


@functools.cache
def _allowed() -> dict[tuple[str, str], Callable[..., Any]]:
    reconstruct = _numpy_attr("multiarray", "_reconstruct")
    frombuffer = _numpy_attr("numeric", "_frombuffer")
    return {
        # ndarray at protocols 0-4 (the official Python 2 files use protocol 2):
        # _reconstruct(ndarray, (0,), b"b") then ndarray.__setstate__ with the raw bytes.
        ("numpy.core.multiarray", "_reconstruct"): reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # ndarray at protocol 5 (copies re-pickled by recent Python): _frombuffer(buf, dtype, ...).
        ("numpy.core.numeric", "_frombuffer"): frombuffer,
        ("numpy._core.numeric", "_frombuffer"): frombuffer,
        ("_codecs", "encode"): _latin1_encode,
    }


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self._allowed = _allowed()

    def find_class(self, module: str, name: str) -> Any:
        # Every GLOBAL / STACK_GLOBAL / EXT opcode comes through here, before any call.
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(module, name) from None


def load(file: IO[bytes] | bytes, *, encoding: str = "latin1") -> Any:
    """Unpickle ``file`` (a binary file object or the bytes themselves), admitting only plain
    containers, scalars and numpy arrays of non-object dtype.

    ``encoding`` decodes Python 2 ``str`` objects; "latin1" keeps their bytes intact, which
    numpy needs for array data pickled under Python 2. Raises ``UnsafePickleError`` for any
    other global; malformed data raises whatever the pickle machinery raises (EOFError,
    pickle.UnpicklingError, ValueError, ...), which callers should report as corrupt input.
    """
    if isinstance(file, bytes | bytearray):
        file = io.BytesIO(file)
    obj = _RestrictedUnpickler(file, encoding=encoding).load()
    _refuse_object_arrays(obj)
    return obj


def _refuse_object_arrays(obj: Any) -> None:
    # An object-dtype array could hold only objects this unpickler built, so it is not a code
    # risk, but no data format read this way has one and downstream code expects numbers.
    stack, seen = [obj], set()
    while stack:
        item = stack.pop()
        if id(item) in seen:  # memoised pickles can hold a container inside itself
            continue
        seen.add(id(item))
        if isinstance(item, np.ndarray):
            if item.dtype.hasobject:
                raise pickle.UnpicklingError("pickle holds an object-dtype numpy array")
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple | set | frozenset):
            stack.extend(item)
