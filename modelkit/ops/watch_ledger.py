"""The watcher's ledger: what was seen, started, finished, rejected or skipped, kept
outside the run folder so that a watcher killed at any point resumes without losing or
repeating anything.

One folder (``state``) holds:

* ``ledger.jsonl``: one JSON record a line, appended with a single ``write`` on a file
  opened ``O_APPEND`` and fsynced. A kill can at worst leave a torn last line, which
  reading ignores (the event it held never happened, as far as the ledger is concerned).
* ``results/<key>.json``: an evaluation's result, written to a temporary name, fsynced and
  renamed *before* its ``done`` record is appended: a ``done`` always has its result.
* ``queue.jsonl``: checkpoints a training callback saw saved (see :mod:`modelkit.ops.watch_callback`).
* ``lock``: ``flock``-ed while a watcher works on this state (released by the kernel when
  the process dies, so a ``kill -9`` leaves no stale lock).

Why not a database: sqlite would do, but an append-only text file is readable with
``cat``, survives ``kill -9`` by construction and needs no schema migration.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from modelkit.errors import ModelkitError
from modelkit.cache import cache_dir

FINAL = ("done", "failed", "rejected", "skipped")   # a checkpoint key with one of these is settled


class LedgerError(ModelkitError):
    """The watcher's state folder cannot be used (inside the run folder, or locked)."""


def default_state_dir(run_dir: str | Path) -> Path:
    """``$MODELKIT_CACHE/watch/<run folder name>-<hash of its real path>``."""
    real = Path(run_dir).expanduser().resolve()
    digest = hashlib.sha256(str(real).encode()).hexdigest()[:12]
    return cache_dir() / "watch" / f"{real.name or 'run'}-{digest}"


@dataclass
class Ledger:
    """Append-only records of one watched run (see module docstring)."""

    folder: Path
    records: list[dict[str, Any]] = field(default_factory=list)
    _final: dict[str, dict] = field(default_factory=dict, repr=False)
    _started: dict[str, int] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, folder: str | Path, run_dir: str | Path | None = None) -> "Ledger":
        folder = Path(folder).expanduser().absolute()
        if run_dir is not None:
            run = Path(run_dir).expanduser().resolve()
            real = folder.resolve()
            if real == run or run in real.parents:
                raise LedgerError(f"the state folder is inside the watched run folder {run}; modelkit never "
                                  "writes into artifacts. Choose a --state outside it", folder)
        (folder / "results").mkdir(parents=True, exist_ok=True)
        ledger = cls(folder)
        for record in read_jsonl(ledger.path):
            ledger._index(record)
        return ledger

    def _index(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        key, event = record.get("key"), record.get("event")
        if event == "started":
            self._started[key] = self._started.get(key, 0) + 1
        elif event in FINAL and key not in self._final:
            self._final[key] = record

    @property
    def path(self) -> Path:
        return self.folder / "ledger.jsonl"

    @property
    def queue_path(self) -> Path:
        return self.folder / "queue.jsonl"

    # -- writing ----------------------------------------------------------------------
    def append(self, event: str, key: str | None, **fields: Any) -> dict[str, Any]:
        """Record ``event`` for checkpoint ``key`` durably; returns the record."""
        record = {"event": event, "key": key, "time": round(time.time(), 3), "pid": os.getpid(), **fields}
        append_jsonl(self.path, record)
        self._index(record)
        return record

    def save_result(self, key: str, result: dict[str, Any]) -> Path:
        """Write ``result`` atomically (temporary file, fsync, rename) as ``results/<key>.json``."""
        path = self.result_path(key)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            json.dump(result, f, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path

    def result_path(self, key: str) -> Path:
        return self.folder / "results" / f"{key}.json"

    def load_result(self, key: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.result_path(key).read_text())
        except (OSError, ValueError):
            return None

    # -- reading ----------------------------------------------------------------------
    def final(self, key: str) -> dict[str, Any] | None:
        """The settling record of ``key`` (done / failed / rejected / skipped), if any."""
        return self._final.get(key)

    def attempts(self, key: str) -> int:
        """How many evaluations of ``key`` were started (finished or not)."""
        return self._started.get(key, 0)

    def settled(self) -> list[dict[str, Any]]:
        """Every key's settling record, in the order they were settled."""
        return list(self._final.values())

    def queued(self) -> list[dict[str, Any]]:
        """What a training callback queued (``queue.jsonl``), oldest first."""
        return list(read_jsonl(self.queue_path))

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold this state's lock; a second watcher on the same state is refused."""
        with open(self.folder / "lock", "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                raise LedgerError(f"another watcher is working on this state ({f.read().strip() or 'pid unknown'}); "
                                  "stop it first or pass another --state", self.folder) from None
            f.truncate(0)
            f.write(f"pid {os.getpid()}\n")
            f.flush()
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """One line, one ``write`` on an ``O_APPEND`` descriptor, fsynced."""
    line = (json.dumps(record, default=str, separators=(",", ":")) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """The records of ``path``; a torn or unparsable line (a kill mid-write) is skipped."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            yield record
