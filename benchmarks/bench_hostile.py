"""Hostile-input budgets (issue 10): an index or header of N entries costs O(N).

* inspect of a sharded checkpoint whose index names 10^6 tensors no shard holds (the
  issue measured 52 s / 365 MB before: two Path.resolve() per entry); baseline in the
  same run: json.loads of that index, the unavoidable part;
* listing a 50,000-tensor safetensors header with modelkit's strict validation (2.2 s /
  560 MB before); baseline in the same run: the safetensors library's own key listing.

Each measurement runs in a fresh child process, so peak memory is its own.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from summary import at_most, finish, quick  # noqa: E402

_CHILD = r"""
import json, sys, time
from pathlib import Path
from modelkit.testing.fuzz import peak_mb, reset_peak
what, path = sys.argv[1], Path(sys.argv[2])
if what == "inspect":
    import modelkit
    modelkit.inspect(sys.argv[3])  # imports and caches warm, on the clean original
reset_peak()
r0 = peak_mb()
if what == "inspect":
    t = time.perf_counter(); report = modelkit.inspect(path); dt = time.perf_counter() - t
    assert "missing-tensors" in report.codes
elif what == "json":
    t = time.perf_counter(); json.loads(path.read_text()); dt = time.perf_counter() - t
elif what == "header":
    from modelkit.io.tensors import SafetensorsFile
    t = time.perf_counter(); n = len(SafetensorsFile(path).entries); dt = time.perf_counter() - t
else:
    from safetensors import safe_open
    t = time.perf_counter()
    with safe_open(str(path), "np") as f:
        n = len(list(f.keys()))
    dt = time.perf_counter() - t
print(json.dumps({"seconds": dt, "mb": peak_mb() - r0}))
"""


def measure(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    import numpy as np
    from safetensors.numpy import save_file

    from modelkit.testing import write_plain_hf

    entries = 20_000 if quick() else 1_000_000
    tensors = 2_000 if quick() else 50_000
    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as tmp:
        tmp = Path(tmp)
        clean = write_plain_hf(tmp / "clean", shards=3)
        art = write_plain_hf(tmp / "ghosts", shards=3)
        index_path = art / "model.safetensors.index.json"
        index = json.loads(index_path.read_text())
        shard = sorted(set(index["weight_map"].values()))[0]
        index["weight_map"].update({f"model.ghost.{i}.weight": shard for i in range(entries)})
        index_path.write_text(json.dumps(index))
        del index
        got, base = measure("inspect", str(art), str(clean)), measure("json", str(index_path))

        header = tmp / "many.safetensors"
        save_file({f"model.layers.{i}.weight": np.zeros(1, np.float32) for i in range(tensors)}, str(header))
        hdr, lib = measure("header", str(header)), measure("keys", str(header))
    figs = [
        at_most(f"inspect, index of {entries:,} ghost entries", got["seconds"], 10.0, "s",
                baseline="json.loads of the index", baseline_value=base["seconds"],
                note="before issue 10: 52 s for 10^6 entries"),
        at_most(f"inspect memory, index of {entries:,} entries", got["mb"], 600.0, "MB",
                baseline="json.loads of the index", baseline_value=base["mb"],
                note="before issue 10: 365 MB; the parsed index itself is most of it"),
        at_most(f"strict header of {tensors:,} tensors", hdr["seconds"], 1.5, "s",
                baseline="safetensors' own key listing", baseline_value=lib["seconds"],
                note="before issue 10: 2.2 s"),
        at_most(f"strict header memory, {tensors:,} tensors", hdr["mb"], 200.0, "MB",
                baseline="safetensors' own key listing", baseline_value=lib["mb"],
                note="before issue 10: 560 MB"),
    ]
    return finish("bench_hostile", figs)


if __name__ == "__main__":
    sys.exit(main())
