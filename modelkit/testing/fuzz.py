"""Run one modelkit operation on a hostile artifact and judge the outcome (the fuzz suite).

:func:`run_case` copies nothing and mutates nothing itself: the caller (``tests/test_fuzz.py``,
Hypothesis strategies) writes the damaged artifact, then ``run_case`` runs ``inspect`` (and
optionally ``export``) on it in a **forked child** of the test process, so that

* a hang is a hang (the parent kills the child after ``seconds`` and records ``hang``),
* a memory blow-up is caught without hurting the machine: the child's address space is
  capped (``RLIMIT_AS``) a fixed budget above what it had at the fork, and its peak
  resident memory above that is measured,
* nothing the operation does to the interpreter leaks into the next case.

The parent then checks what the child cannot vouch for itself: the source is byte for
byte unchanged, no code from the artifact ran (a sentinel file a hostile pickle would
create), nothing from outside the artifact is in the output (a secret planted beside
it), and the output folder is absent or complete.

Outcome kinds: ``report`` and ``error`` (a typed ModelkitError) are fine; ``traceback``,
``hang``, ``memory``, ``escape``, ``executed``, ``modified`` and ``partial`` are failures.
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import stat
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

FINE = ("report", "error")
FAILURES = ("traceback", "hang", "memory", "escape", "executed", "modified", "partial")
SECRET = b"MODELKIT-FUZZ-SECRET-5f1c0b7e"   # planted outside the artifact; must never be copied
SENTINEL = "EXECUTED"                        # a hostile pickle's REDUCE would create this


@dataclass
class Outcome:
    kind: str                      # one of FINE + FAILURES
    detail: str = ""               # error type and message, or what went wrong
    seconds: float = 0.0
    rss_mb: float = 0.0            # child's peak resident memory above its size at the fork
    operations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.kind in FINE

    def to_dict(self) -> dict:
        return asdict(self)


def tree_digest(folder: Path) -> str:
    """sha256 over every entry under ``folder``: names, kinds, symlink targets, and the
    bytes of regular files (FIFOs and devices are never opened)."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]):
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            h.update(f"{os.path.relpath(p, folder)}\0{stat.S_IFMT(st.st_mode)}\0".encode())
            if stat.S_ISLNK(st.st_mode):
                h.update(os.readlink(p).encode())
            elif stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
    return h.hexdigest()


def plant_secret(folder: Path) -> Path:
    """A secret file beside the artifact folder (what an escaping symlink would point at)."""
    p = Path(folder).parent / "secret-token.txt"
    p.write_bytes(SECRET)
    return p


def run_case(folder: Path, *, out: Path | None = None, base: Path | None = None,
             seconds: float = 30.0, memory_mb: int = 1024, sentinel_root: Path | None = None) -> Outcome:
    """Inspect ``folder`` (and export it to ``out`` when given) in a forked child; judge."""
    folder = Path(folder)
    before = tree_digest(folder)
    t0 = time.perf_counter()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(read_fd)
        _child(write_fd, folder, out, base, seconds, memory_mb)
    os.close(write_fd)
    outcome = _wait(pid, read_fd, seconds + 10)
    outcome.seconds = time.perf_counter() - t0
    return _judge(outcome, folder, out, before, sentinel_root or folder.parent)


def _child(fd: int, folder: Path, out: Path | None, base: Path | None, seconds: float, memory_mb: int) -> None:
    result: dict = {}
    try:
        vm = _vm_bytes()
        if vm:
            _, hard = resource.getrlimit(resource.RLIMIT_AS)
            soft = vm + memory_mb * 2**20
            resource.setrlimit(resource.RLIMIT_AS, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))
        signal.signal(signal.SIGALRM, signal.SIG_DFL)  # the parent also kills on its own clock
        signal.alarm(int(seconds) + 1)
        reset_peak()
        rss0 = _rss_mb()
        import modelkit
        from modelkit.errors import ModelkitError

        ops = []
        try:
            ops.append("inspect")
            report = modelkit.inspect(folder, base=base)
            text = report.to_json()
            kind, detail = "report", f"{len(report.findings)} finding(s): {sorted(report.codes)}"
            if SECRET.decode() in text:
                kind, detail = "escape", "the secret appears in the inspection report"
            if out is not None and kind == "report":
                ops.append("export")
                try:
                    modelkit.export(folder, out, base=base, progress=False, allow_untrained=True)
                except ModelkitError as e:
                    detail += f"; export refused: {type(e).__name__}: {e.problem[:200]}"
        except ModelkitError as e:
            kind, detail = "error", f"{type(e).__name__}: {str(e)[:300]}"
        except MemoryError:
            kind, detail = "memory", "MemoryError under the address-space cap"
        except RecursionError as e:
            kind, detail = "traceback", f"RecursionError: {str(e)[:200]}"
        except Exception as e:  # noqa: BLE001 - exactly what the fuzz suite looks for
            import traceback

            kind, detail = "traceback", f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}"
        rss = _rss_mb() - rss0
        if kind in FINE and rss > memory_mb / 2:
            kind, detail = "memory", f"peak resident memory grew by {rss:.0f} MB"
        result = {"kind": kind, "detail": detail, "rss_mb": rss, "operations": ops}
    except BaseException as e:  # noqa: BLE001
        result = {"kind": "traceback", "detail": f"runner: {type(e).__name__}: {e}"}
    try:
        os.write(fd, json.dumps(result, default=str).encode())
    finally:
        os._exit(0)


def _wait(pid: int, fd: int, limit: float) -> Outcome:
    deadline = time.monotonic() + limit
    chunks = []
    os.set_blocking(fd, False)
    status = None
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
            if chunk:
                chunks.append(chunk)
        except BlockingIOError:
            pass
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(fd)
            return Outcome("hang", f"still running after {limit:.0f}s; killed")
        time.sleep(0.005)
    try:
        while True:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    except BlockingIOError:
        pass
    os.close(fd)
    if not chunks:
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            if sig == signal.SIGALRM:
                return Outcome("hang", "over its time budget (SIGALRM)")
            return Outcome("memory" if sig == signal.SIGKILL else "traceback", f"child killed by signal {sig}")
        return Outcome("traceback", f"child exited with status {status} and no result")
    data = json.loads(b"".join(chunks))
    return Outcome(data["kind"], data.get("detail", ""), rss_mb=data.get("rss_mb", 0.0),
                   operations=data.get("operations", []))


def _judge(outcome: Outcome, folder: Path, out: Path | None, before: str, sentinel_root: Path) -> Outcome:
    """What the parent sees: executed and modified outrank whatever the child reported."""
    if tree_digest(folder) != before:
        return Outcome("modified", "the source artifact changed", outcome.seconds, outcome.rss_mb, outcome.operations)
    if any(sentinel_root.rglob(SENTINEL)):
        return Outcome("executed", "the sentinel file exists: code from the artifact ran", outcome.seconds,
                       outcome.rss_mb, outcome.operations)
    if out is not None and outcome.kind != "hang":
        problem = _output_problem(Path(out))
        if problem:
            kind = "escape" if problem.startswith("escape") else "partial"
            return Outcome(kind, problem, outcome.seconds, outcome.rss_mb, outcome.operations)
    return outcome


def _output_problem(out: Path) -> str | None:
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    if leftovers:
        return f"temporary folders left beside OUT: {leftovers}"
    if not out.exists():
        return None
    for p in out.rglob("*"):
        if p.is_symlink():
            return f"escape: {p} is a symlink in the export"
        if p.is_file() and SECRET in p.read_bytes():
            return f"escape: the secret was copied into {p}"
    if not (out / "modelkit_export.json").is_file():
        return "OUT exists without its export record"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    missing = sorted({s for s in index["weight_map"].values() if not (out / s).is_file()})
    return f"OUT lacks shards {missing}" if missing else None


def _vm_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reset_peak() -> None:
    """Start peak-memory measurement afresh: a forked (or exec'ed) process inherits its
    parent's high-water mark, so ``ru_maxrss`` would hide anything below the parent's peak.
    Linux resets ``VmHWM`` when 5 is written to ``/proc/self/clear_refs``."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_mb() -> float:
    """Peak resident memory since :func:`reset_peak` (``VmHWM``), else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mb() -> float:
    return peak_mb()


__all__ = ["FAILURES", "FINE", "Outcome", "SECRET", "SENTINEL", "plant_secret", "run_case", "tree_digest"]
