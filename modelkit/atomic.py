"""Atomic output folders: build beside OUT, fsync, rename; nothing partial ever survives.

:func:`atomic_folder` yields a fresh temporary folder ``.{OUT}.partial-{pid}-{rand}`` in
OUT's parent (same filesystem, so the final ``rename`` is atomic). On success every file
and folder in it is fsynced and it is renamed to OUT; on any exception it is removed. A
process killed outright (SIGKILL, power loss) cannot clean up, so the next
:func:`atomic_folder` for the same OUT removes leftovers whose owning process is gone.
Either OUT does not exist or it is complete.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from .errors import ExportError, OutputExistsError

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
    mask = os.umask(0)
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
    """Rename ``tmp`` to ``out`` (moving an existing ``out`` aside first with ``force``)."""
    old = None
    if out.exists() or out.is_symlink():
        if not force:  # appeared while we were writing
            raise OutputExistsError("appeared while the export was running; nothing replaced", out)
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
        os.rename(out, old / "previous")
    os.rename(tmp, out)
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def sweep_leftovers(out: Path) -> list[Path]:
    """Remove ``.{out}.partial-*`` / ``.old-*`` folders left by processes that died."""
    removed = []
    if not out.parent.is_dir():
        return removed
    for p in out.parent.iterdir():
        m = _LEFTOVER.match(p.name)
        if m is None or m.group("name") != out.name or _alive(int(m.group("pid"))):
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
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories
    finally:
        os.close(fd)
