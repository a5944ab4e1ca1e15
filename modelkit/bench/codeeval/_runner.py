"""The harness inside the sandbox: a small fork server (its source is given to ``python -c``).

It starts once per worker (inside bubblewrap when available), imports the modules
programs commonly use, then serves requests read from stdin (length-prefixed marshal):
for each program it forks one child, which

* becomes its own session and process group, gets ``/dev/null`` as stdin and files as
  stdout/stderr, a fresh working directory, and closes every other descriptor (so no
  program can hold the grader's pipes);
* drops to the sandbox uid when one is given, then sets its resource limits;
* reports that it started (a file, then closed), runs the program and its test in one
  namespace, and only when the test returned normally writes the per-run token to its
  result file and exits with the per-run exit code. Every other ending (an exception,
  ``sys.exit(0)``, ``os._exit(0)``, a signal) is therefore not a pass, whatever it prints.
  The functions it needs are bound to locals before the program runs and the test runs
  with a pristine copy of the builtins, so patching ``builtins``, ``os._exit`` or ``exec``
  cannot fake the ending.

The server waits for the child up to the wall-clock timeout, kills its process group and
then every process of the sandbox uid, and answers with the exit status, whether the run
started and passed, and the head of its output.

Limit (stated, not hidden): the program runs in the child's own interpreter, so a program
written against this harness (reading its frames) could forge the token; the sandbox
around it still confines what such a program can do to the machine.
"""
import builtins
import marshal
import os
import resource
import select
import signal
import sys
import time

PRELOAD = ("typing", "math", "re", "collections", "itertools", "functools", "string", "heapq", "hashlib",
           "bisect", "copy", "operator", "random", "fractions", "decimal", "statistics", "datetime", "traceback")
KEEP = 2000


def _read_exact(fd, n):
    chunks, left = [], n
    while left:
        chunk = os.read(fd, left)
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _recv(fd):
    return marshal.loads(_read_exact(fd, int.from_bytes(_read_exact(fd, 4), "little")))


def _send(fd, obj):
    data = marshal.dumps(obj)
    data = len(data).to_bytes(4, "little") + data
    while data:
        data = data[os.write(fd, data):]


def _no_new_privs():
    import ctypes

    if ctypes.CDLL(None, use_errno=True).prctl(38, 1, 0, 0, 0) != 0:   # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")


def _drop(uid):
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)          # all uids non-zero: every capability is cleared
    if os.getuid() != uid or os.geteuid() != uid:
        raise OSError("uid drop did not take effect")


def _kill_uid(uid):
    """SIGKILL every process of ``uid``: kill(-1) from a helper running as that uid."""
    pid = os.fork()
    if pid == 0:
        try:
            _drop(uid)
            os.kill(-1, signal.SIGKILL)
        except BaseException:
            pass
        os._exit(0)
    os.waitpid(pid, 0)


def _head(path, n=KEEP):
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def _ends(path, n=KEEP):
    """The whole output when it fits in ``n`` bytes, else its first and last halves: a
    traceback ends with what went wrong, however much was printed before it."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size <= n:
                return f.read(n)
            head = f.read(n // 2)
            f.seek(size - n // 2)
            return head + b"\n[... %d bytes left out ...]\n" % (size - n) + f.read(n // 2)
    except OSError:
        return b""


def _wait(pid, deadline):
    """The child's wait status, or None when the deadline passed first."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if pidfd is not None:
                select.select([pidfd], [], [], left)
            else:
                time.sleep(min(left, 0.005))
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _plain_guard(candidate, _type=type, _id=id, _list=list, _set=set, _dict=dict, _tuple=tuple,
                 _TypeError=TypeError, scalars=frozenset((int, float, complex, str, bytes, bool, type(None))),
                 sequences=frozenset((list, tuple, set, frozenset))):
    """``candidate`` wrapped so that it may only return plain values (builtin scalars and
    containers of them, exact types): an object whose ``__eq__`` always says True cannot
    pass a test of the form ``assert candidate(x) == y``. Every builtin it uses is bound
    when the server starts, before any program could patch one."""

    def plain(value):
        stack, seen = [(value, 0)], _set()
        while stack:
            v, depth = stack.pop()
            t = _type(v)
            if t in scalars:
                continue
            if depth > 100 or (t not in sequences and t is not _dict):
                return False
            if _id(v) in seen:
                continue
            seen.add(_id(v))
            items = _list(v.items()) if t is _dict else v
            for item in items:
                if _type(item) is _tuple and t is _dict:
                    stack.append((item[0], depth + 1))
                    stack.append((item[1], depth + 1))
                else:
                    stack.append((item, depth + 1))
        return True

    def guarded(*args, **kwargs):
        result = candidate(*args, **kwargs)
        if not plain(result):
            raise _TypeError("the candidate returned a %s, not a plain value" % _type(result).__name__)
        return result

    return guarded


def _child(req, cfg, work, fds, token, code):
    """In the forked child: isolate, drop, limit, run the program and its test."""
    _exit, _write, _close, _exec, _compile = os._exit, os.write, os.close, exec, compile
    _flush_out, _flush_err, _exc_info = sys.stdout.flush, sys.stderr.flush, sys.exc_info
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(fds["out"], 1)
    os.dup2(fds["err"], 2)
    start, result = os.dup(fds["start"]), os.dup(fds["result"])
    os.dup2(start, 3)
    os.dup2(result, 4)
    os.closerange(5, 1 << 16)            # the server's pipes and files, everything else
    os.chdir(work)
    os.environ["HOME"] = work
    if cfg["uid"] is not None:
        _drop(cfg["uid"])
    for name, soft, hard in req["rlimits"]:
        resource.setrlimit(getattr(resource, name), (soft, hard))
    try:
        program, syntax_error = _compile(req["program"], "program.py", "exec"), None
    except (SyntaxError, ValueError) as e:   # the program's own failure, reported after the start
        program, syntax_error = None, e
    test = _compile(req["test"], "test.py", "exec")
    entry_point, calls_check = req["entry_point"], req["calls_check"]
    _write(3, b"started")
    _close(3)
    pristine = dict(builtins.__dict__)
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    try:
        if program is None:
            raise syntax_error
        _exec(program, namespace)
        namespace["__builtins__"] = dict(pristine)
        _exec(test, namespace)
        if calls_check:
            namespace["check"](_plain_guard(namespace[entry_point]))
    except BaseException:
        try:
            import traceback

            kind, error, tb = _exc_info()
            traceback.print_exception(kind, error, tb.tb_next)      # from the program's frames on
            _flush_err()
        except BaseException:
            pass
        _exit(1)
    try:
        _flush_out()
        _flush_err()
    except BaseException:
        pass
    _write(4, token)
    _exit(code)


def _one(req, cfg, n):
    private = cfg["private"]
    work = os.path.join(cfg["work_root"], "run-%d" % n)
    os.mkdir(work, 0o700)
    if cfg["uid"] is not None:
        os.chown(work, cfg["uid"], cfg["uid"])
    paths = {k: os.path.join(private, k) for k in ("out", "err", "start", "result")}
    fds = {k: os.open(p, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600) for k, p in paths.items()}
    token, code = os.urandom(16).hex().encode(), 3 + int.from_bytes(os.urandom(2), "little") % 97
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            _child(req, cfg, work, fds, token, code)
        finally:
            os._exit(70)
    for fd in fds.values():
        os.close(fd)
    status = _wait(pid, t0 + req["timeout"])
    timed_out = status is None
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
    if cfg["uid"] is not None:
        _kill_uid(cfg["uid"])
    if timed_out:
        _, status = os.waitpid(pid, 0)
    seconds = time.monotonic() - t0
    rc = os.waitstatus_to_exitcode(status)
    reply = {"rc": rc, "timed_out": timed_out, "seconds": seconds,
             "started": _head(paths["start"], 16) == b"started",
             "passed": rc == code and _head(paths["result"], 64) == token,
             "stdout": _ends(paths["out"]).decode("utf-8", "replace"),
             "stderr": _ends(paths["err"]).decode("utf-8", "replace")}
    _remove(work)
    for shared in cfg["clean"]:          # the namespace's own /tmp, /dev/shm: nothing carries over
        _empty(shared)
    return reply


def _remove(path):
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _empty(folder):
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):
            _remove(path)
        else:
            try:
                os.unlink(path)
            except OSError:
                pass


def _main():
    cfg = _recv(0)
    if cfg.get("no_new_privs"):
        _no_new_privs()
    os.makedirs(cfg["private"], mode=0o700, exist_ok=True)
    os.makedirs(cfg["work_root"], exist_ok=True)
    for name in PRELOAD:                 # shared by every forked child (copy-on-write)
        try:
            __import__(name)
        except ImportError:
            pass
    _send(1, {"ready": True, "pid": os.getpid(), "uid": os.getuid()})
    n = 0
    while True:
        try:
            req = _recv(0)
        except EOFError:
            return
        n += 1
        _send(1, _one(req, cfg, n))


_main()
