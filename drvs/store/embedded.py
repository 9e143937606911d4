"""The single-node store: one JSON file, changed under flock, replaced atomically.

Each change writes a new file beside the old one, fsyncs it and renames it
over the old, then fsyncs the directory: a crash leaves either the old or the
new state, never a torn one.
"""

import fcntl
import json
import os
from contextlib import contextmanager

from ..errors import StoreError
from . import CompareFailed, Entry, Store

_FORMAT = 1


class EmbeddedStore(Store):
    def __init__(self, path):
        self.path = str(path)

    # -- reading ---------------------------------------------------------

    def get(self, key: str) -> Entry | None:
        with self._locked(fcntl.LOCK_SH) as state:
            return _entry(state, key)

    def range(self, prefix: str) -> list[Entry]:
        return self.snapshot(prefix)[0]

    def snapshot(self, prefix: str) -> tuple[list[Entry], int]:
        with self._locked(fcntl.LOCK_SH) as state:
            return [_entry(state, k) for k in sorted(state["kv"]) if k.startswith(prefix)], state["revision"]

    # -- writing ---------------------------------------------------------

    def put(self, key: str, value: str, *, expect_revision: int | None = None,
            unchanged: tuple[str, int] | None = None, same: dict | None = None) -> int:
        with self._locked(fcntl.LOCK_EX) as state:
            old = state["kv"].get(key)
            _check(key, old, expect_revision)
            for other, revision in (same or {}).items():
                _check(other, state["kv"].get(other), revision)
            if unchanged is not None:
                prefix, revision = unchanged
                if any(k.startswith(prefix) and item[2] > revision for k, item in state["kv"].items()):
                    raise CompareFailed(f"{prefix}: changed after revision {revision}")
            rev = state["revision"] + 1
            state["revision"] = rev
            state["kv"][key] = [value, old[1] if old else rev, rev]
            self._write(state)
            return rev

    def delete(self, key: str, *, expect_revision: int | None = None) -> bool:
        with self._locked(fcntl.LOCK_EX) as state:
            old = state["kv"].get(key)
            _check(key, old, expect_revision)
            if old is None:
                return False
            state["revision"] += 1
            del state["kv"][key]
            self._write(state)
            return True

    # -- file handling ---------------------------------------------------

    @contextmanager
    def _locked(self, mode: int):
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            lock = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise StoreError(f"store {self.path}: {e.strerror}") from None
        try:
            fcntl.flock(lock, mode)
            yield self._read()
        finally:
            os.close(lock)

    def _read(self) -> dict:
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return {"format": _FORMAT, "revision": 0, "kv": {}}
        except OSError as e:
            raise StoreError(f"store {self.path}: {e.strerror}") from None
        try:
            state = json.loads(raw)
            if state.get("format") != _FORMAT or not isinstance(state.get("kv"), dict):
                raise ValueError("unknown layout")
            return state
        except ValueError as e:
            raise StoreError(f"store {self.path} is corrupt ({e}); move it away to start afresh") from None

    def _write(self, state: dict) -> None:
        head, name = os.path.split(self.path)
        tmp = os.path.join(head, f".{name}.{os.getpid()}.tmp")
        data = json.dumps(state, separators=(",", ":")).encode()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, self.path)
            dirfd = os.open(head, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dirfd)
            finally:
                os.close(dirfd)
        except OSError as e:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise StoreError(f"store {self.path}: cannot write: {e.strerror}") from None


def _entry(state: dict, key: str) -> Entry | None:
    item = state["kv"].get(key)
    return Entry(key, item[0], item[1], item[2]) if item else None


def _check(key: str, old: list | None, expect: int | None) -> None:
    if expect is None:
        return
    current = old[2] if old else 0
    if current != expect:
        raise CompareFailed(f"{key}: revision {current}, expected {expect}")
