"""Where clients' persistent state lives between their rounds (a previous local model, kept
optimiser moments, control variates).

The server actor owns the store: a worker receives the states of the clients it trains with
its assignment and returns the new ones with the updates, which the server puts back after the
round's server step. Two implementations behind one interface:

- `MemoryStore` (default): a dict in the server actor. A checkpoint packs every state.
- `DiskStore`: one safetensors file per client and version under `<run dir>/client_states/`, so
  100k stateful clients cost disk, not RAM. Files are never overwritten: a put writes
  `<id>-r<round>.safetensors` and the store's index points at it. A checkpoint records the index
  (client → round), and files that a kept checkpoint still names are kept, so resuming from any
  kept checkpoint finds exactly the states of that round. Files are written by the server actor,
  so on a multi-node cluster the server is placed on the driver's node (the run directory's).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from raysim.state_io import StateFormatError, pack, unpack


class ClientStateStore(ABC):
    @abstractmethod
    def get(self, client_ids: Sequence[int]) -> list[Any]:
        """Each client's latest state (None for a client never stored)."""

    @abstractmethod
    def put(self, round_index: int, states: dict[int, Any]) -> None:
        """The states clients left after `round_index` (None: drop the client's state)."""

    @abstractmethod
    def snapshot(self, checkpoint_round: int) -> dict[str, bytes]:
        """Files for a checkpoint of the store as it is now (written by the caller)."""

    @abstractmethod
    def restore(self, files: dict[str, bytes],
                others: dict[int, dict[str, bytes]] | None = None) -> None:
        """The store as a checkpoint's `snapshot` saw it. `others`: the snapshot files of the
        other checkpoints still kept, by round (a disk store keeps what they name)."""

    def release(self, checkpoint_round: int) -> None:  # noqa: B027 (optional to override)
        """A checkpoint was deleted: what only it needed may go."""

    @abstractmethod
    def __len__(self) -> int: ...


class MemoryStore(ClientStateStore):
    def __init__(self) -> None:
        self.states: dict[int, Any] = {}

    def get(self, client_ids: Sequence[int]) -> list[Any]:
        return [self.states.get(cid) for cid in client_ids]

    def put(self, round_index: int, states: dict[int, Any]) -> None:
        for cid, state in states.items():
            if state is None:
                self.states.pop(cid, None)
            else:
                self.states[cid] = state

    def snapshot(self, checkpoint_round: int) -> dict[str, bytes]:
        return {"client_states.safetensors": pack(dict(sorted(self.states.items())))}

    def restore(self, files: dict[str, bytes],
                others: dict[int, dict[str, bytes]] | None = None) -> None:
        self.states = dict(unpack(files["client_states.safetensors"]))

    def __len__(self) -> int:
        return len(self.states)


INDEX_FILE = "client_states_index.safetensors"


class DiskStore(ClientStateStore):
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.index: dict[int, int] = {}  # client → round of its live file
        self.pinned: dict[int, dict[int, int]] = {}  # checkpoint round → its index

    def path(self, client_id: int, round_index: int) -> Path:
        folder = self.root / f"{client_id // 1000:06d}"  # a thousand clients per folder
        return folder / f"{client_id}-r{round_index:06d}.safetensors"

    def get(self, client_ids: Sequence[int]) -> list[Any]:
        out = []
        for cid in client_ids:
            if cid not in self.index:
                out.append(None)
                continue
            path = self.path(cid, self.index[cid])
            try:
                out.append(unpack(path.read_bytes()))
            except (OSError, StateFormatError) as error:
                raise StateFormatError(f"client state {path}: {error}") from None
        return out

    def put(self, round_index: int, states: dict[int, Any]) -> None:
        for cid, state in states.items():
            old = self.index.pop(cid, None)
            if state is not None:
                path = self.path(cid, round_index)
                path.parent.mkdir(exist_ok=True)
                tmp = path.with_name(f".{path.name}.tmp")
                tmp.write_bytes(pack(state))
                os.replace(tmp, path)
                self.index[cid] = round_index
            if old is not None and old != round_index:
                self._drop_if_unused(cid, old)

    def _drop_if_unused(self, client_id: int, round_index: int) -> None:
        if self.index.get(client_id) == round_index:
            return
        if any(pins.get(client_id) == round_index for pins in self.pinned.values()):
            return
        self.path(client_id, round_index).unlink(missing_ok=True)

    def snapshot(self, checkpoint_round: int) -> dict[str, bytes]:
        self.pinned[checkpoint_round] = dict(self.index)
        return {INDEX_FILE: pack(index_tensors(self.index))}

    def release(self, checkpoint_round: int) -> None:
        for cid, r in self.pinned.pop(checkpoint_round, {}).items():
            self._drop_if_unused(cid, r)

    def restore(self, files: dict[str, bytes],
                others: dict[int, dict[str, bytes]] | None = None) -> None:
        """The index of the checkpoint; every file neither it nor another kept checkpoint names
        (states written after it, by the run that is being resumed) is deleted."""
        self.index = index_from_tensors(unpack(files[INDEX_FILE]))
        for cid, r in self.index.items():
            if not self.path(cid, r).is_file():
                raise StateFormatError(f"client state {self.path(cid, r)} is missing")
        self.pinned = {r: index_from_tensors(unpack(f[INDEX_FILE]))
                       for r, f in (others or {}).items()}
        keep = set(self.index.items())
        for pins in self.pinned.values():
            keep.update(pins.items())
        for path in self.root.glob("*/*.safetensors"):
            cid, _, r = path.stem.partition("-r")
            if (int(cid), int(r)) not in keep:
                path.unlink()

    def __len__(self) -> int:
        return len(self.index)


def index_tensors(index: dict[int, int]) -> dict[str, Any]:
    import torch

    ids = sorted(index)
    return {"client": torch.tensor(ids, dtype=torch.int64),
            "round": torch.tensor([index[c] for c in ids], dtype=torch.int64)}


def index_from_tensors(tree: dict[str, Any]) -> dict[int, int]:
    return dict(zip(tree["client"].tolist(), tree["round"].tolist()))


def make_store(kind: str, run_dir: str | Path | None) -> ClientStateStore:
    if kind == "disk":
        if run_dir is None:
            raise ValueError("client_state.store: disk needs a run directory")
        return DiskStore(Path(run_dir) / "client_states")
    return MemoryStore()
