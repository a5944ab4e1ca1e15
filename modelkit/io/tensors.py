"""Lazy, safe access to tensors stored in files: metadata first, data only on request.

Two file kinds cover every layout modelkit knows:

* ``.safetensors``: the header is parsed (shapes, dtypes, offsets are validated by the
  safetensors library); no tensor data is read until :meth:`TensorFile.read`.
* torch pickles (``.pt`` / ``.bin``): ``torch.load(weights_only=True, mmap=True)``, so
  nothing but tensors and plain containers can be unpickled, and tensor storage stays on
  disk until touched. Nested dicts and lists are flattened to dotted keys
  (``wrappers.0.U_in``).

Every failure becomes a :class:`~modelkit.errors.CorruptFileError` or
:class:`~modelkit.errors.UnsafePickleError` naming the file.
"""
from __future__ import annotations

import collections
import contextlib
import io
import json
import math
import os
import pickle
import stat
import struct
import sys
import weakref
import zipfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

from modelkit.errors import CorruptFileError, LoadError, UnsafePickleError
from modelkit.io.zipmembers import read_zip_member

# safetensors dtype tags -> torch dtype names (the names used everywhere in modelkit)
SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "U16": "uint16", "U32": "uint32", "U64": "uint64",
}
DTYPE_BYTES = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4,
    "int16": 2, "int8": 1, "uint8": 1, "bool": 1, "float8_e4m3fn": 1, "float8_e5m2": 1,
    "uint16": 2, "uint32": 4, "uint64": 8,
}
FLOAT_DTYPES = {"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"}
MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit (MAX_HEADER_SIZE in its Rust code)
MAX_PICKLE_BYTES = 128 * 1024 * 1024  # a zip pickle's data.pkl (a 50k-tensor state dict: ~8 MB)
MAX_NODES = 4_000_000  # containers and leaves walked in one pickle's structure
MAX_DEPTH = 200        # nesting of dicts / lists in one pickle
_U64 = 2**64
_I63 = 2**63


DTYPE_ALIASES = {"float": "float32", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def torch_dtype(dtype: Any, *, floating: bool = False):
    """The one dtype parser: a torch dtype (as is), None (None), or a name such as
    ``"bfloat16"``, ``"torch.bfloat16"`` or an alias (``bf16``, ``fp16``, ``half``,
    ``fp32``, ``float``). ``floating`` refuses non-floating dtypes (a model's dtype).
    LoadError naming the value on anything else."""
    import torch

    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        value = dtype
    else:
        name = dtype_name(dtype)
        value = getattr(torch, DTYPE_ALIASES.get(name, name), None) if name.isidentifier() else None
    if not isinstance(value, torch.dtype) or (floating and not value.is_floating_point):
        if floating:
            raise LoadError(f"unknown floating dtype {dtype!r}; use float32, bfloat16 or float16")
        raise LoadError(f"unknown dtype {dtype!r}")
    return value


def dtype_name(dtype: Any) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``; strings pass through."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True, init=False)
class StoredTensor:
    """One tensor as it lies on disk: metadata only."""

    name: str          # the name the format gives it (a state-dict key, or a dotted path)
    shape: tuple[int, ...]
    dtype: str         # torch dtype name, e.g. "bfloat16"
    file: str          # path relative to the artifact folder
    key: str           # key inside the file (dotted for nested pickles)

    # Own __init__: a frozen dataclass's generated one sets each field through
    # object.__setattr__ (0.9 us a record; a real compressed MoE builds 1.5 * 10^5 of them).
    # Writing the instance dict directly is what that amounts to, at a quarter of the cost.
    def __init__(self, name: str, shape: tuple[int, ...], dtype: str, file: str, key: str):
        d = self.__dict__
        d["name"] = name
        d["shape"] = shape
        d["dtype"] = dtype
        d["file"] = file
        d["key"] = key

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.numel, self.dtype)


def tensor_bytes(numel: int, dtype: str) -> int:
    """Bytes of ``numel`` elements of ``dtype`` (a dtype this kit does not know counts 4 a element)."""
    return numel * DTYPE_BYTES.get(dtype, 4)


def check_inside(root: Path, path: Path) -> Path:
    """``path`` resolved, refused with UnsafePathError when it leaves ``root``."""
    from modelkit.io.files import confine

    return confine(path, root)


_OPEN: "weakref.WeakSet[TensorFile]" = weakref.WeakSet()
_READ_LOGS: list[set[tuple[str, str]]] = []   # open recording_reads() blocks (any thread reads)


@contextlib.contextmanager
def recording_reads() -> Iterator[set[tuple[str, str]]]:
    """Record every stored tensor read (``(file path, key)``) while the block runs, in any
    thread: what a load consumed is what it read, whatever the format's producers do."""
    seen: set[tuple[str, str]] = set()
    _READ_LOGS.append(seen)
    try:
        yield seen
    finally:
        _READ_LOGS.remove(seen)


def _note_read(path: Path, key: str) -> None:
    for seen in list(_READ_LOGS):
        seen.add((str(path), key))


def release_all() -> None:
    """Release every open :class:`TensorFile`. A streaming writer calls this between
    shards: pages of memory-mapped source files it has consumed count in its resident
    memory for as long as the maps live, and would otherwise add up to the whole source."""
    for f in list(_OPEN):
        f.release()


class TensorFile:
    """A weight file: ``entries`` (metadata) now, ``read(key)`` (data) later."""

    def __init__(self, path: Path, rel: str | None = None):
        self.path = Path(path)
        self.rel = rel or self.path.name
        _OPEN.add(self)

    def release(self) -> None:
        """Drop the open handle or unpickled object (and its memory map); the metadata stays
        and the data reopens on the next read. Tensors already returned stay valid."""
        for attr in ("_handle", "_pread_handle", "obj"):
            self.__dict__.pop(attr, None)

    @staticmethod
    def open(path: Path, rel: str | None = None) -> "TensorFile":
        if Path(path).suffix == ".safetensors":
            return SafetensorsFile(path, rel)
        return PickleFile(path, rel)

    @property
    def entries(self) -> dict[str, StoredTensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def read(self, key: str):  # pragma: no cover - abstract
        raise NotImplementedError

    def read_unmapped(self, key: str):
        """``read(key)`` into memory of its own, leaving no page of the file mapped: for a
        consumer that reads a large tensor once (an export), so the file's pages do not
        add to its resident memory. Safetensors files use ``pread``; others copy."""
        return self.read(key).clone()

    def stored(self, prefix: str = "") -> list[StoredTensor]:
        """The file's tensors, names prefixed with ``prefix``."""
        if not prefix:
            return list(self.entries.values())
        return [StoredTensor(prefix + t.name, t.shape, t.dtype, t.file, t.key)
                for t in self.entries.values()]


def safetensors_header(path: Path, *, confined: bool = True) -> tuple[dict, int, int]:
    """The one reader of a safetensors header: ``(its JSON object, the byte offset the data
    starts at, the file's size)``. Checked here: a regular file, an 8-byte little-endian
    length within the format's limit and the file, UTF-8 JSON starting with ``{`` (no BOM),
    an object with unique keys; CorruptFileError naming the file otherwise. The entries are
    checked by :class:`SafetensorsFile`. ``confined=False`` for an already confined path."""
    from modelkit.io.files import open_regular

    with open_regular(path, error=CorruptFileError, confined=confined) as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise CorruptFileError(f"truncated safetensors file ({size} bytes, no header)", path)
        try:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER_BYTES or n > size - 8:
                raise CorruptFileError(
                    f"safetensors header length {n} is impossible for a file of {size} bytes "
                    "(truncated or not a safetensors file)", path)
            raw = f.read(n)
        except OSError as e:
            raise CorruptFileError(f"cannot read the header ({e.strerror or e})", path) from None
    if not raw.startswith(b"{"):
        raise CorruptFileError("safetensors header does not start with '{' (a BOM or other bytes "
                               "before the JSON; the safetensors library refuses it)", path)
    try:
        text = raw.decode("utf-8")
        header = json.loads(text)
        # a duplicated tensor name leaves fewer entries than "data_offsets" keys; only then
        # is the header parsed again, slowly, to name the duplicate
        if isinstance(header, dict) and raw.count(b'"data_offsets"') != len(header) - ("__metadata__" in header):
            header = json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        raise CorruptFileError(f"safetensors header names {e.args[0]!r} twice", path) from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CorruptFileError(f"safetensors header is not valid JSON ({_first_line(e)})", path) from None
    if not isinstance(header, dict):
        raise CorruptFileError("safetensors header is not a JSON object", path)
    return header, 8 + n, size


class SafetensorsFile(TensorFile):
    """A ``.safetensors`` file; header validated before anything else is trusted.

    The checks are those of the safetensors format and its Rust implementation
    (``Metadata::validate``), which the library applies only when a file is opened for
    reading: an 8-byte little-endian header length within the format's limit, a UTF-8 JSON
    object starting with ``{`` (no BOM), unique keys, ``__metadata__`` a str -> str map,
    known dtypes, shapes and offsets unsigned 64-bit integers, each tensor's byte length
    equal to its element count times its dtype size (with no overflow), and the tensors,
    sorted by offset, covering the data buffer exactly: no hole, no overlap, no trailing
    byte. Anything else is a CorruptFileError naming the file.
    """

    def _parse_header(self) -> tuple[dict, dict[str, str], int]:
        # Artifact.path() confined the path; here only "a regular file" is checked
        header, start, size = safetensors_header(self.path, confined=False)
        metadata = header.pop("__metadata__", None)
        if metadata is None:
            metadata = {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise CorruptFileError("safetensors __metadata__ is not a map of strings to strings", self.path)
        spans = []
        for name, meta in header.items():
            spans.append(self._check_entry(name, meta))
        spans.sort()
        pos = 0
        for begin, end, name in spans:
            if begin != pos:
                what = "overlaps the previous tensor" if begin < pos else f"leaves a hole of {begin - pos} bytes before it"
                raise CorruptFileError(f"tensor {name!r} starts at byte {begin}: it {what} "
                                       "(tensors must cover the data buffer exactly)", self.path)
            pos = end
        data_size = size - start
        if pos != data_size:
            if pos > data_size:
                raise CorruptFileError(
                    f"tensors need {pos} data bytes but the file holds {data_size} after the header "
                    "(truncated file?)", self.path)
            raise CorruptFileError(f"{data_size - pos} trailing bytes after the last tensor "
                                   "(the safetensors library refuses the file)", self.path)
        return header, metadata, start

    def _check_entry(self, name: str, meta: Any) -> tuple[int, int, str]:
        if not isinstance(meta, dict) or not {"dtype", "shape", "data_offsets"} <= meta.keys():
            raise CorruptFileError(f"tensor {name!r} has a malformed header entry {_short(meta)}", self.path)
        dtype = SAFETENSORS_DTYPES.get(meta["dtype"]) if isinstance(meta["dtype"], str) else None
        if dtype is None:
            raise CorruptFileError(f"tensor {name!r} has an unknown dtype {_short(meta['dtype'])}", self.path)
        shape, offsets = meta["shape"], meta["data_offsets"]
        if not (isinstance(shape, list) and all(type(d) is int and 0 <= d < _U64 for d in shape)):
            raise CorruptFileError(f"tensor {name!r} has shape {_short(shape)}: dimensions must be "
                                   "unsigned integers", self.path)
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(type(o) is int and 0 <= o < _U64 for o in offsets)):
            raise CorruptFileError(f"tensor {name!r} has data_offsets {_short(offsets)}: two unsigned "
                                   "integers expected", self.path)
        begin, end = offsets
        if end < begin:
            raise CorruptFileError(f"tensor {name!r} has offsets [{begin}, {end}) that end before they begin",
                                   self.path)
        nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
        if nbytes >= _U64:
            raise CorruptFileError(f"tensor {name!r}: shape {shape} overflows 64-bit sizes", self.path)
        if end - begin != nbytes:
            raise CorruptFileError(
                f"tensor {name!r}: offsets hold {end - begin} bytes but shape {shape} "
                f"of {dtype} needs {nbytes}", self.path)
        return begin, end, name

    @cached_property
    def _parsed(self) -> tuple[dict, dict[str, str], int]:
        return self._parse_header()

    @cached_property
    def entries(self) -> dict[str, StoredTensor]:
        header = self._parsed[0]
        rel = self.rel
        return {name: StoredTensor(name, tuple(meta["shape"]), SAFETENSORS_DTYPES[meta["dtype"]], rel, name)
                for name, meta in header.items()}

    @cached_property
    def metadata(self) -> dict[str, str]:
        return self._parsed[1]

    def span(self, key: str) -> tuple[int, int]:
        """(absolute byte offset, byte length) of tensor ``key``'s data in the file (header
        validated first)."""
        header, _, start = self._parsed
        begin, end = header[key]["data_offsets"]
        return start + begin, end - begin

    @cached_property
    def _handle(self):
        return self._open("mmap")

    @cached_property
    def _pread_handle(self):
        return self._open("pread")

    def _open(self, backend: str):
        from safetensors import safe_open

        self.entries  # validate first: never hand a bad header to the reader
        try:
            return safe_open(str(self.path), framework="pt", device="cpu", backend=backend)
        except Exception as e:  # safetensors raises its own Rust-side error types
            raise CorruptFileError(f"cannot open safetensors file: {e}", self.path) from None

    def read(self, key: str):
        return self._get(key, mapped=True)

    def read_unmapped(self, key: str):
        return self._get(key, mapped=False)

    def raw_span(self, key: str) -> tuple[Path, int, int]:
        """``(path, absolute byte offset, byte length)`` of tensor ``key``'s data, noted as a
        read (:func:`recording_reads`): for a writer that copies the stored bytes unchanged
        from file to file (an export's copy of an unmerged tensor), never mapping them."""
        _note_read(self.path, key)
        if key not in self.entries:
            raise KeyError(f"{self.path}: no tensor {key!r}")
        return (self.path, *self.span(key))

    def _get(self, key: str, mapped: bool):
        _note_read(self.path, key)
        if key not in self.entries:
            raise KeyError(f"{self.path}: no tensor {key!r}")
        try:
            return (self._handle if mapped else self._pread_handle).get_tensor(key)
        except Exception as e:
            raise CorruptFileError(f"cannot read tensor {key!r}: {e}", self.path) from None


class PickleFile(TensorFile):
    """A torch pickle (``.pt`` / ``.bin``), loaded with ``weights_only=True``."""

    @cached_property
    def obj(self) -> Any:
        """The unpickled object (tensors memory-mapped where the file allows)."""
        return load_pickle(self.path)

    @cached_property
    def skeleton(self) -> Any:
        """The pickle's structure with tensors as :class:`TensorHeader` (no torch import,
        no storage touched), or None when the file is not a plain zip-format tensor pickle
        (then everything goes through ``obj``, i.e. ``torch.load``)."""
        return read_pickle_skeleton(self.path)

    @cached_property
    def _leaves(self) -> tuple[dict[str, StoredTensor], dict[str, Any]]:
        """(tensors, scalars) by dotted key, from one walk of the structure (a layer file of
        a real compressed MoE holds ~500 tensors; walking it once per question doubled the cost)."""
        tree = self.skeleton if self.skeleton is not None else self.obj
        tensors: dict[str, StoredTensor] = {}
        scalars: dict[str, Any] = {}
        rel = self.rel
        for key, leaf in walk(tree, path=self.path):
            if type(leaf) is TensorHeader:  # the skeleton's: shape a tuple, dtype a name already
                tensors[key] = StoredTensor(key, leaf.shape, leaf.dtype, rel, key)
            elif _is_tensor(leaf):
                tensors[key] = StoredTensor(key, tuple(leaf.shape), dtype_name(leaf.dtype), rel, key)
            else:
                scalars[key] = leaf
        return tensors, scalars

    @property
    def entries(self) -> dict[str, StoredTensor]:
        return self._leaves[0]

    def read(self, key: str):
        _note_read(self.path, key)
        obj = self.obj
        for part in split_key(obj, key):
            obj = obj[part]
        return obj

    def scalars(self) -> dict[str, Any]:
        """Non-tensor leaves (ints, strings, ...) of the pickle, by dotted key."""
        return dict(self._leaves[1])


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _DuplicateKey(k)
            seen.add(k)
    return d


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_pickle(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True`` and errors that name the file."""
    import torch

    path = Path(path)
    mmap = _check_pickle_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "Unsupported global" in text or "weights_only" in text.lower():
            detail = text.split("Unsupported global:")[-1].split(".")[0:2]
            culprit = ".".join(s.strip() for s in detail) if "Unsupported global" in text else ""
            raise UnsafePickleError(
                "pickle would import non-tensor code" + (f" ({culprit})" if culprit else "")
                + "; refused (modelkit loads pickles with weights_only=True and never executes "
                "code from an artifact)", path) from None
        raise CorruptFileError(f"cannot unpickle: {text.splitlines()[0] if text else 'UnpicklingError'}",
                               path) from None
    except RecursionError:
        raise CorruptFileError("cannot read torch pickle: nested too deeply", path) from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, TypeError, IndexError, KeyError,
            OverflowError, MemoryError, zipfile.BadZipFile) as e:
        raise CorruptFileError(f"cannot read torch pickle: {_first_line(e)}", path) from None


def _require_regular(path: Path) -> None:
    """CorruptFileError unless ``path`` is a non-empty regular file (stat only, no open)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise CorruptFileError(f"cannot open the file ({e.strerror or e})", path) from None
    if not stat.S_ISREG(st.st_mode):
        raise CorruptFileError("is not a regular file; modelkit reads only regular files", path)
    if st.st_size == 0:
        raise CorruptFileError("file is empty (0 bytes)", path)


def _check_pickle_file(path: Path) -> bool:
    """Refuse what torch.load must not be handed: a non-regular or empty file, a zip whose
    members are compressed (torch.save never compresses; a 7 MB member can inflate to
    gigabytes) or whose ``data.pkl`` is over :data:`MAX_PICKLE_BYTES`. Returns whether it is
    a zip (then tensors are memory-mapped)."""
    from modelkit.io.files import open_regular

    with open_regular(path, error=CorruptFileError, confined=False) as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise CorruptFileError("file is empty (0 bytes)", path)
        if not zipfile.is_zipfile(f):
            return False
        try:
            with zipfile.ZipFile(f) as z:
                infos = z.infolist()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as e:  # a zip version
            raise CorruptFileError(f"cannot read torch pickle: broken zip ({_first_line(e)})", path) from None
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED:
            raise CorruptFileError(
                f"zip member {info.filename!r} is compressed; torch.save never compresses, and a "
                f"compressed member can inflate without bound (it claims {info.file_size:,} bytes)", path)
        if info.filename.endswith("data.pkl") and info.file_size > MAX_PICKLE_BYTES:
            raise CorruptFileError(f"pickle {info.filename!r} is {info.file_size:,} bytes, over modelkit's "
                                   f"limit of {MAX_PICKLE_BYTES:,}", path)
    return True


def _is_tensor(obj: Any) -> bool:
    if isinstance(obj, TensorHeader):
        return True
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def walk(obj: Any, prefix: str = "", path: Path | str | None = None) -> Iterator[tuple[str, Any]]:
    """(dotted key, leaf) for every leaf (tensor or scalar) of nested dicts, lists and
    tuples, depth-first in order.

    Bounded whatever the input: iterative (no RecursionError), at most :data:`MAX_DEPTH`
    levels and :data:`MAX_NODES` nodes, and memo-aware: a pickle can reach one container by
    many paths (300 bytes of shared references 30 levels deep are 2^30 paths), so a
    container met a second time is a CorruptFileError instead of a walk without end. A
    state dict is a tree; tensors shared between keys (tied weights) are leaves and fine."""
    # a stack of the open containers' child iterators, not of every child: this runs once
    # per tensor of every pickle listed (10^5 in a real checkpoint), in the same preorder
    seen: dict[int, str] = {}
    containers = (dict, list, tuple)
    if not isinstance(obj, containers):  # a tensor (or TensorHeader) or a scalar
        yield prefix, obj
        return
    if not obj:
        return
    stack: list[tuple[str, Iterator[tuple[Any, Any]], int]] = []
    seen[id(obj)] = prefix
    stack.append((f"{prefix}." if prefix else "", _children(obj), 1))
    nodes = 1
    while stack:
        head, children, depth = stack[-1]
        for k, node in children:
            nodes += 1
            if nodes > MAX_NODES:
                raise CorruptFileError(f"the pickle's structure has over {MAX_NODES:,} entries; refused", path)
            if not isinstance(node, containers):
                yield f"{head}{k}", node
                continue
            if not node:
                continue
            key = f"{head}{k}"
            if depth >= MAX_DEPTH:
                raise CorruptFileError(f"the pickle nests containers over {MAX_DEPTH} levels deep (at {key!r})", path)
            if id(node) in seen:
                raise CorruptFileError(f"the pickle reaches one container both as {seen[id(node)]!r} and as "
                                       f"{key!r}; a state dict is a tree, refused", path)
            seen[id(node)] = key
            stack.append((f"{key}." if key else "", _children(node), depth + 1))
            break
        else:
            stack.pop()


def _children(node: dict | list | tuple) -> Iterator[tuple[Any, Any]]:
    """(key or index, child) of a container, taken when it is entered (as the walk did)."""
    return iter(list(node.items()) if isinstance(node, dict) else list(enumerate(node)))


def flatten_tensors(obj: Any, prefix: str = "", path: Path | str | None = None) -> Iterator[tuple[str, Any]]:
    """(dotted key, tensor or TensorHeader) for every tensor inside nested dicts/lists."""
    for key, leaf in walk(obj, prefix, path):
        if _is_tensor(leaf):
            yield key, leaf


def flatten_scalars(obj: Any, prefix: str = "", path: Path | str | None = None) -> Iterator[tuple[str, Any]]:
    """(dotted key, value) for every non-tensor leaf inside nested dicts/lists."""
    for key, leaf in walk(obj, prefix, path):
        if not _is_tensor(leaf):
            yield key, leaf


def split_key(obj: Any, key: str) -> list:
    """Split a dotted key into container indices, honouring dict keys that contain dots."""
    parts: list = []
    rest = key
    while rest:
        if isinstance(obj, dict):
            # longest dict key that prefixes the rest (state-dict keys contain dots)
            match = max((k for k in obj if isinstance(k, str) and
                         (rest == k or rest.startswith(k + "."))), key=len, default=None)
            if match is None:
                raise KeyError(key)
            parts.append(match)
            obj = obj[match]
            rest = rest[len(match) + 1:]
        elif isinstance(obj, (list, tuple)):
            head, _, rest = rest.partition(".")
            parts.append(int(head))
            obj = obj[int(head)]
        else:
            raise KeyError(key)
    return parts


# -- header-only reading of torch's zip pickles -------------------------------------------
# torch.save writes a zip whose data.pkl refers to storages by key; unpickling it with the
# few callables below yields the structure with shapes and dtypes and never touches (or
# imports) anything else. Any other global means "not a plain tensor pickle": the caller
# then uses torch.load(weights_only=True), which decides (and refuses unsafe pickles).

_STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
}


@dataclass(frozen=True, init=False)
class TensorHeader:
    """A tensor known by its shape and dtype only (from a pickle's structure)."""

    shape: tuple[int, ...]
    dtype: str

    def __init__(self, shape: tuple[int, ...], dtype: str):  # as StoredTensor's: one per tensor listed
        d = self.__dict__
        d["shape"] = shape
        d["dtype"] = dtype


class _BadTensor(Exception):
    """A tensor record no torch.save writes (negative, fractional or absurd sizes)."""


def _rebuild_tensor(storage: str, offset: int, size: Any, *rest: Any) -> TensorHeader:
    # called once per tensor of every pickle listed: a plain loop, not all(generator)
    if type(size) is not tuple or len(size) > 64:
        raise _BadTensor(f"a tensor has size {_short(size)}: dimensions must be non-negative integers")
    for d in size:
        if type(d) is not int or d < 0 or d >= _I63:
            raise _BadTensor(f"a tensor has size {_short(size)}: dimensions must be non-negative integers")
    if type(offset) is not int or offset < 0:
        raise _BadTensor(f"a tensor has storage offset {_short(offset)}")
    return TensorHeader(size, storage)


def _rebuild_parameter(data: TensorHeader, *rest: Any) -> TensorHeader:
    return data


_STORAGE_DTYPE_NAMES = frozenset(_STORAGE_DTYPES.values())


class _SkeletonUnpickler(pickle.Unpickler):
    _ALLOWED = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("collections", "OrderedDict"): collections.OrderedDict,
    }

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"{module}.{name}") from None

    def persistent_load(self, pid: Any) -> str:
        # ("storage", storage type (here: its dtype name), key, location, numel)
        # a set, not the dict's values (a scan of ten per tensor); an unhashable pid[1]
        # raises TypeError, which read_pickle_skeleton treats as this refusal (torch.load decides)
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage" and pid[1] in _STORAGE_DTYPE_NAMES):
            raise pickle.UnpicklingError("unexpected persistent id")
        return pid[1]


def read_pickle_skeleton(path: Path) -> Any | None:
    """The structure of a zip-format torch pickle with tensors as TensorHeader, or None when
    it is not a plain tensor pickle (then torch.load(weights_only=True) decides).
    CorruptFileError for what no torch.save writes (see :func:`_check_pickle_file`)."""
    path = Path(path)
    _require_regular(path)  # a FIFO would hang the first read
    try:  # fast path: only an uncompressed member of a plain zip (see modelkit.io.zipmembers)
        data = read_zip_member(path, lambda n: n.endswith("/data.pkl") and n.count("/") == 1, b"/data.pkl")
    except Exception:
        data = None
    if data is not None and len(data) > MAX_PICKLE_BYTES:
        raise CorruptFileError(f"pickle data.pkl is {len(data):,} bytes, over modelkit's limit of "
                               f"{MAX_PICKLE_BYTES:,}", path)
    if data is None and not _check_pickle_file(path):  # refuses compressed members
        return None
    try:
        if data is None:  # not the plain layout torch.save writes: the zipfile module decides
            with zipfile.ZipFile(path) as z:
                pkl = [n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
                if len(pkl) != 1:
                    return None
                data = z.read(pkl[0])
        return _SkeletonUnpickler(io.BytesIO(data)).load()
    except _BadTensor as e:
        raise CorruptFileError(f"cannot read torch pickle: {e}", path) from None
    except Exception:  # anything unusual: let torch.load (weights_only) decide
        return None
