"""Atomic output folders: build beside OUT, fsync, rename; nothing partial ever survives.

:func:`atomic_folder` yields a fresh temporary folder ``.{OUT}.partial-{pid}-{rand}`` in
OUT's parent (same filesystem, so the final ``rename`` is atomic). On success every file
and folder in it is fsynced and it is renamed to OUT; on any exception it is removed. A
process killed outright (SIGKILL, power loss) cannot clean up, so the next
:func:`atomic_folder` for the same OUT removes leftovers whose owning process is gone.
Either OUT does not exist or it is complete; an OUT replaced with ``force`` stays in place
until the new one is (see :func:`_publish`).
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from modelkit.errors import ExportError, OutputExistsError

_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?:partial|old)-(?P<pid>\d+)-[^/]+$")


def check_target(out: Path, *, force: bool = False, protect: Iterable[Path] = ()) -> Path:
    """``out`` made absolute, refused when it overlaps a protected folder (the source) or
    exists without ``force``."""
    out = Path(out).expanduser().absolute()
    real = out.resolve()
    for p in protect:
        if p is None:
            continue
        p = Path(p).resolve()
        if real == p or p in real.parents:
            raise ExportError(f"the output folder is inside the source {p}; modelkit never "
                              "writes into an artifact. Choose an OUT outside it", out)
        if real in p.parents:
            raise ExportError(f"the output folder contains the source {p}; replacing it would "
                              "delete the source. Choose another OUT", out)
    if (out.exists() or out.is_symlink()) and not force:
        raise OutputExistsError("already exists; pass force=True (--force) to replace it", out)
    if out.is_symlink() and force:
        raise ExportError("is a symlink; refusing to replace what it points to", out)
    return out


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask would set
    it for an instant, and files created by another thread meanwhile would get umask 022)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_folder(out: Path, *, force: bool = False, protect: Iterable[Path] = ()) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``out`` only if the block completes."""
    protect = list(protect)
    out = check_target(out, force=force, protect=protect)
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_leftovers(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; the result is an ordinary folder
    try:
        yield tmp
        fsync_tree(tmp)
        _publish(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish(tmp: Path, out: Path, force: bool) -> None:
    """Make ``tmp`` be ``out``. An existing ``out`` (with ``force``) is replaced
    transactionally: the old folder stays at OUT until the new one is there.

    Where the kernel has it (Linux ``renameat2(RENAME_EXCHANGE)``), the two folders swap
    names in one atomic step and the old one, now at ``tmp``, is deleted. Elsewhere the old
    OUT is first renamed into a stash ``.{OUT}.old-{pid}-*`` and put back if the second
    rename fails; a process killed between the two renames leaves the stash, which the next
    export restores (never deletes) when OUT is missing."""
    if not (out.exists() or out.is_symlink()):
        os.rename(tmp, out)
        fsync_dir(out.parent)
        return
    if not force:  # appeared while we were writing
        raise OutputExistsError("appeared while the export was running; nothing replaced", out)
    if exchange(tmp, out):
        fsync_dir(out.parent)
        shutil.rmtree(tmp, ignore_errors=True)  # the previous OUT, now under the temporary name
        return
    stash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
    os.rename(out, stash / "previous")
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(stash / "previous", out)  # restore, then let the error out
        os.rmdir(stash)
        raise
    fsync_dir(out.parent)
    shutil.rmtree(stash, ignore_errors=True)  # restored nothing: the new OUT is in place


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange(a: Path, b: Path) -> bool:
    """Swap the names of ``a`` and ``b`` atomically (Linux ``renameat2`` with
    ``RENAME_EXCHANGE``, through ctypes). False where the platform or filesystem has no
    such call (then nothing happened); other failures raise OSError."""
    import ctypes
    import ctypes.util
    import errno as _errno
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (_errno.ENOSYS, _errno.EINVAL, _errno.ENOTSUP, getattr(_errno, "EOPNOTSUPP", _errno.ENOTSUP)):
        return False
    raise OSError(err, os.strerror(err), str(b))


def sweep_leftovers(out: Path) -> list[Path]:
    """Clean up after exports whose process died: ``.{out}.partial-*`` folders are removed;
    a ``.{out}.old-*`` stash (the previous OUT, moved aside by the fallback replace) is put
    back when OUT is missing, and otherwise left alone: a stash is only ever deleted by the
    process that made it, after the new OUT is in place."""
    removed = []
    if not out.parent.is_dir():
        return removed
    for p in sorted(out.parent.iterdir()):
        m = _LEFTOVER.match(p.name)
        if m is None or m.group("name") != out.name or _alive(int(m.group("pid"))):
            continue
        if ".old-" in p.name:
            previous = p / "previous"
            if previous.exists() and not (out.exists() or out.is_symlink()):
                os.rename(previous, out)
                fsync_dir(out.parent)
                os.rmdir(p)
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under ``folder`` (folders after their contents)."""
    for root, _dirs, files in os.walk(folder, topdown=False):
        for name in files:
            fsync_file(Path(root) / name)
        fsync_dir(Path(root))


def fsync_file(path: Path) -> None:
    """fsync one written file, and give it the permissions of an ordinary file (0666 less
    the umask): some writers (safetensors) create files 0600."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """fsync a folder. Filesystems that do not support it (EINVAL, ENOTSUP) are fine; a
    real failure (EIO: the data may not be on disk) raises ExportError naming the folder."""
    import errno as _errno

    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (_errno.EINVAL, _errno.ENOTSUP, getattr(_errno, "EOPNOTSUPP", _errno.ENOTSUP), _errno.EBADF):
            raise ExportError(f"cannot flush the folder to disk ({e.strerror or e}); the export may "
                              "not survive a crash", path) from None
    finally:
        os.close(fd)
