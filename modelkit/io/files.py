"""Reading the files of an untrusted artifact: confined, regular, bounded.

Every file modelkit reads or copies from an artifact (weights, configs, indexes,
tokenizer files, templates) goes through :func:`confine` and :func:`open_regular`:

* confined: the path, symlinks resolved, must lie under the artifact's trust root (the
  folder the user named, or the Hugging Face cache repo of a snapshot, whose files are
  symlinks into ``../../blobs``). A symlink to ``~/.ssh/id_rsa`` or ``/dev/zero`` is refused.
* regular: only regular files are opened, and they are opened with ``O_NONBLOCK`` first, so
  a FIFO, a device or a socket named ``config.json`` is refused instead of hanging.
* bounded: text files (configs, indexes) are read up to a size cap; JSON and YAML parse
  errors, recursion limits, oversized integers and YAML aliases become a
  :class:`~modelkit.errors.ConfigError` naming the file.

The trust root is passed explicitly where the caller knows it (``Artifact.trust_root``);
format detection, which only sees a folder, runs under :func:`trusting` (set by
``open_artifact``), and without either the file's own folder is the root.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import os
import shutil
import stat
from pathlib import Path
from typing import IO, Any, Iterator

from modelkit.errors import (
    ConfigError,
    CorruptFileError,
    ModelkitError,
    UnsafePathError,
)

MAX_CONFIG_BYTES = 16 * 1024 * 1024    # config.json, adapter_config.json, YAML settings
MAX_INDEX_BYTES = 256 * 1024 * 1024    # model.safetensors.index.json (10^6 entries ~ 70 MB)
MAX_COPY_BYTES = 1024 * 1024 * 1024    # a tokenizer file copied into an export

_TRUST_ROOT: contextvars.ContextVar[Path | None] = contextvars.ContextVar("modelkit_trust_root", default=None)


@contextlib.contextmanager
def trusting(root: Path | str) -> Iterator[Path]:
    """Within the block, files may be read anywhere under ``root`` (and nowhere else)."""
    resolved = Path(root).resolve()
    token = _TRUST_ROOT.set(resolved)
    try:
        yield resolved
    finally:
        _TRUST_ROOT.reset(token)


def current_root() -> Path | None:
    """The trust root set by :func:`trusting`, if any."""
    return _TRUST_ROOT.get()


def default_root(path: Path | str) -> Path:
    """The trust root of a file when no caller named one: the Hugging Face cache repo
    (``models--org--name/``) for a file of one of its snapshots (snapshot files are
    symlinks into ``../../blobs``), else the folder holding the file."""
    path = Path(path).absolute()
    for ancestor in path.parents:
        if ancestor.name == "snapshots" and ancestor.parent.name.startswith(("models--", "datasets--", "spaces--")):
            return ancestor.parent
    return path.parent


def confine(path: Path | str, root: Path | str | None = None) -> Path:
    """``path`` with symlinks resolved; UnsafePathError when it leaves ``root``.

    ``root`` defaults to the :func:`trusting` root, else :func:`default_root`.
    A path that cannot be resolved (a symlink loop, a NUL byte, a name too long) is an
    UnsafePathError too: it names the file and says why.
    """
    path = Path(path)
    if root is None:
        root = current_root() or default_root(path)
    try:
        root_resolved = Path(root).resolve()
        resolved = path.resolve()
    except (OSError, RuntimeError, ValueError) as e:  # ELOOP, ENAMETOOLONG, embedded NUL
        raise UnsafePathError(f"cannot resolve the path ({_why(e)})", path) from None
    if resolved != root_resolved and not resolved.is_relative_to(root_resolved):
        raise UnsafePathError(
            f"points outside the artifact folder {root_resolved} (to {resolved}); "
            "modelkit only reads files inside the artifact", path)
    return resolved


def open_regular(path: Path | str, root: Path | str | None = None, *,
                 error: type[ModelkitError] = CorruptFileError, confined: bool = True) -> IO[bytes]:
    """The confined ``path`` opened for binary reading, refused unless it is a regular file.

    ``error`` is the class raised for a missing, unreadable or non-regular file
    (CorruptFileError for weights, ConfigError for configs). ``confined=False`` skips the
    trust-root check, for paths the caller has already confined (``Artifact.path``)."""
    real = confine(path, root) if confined else Path(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(real, flags)
    except FileNotFoundError:
        raise error("file is missing", path) from None
    except OSError as e:
        raise error(f"cannot open the file ({_why(e)})", path) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"is not a regular file ({_kind(st.st_mode)}); modelkit reads only regular files", path)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def is_regular(path: Path | str, root: Path | str | None = None) -> bool:
    """Whether ``path`` is a regular file inside the trust root (never raises)."""
    try:
        real = confine(path, root)
        return stat.S_ISREG(os.stat(real).st_mode)
    except (ModelkitError, OSError, ValueError):
        return False


def read_bytes(path: Path | str, root: Path | str | None = None, *, limit: int = MAX_CONFIG_BYTES,
               error: type[ModelkitError] = ConfigError) -> bytes:
    """The whole file (confined, regular), refused when larger than ``limit`` bytes."""
    with open_regular(path, root, error=error) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise error(f"is {size:,} bytes, over modelkit's limit of {limit:,} for this kind of file", path)
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise error(f"cannot read the file ({_why(e)})", path) from None
    if len(data) > limit:
        raise error(f"is over modelkit's limit of {limit:,} bytes for this kind of file", path)
    return data


def read_text(path: Path | str, root: Path | str | None = None, *, limit: int = MAX_CONFIG_BYTES,
              error: type[ModelkitError] = ConfigError) -> str:
    """The file as UTF-8 text (see :func:`read_bytes`)."""
    data = read_bytes(path, root, limit=limit, error=error)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"is not UTF-8 text ({e.reason} at byte {e.start})", path) from None


def parse_json(text: str | bytes, path: Path | str | None, *, error: type[ModelkitError] = ConfigError) -> Any:
    """``json.loads`` whose every failure (syntax, nesting too deep, a 5,000-digit integer,
    a BOM) is ``error`` naming ``path``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"malformed JSON at line {e.lineno} column {e.colno}: {e.msg}", path) from None
    except RecursionError:
        raise error("not valid JSON for modelkit: nested too deeply", path) from None
    except (ValueError, UnicodeDecodeError) as e:  # int digit limit, bad encoding
        raise error(f"not valid JSON: {_why(e)}", path) from None


def read_json(path: Path | str, root: Path | str | None = None, *, limit: int | None = None,
              error: type[ModelkitError] = ConfigError) -> Any:
    """Parse a JSON file (confined, regular, bounded; indexes get the larger cap)."""
    if limit is None:
        limit = MAX_INDEX_BYTES if str(path).endswith(".index.json") else MAX_CONFIG_BYTES
    return parse_json(read_text(path, root, limit=limit, error=error), path, error=error)


def read_yaml(path: Path | str, root: Path | str | None = None, *, limit: int = MAX_CONFIG_BYTES,
              error: type[ModelkitError] = ConfigError) -> Any:
    """Parse a YAML file with the safe loader, aliases refused (a few hundred bytes of
    nested aliases expand to billions of nodes for whoever walks the result)."""
    import yaml

    text = read_text(path, root, limit=limit, error=error)
    with _yaml_errors(path, error):
        try:
            return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
        except ValueError as e:
            raise error(f"not valid YAML ({_why(e)})", path) from None


@contextlib.contextmanager
def _yaml_errors(path: Path | str | None, error: type[ModelkitError]) -> Iterator[None]:
    """A YAML parse error or a too deep nesting as ``error`` naming ``path``."""
    import yaml

    try:
        yield
    except yaml.YAMLError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise error(f"not valid YAML ({first})", path) from None
    except RecursionError:
        raise error("not valid YAML for modelkit: nested too deeply", path) from None


MAX_YAML_NODES = 1_000_000


def check_yaml_expansion(text: str, path: Path | str | None, *, limit: int = MAX_YAML_NODES,
                         error: type[ModelkitError] = ConfigError) -> None:
    """Refuse YAML whose aliases expand to more than ``limit`` nodes for whoever walks the
    result (a few hundred bytes of nested aliases are billions of nodes). For loaders that
    must accept aliases (omegaconf dumps refer back to ``_parent``): the composed node graph
    is sized with memoization, ``_parent`` links and cycles counted once."""
    import yaml

    with _yaml_errors(path, error):
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    if root is None:
        return
    sizes: dict[int, int] = {}
    # iterative post-order over the graph: (node, children pushed?)
    stack: list[tuple[Any, bool]] = [(root, False)]
    in_progress: set[int] = set()
    while stack:
        node, expanded = stack.pop()
        key = id(node)
        if key in sizes:
            continue
        children = _yaml_children(node)
        if not expanded:
            if key in in_progress:  # a cycle: counted once
                sizes[key] = 1
                continue
            in_progress.add(key)
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in sizes and id(c) not in in_progress)
            continue
        in_progress.discard(key)
        sizes[key] = 1 + sum(sizes.get(id(c), 1) for c in children)
        if sizes[key] > limit:
            raise error(f"YAML aliases expand to over {limit:,} nodes; refused", path)


def _yaml_children(node: Any) -> list:
    import yaml

    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [v for k, v in node.value if not (isinstance(k, yaml.ScalarNode) and k.value == "_parent")]
    return []


def read_config(path: Path | str, root: Path | str | None = None, **kw) -> Any:
    """JSON or YAML by suffix."""
    if Path(path).suffix in (".yaml", ".yml"):
        return read_yaml(path, root, **kw)
    return read_json(path, root, **kw)


def copy_confined(src: Path | str, dst: Path | str, root: Path | str | None = None, *,
                  limit: int = MAX_COPY_BYTES) -> None:
    """Copy a file of the artifact into an export: confined and regular like every read."""
    with open_regular(src, root, error=UnsafePathError) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise ConfigError(f"is {size:,} bytes, over modelkit's limit of {limit:,} for a copied file", src)
        with open(dst, "wb") as out:
            shutil.copyfileobj(f, out)


def check_files(folder: Path | str, names, root: Path | str | None = None) -> list[Path]:
    """The files among ``names`` present in ``folder``, each checked to be a regular file
    inside ``root`` (raises UnsafePathError / CorruptFileError otherwise). For folders
    handed to a library that reads them itself (a tokenizer for ``AutoTokenizer``)."""
    present = []
    for name in names:
        p = Path(folder) / name
        if os.path.lexists(p):
            open_regular(p, root, error=UnsafePathError).close()
            present.append(p)
    return present


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a plain file"


def _why(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _make_no_alias_loader():
    import yaml

    class NoAliasLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):  # noqa: ANN001 - PyYAML's signature
            if self.check_event(yaml.AliasEvent):
                event = self.get_event()
                raise yaml.composer.ComposerError(None, None, f"YAML alias *{event.anchor} refused",
                                                  event.start_mark)
            return super().compose_node(parent, index)

    return NoAliasLoader


class _LazyLoader:
    """PyYAML imported on first use (``import modelkit`` stays cheap)."""

    _cls = None

    def __call__(self, stream):
        if _LazyLoader._cls is None:
            _LazyLoader._cls = _make_no_alias_loader()
        return _LazyLoader._cls(stream)


_NoAliasLoader = _LazyLoader()
