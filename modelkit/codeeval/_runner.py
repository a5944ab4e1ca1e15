"""The harness that runs inside the sandbox (its source is passed to ``python -c``).

It reads its instructions from stdin (JSON), drops to the sandbox uid when asked, sets
its own resource limits, reports that it started (``start_fd``, then closed), runs the
program and its test in one namespace, and only when the test returned normally writes
the per-run token to ``result_fd`` and exits with the per-run exit code. Every other
ending (an exception, ``sys.exit(0)``, ``os._exit(0)``, a signal) is therefore not a pass,
whatever the program prints. The functions it needs are bound to locals before the
program runs, and the test runs with a pristine copy of the builtins, so a program that
patches ``builtins``, ``os._exit`` or ``exec`` cannot fake the ending.

Limit (stated, not hidden): the program runs in this process, so a program written
against this runner (reading its frames) could forge the token; the sandbox around the
process still confines what such a program can do to the machine.
"""
import builtins
import json
import os
import resource
import sys
import traceback


def _drop_to(uid):
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) != 0:          # PR_SET_NO_NEW_PRIVS: no setuid binary regains root
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)                  # all uids non-zero: every capability is cleared
    if os.getuid() != uid or os.geteuid() != uid:
        raise OSError("uid drop did not take effect")


def _main():
    _exit, _write, _close, _exec, _compile = os._exit, os.write, os.close, exec, compile
    _print_exception, _exc_info = traceback.print_exception, sys.exc_info
    _flush_out, _flush_err = sys.stdout.flush, sys.stderr.flush
    p = json.loads(sys.stdin.buffer.read())
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    if p.get("uid") is not None:
        _drop_to(p["uid"])
    for name, soft, hard in p["rlimits"]:
        resource.setrlimit(getattr(resource, name), (soft, hard))
    try:
        program, syntax_error = _compile(p["program"], "program.py", "exec"), None
    except (SyntaxError, ValueError) as e:    # the program's own failure, reported after the start
        program, syntax_error = None, e
    test = _compile(p["test"], "test.py", "exec")
    token, code, result_fd = p["token"].encode(), p["code"], p["result_fd"]
    entry_point, calls_check = p["entry_point"], p["calls_check"]
    _write(p["start_fd"], b"started")
    _close(p["start_fd"])
    del p
    pristine = dict(builtins.__dict__)
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    try:
        if program is None:
            raise syntax_error
        _exec(program, namespace)
        namespace["__builtins__"] = dict(pristine)
        _exec(test, namespace)
        if calls_check:
            namespace["check"](namespace[entry_point])
    except BaseException:
        try:
            kind, error, tb = _exc_info()
            _print_exception(kind, error, tb.tb_next)      # from the program's frames on
            _flush_err()
        except BaseException:
            pass
        _exit(1)
    try:
        _flush_out()
        _flush_err()
    except BaseException:
        pass
    _write(result_fd, token)
    _exit(code)


_main()
