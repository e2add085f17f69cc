"""What the repository API changed, as every worker process of one server must see it.

With AE_WORKERS > 1 a load or unload reaches one worker; the others learn of it from a small
JSON file in the folder the workers share (the one their metrics and ready marks meet in):
the models unloaded through the API, and how many times each was loaded through it (a load
reads the model's folder again). Each worker's repository follows the file (`Repository.follow`),
so every worker agrees within one follow period. One process keeps the same state in memory.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from service import workers

FILE = "model-control.json"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ControlState:
    unloaded: frozenset[str] = frozenset()
    loads: dict[str, int] = field(default_factory=dict)  # name -> loads through the API

    def unload(self, name: str) -> ControlState:
        return ControlState(self.unloaded | {name}, self.loads)

    def load(self, name: str) -> ControlState:
        return ControlState(
            self.unloaded - {name}, {**self.loads, name: self.loads.get(name, 0) + 1}
        )


class SharedState:
    """The control state in `path` (shared by the workers), or in memory when `path` is None."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._state = ControlState()

    @classmethod
    def for_this_server(cls) -> SharedState:
        folder = workers.folder()
        return cls(Path(folder, FILE) if folder is not None else None)

    def read(self) -> ControlState:
        if self.path is None:
            return self._state
        try:
            body = json.loads(self.path.read_text())
            return ControlState(frozenset(body["unloaded"]), dict(body["loads"]))
        except FileNotFoundError:
            return ControlState()
        except (ValueError, KeyError, TypeError) as exc:  # not ours, or damaged: serve the folder
            log.warning("ignoring %s, which is not a model control state: %s", self.path, exc)
            return ControlState()

    def update(self, change: Callable[[ControlState], ControlState]) -> ControlState:
        """Apply `change` to the current state and store the result (one writer at a time)."""
        if self.path is None:
            self._state = change(self._state)
            return self._state
        with self._locked():
            state = change(self.read())
            staged = self.path.with_name(f".{FILE}.{os.getpid()}")
            staged.write_text(
                json.dumps({"unloaded": sorted(state.unloaded), "loads": state.loads})
            )
            os.replace(staged, self.path)  # readers see the old file or the new one, whole
            return state

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        assert self.path is not None
        with open(self.path.with_name(f".{FILE}.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
