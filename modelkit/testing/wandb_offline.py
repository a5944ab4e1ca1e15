"""Read what an offline W&B run logged: the records of its ``run-*.wandb`` file.

W&B offline runs keep everything in one transaction log (a LevelDB-style log of
``wandb_internal_pb2.Record`` protobufs after a 7-byte ``:W&B`` header); wandb ships no
Python reader for it, and ``wandb.Api()`` needs the network. Tests use this to check what
was logged against which step.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Iterator

BLOCK = 32768
HEADER = 7          # ":W&B" magic, 2-byte ident, 1-byte version; then 7-byte record headers


def records(run_folder: str | Path) -> Iterator[Any]:
    """Every Record of the offline run in ``run_folder`` (the ``offline-run-*`` folder)."""
    from wandb.proto import wandb_internal_pb2 as pb

    path = next(Path(run_folder).glob("run-*.wandb"))
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B transaction log")
    pos, buf = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:                     # block trailer: zero padding
            pos += left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        buf += data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind in (1, 4):                    # FULL or LAST fragment
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def wait_until_written(run_folder: str | Path, timeout: float = 60.0) -> None:
    """Wait for the run's ``exit`` record: wandb's writer process may still be flushing
    the log when ``run.finish()`` returns."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if any(r.WhichOneof("record_type") == "exit" for r in records(run_folder)):
                return
        except Exception:  # a record still being written does not parse yet
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{run_folder}: no exit record after {timeout} s")


def history(run_folder: str | Path) -> list[dict[str, Any]]:
    """The rows ``run.log`` wrote, as ``{key: value}`` (values JSON-decoded)."""
    rows = []
    for r in records(run_folder):
        if r.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in r.history.item})
    return rows


def metrics(run_folder: str | Path) -> list[dict[str, Any]]:
    """The ``define_metric`` declarations: ``{"name" or "glob_name": ..., "step_metric": ...}``."""
    out = []
    for r in records(run_folder):
        if r.WhichOneof("record_type") == "metric":
            m = r.metric
            out.append({"name": m.name, "glob_name": m.glob_name, "step_metric": m.step_metric})
    return out
