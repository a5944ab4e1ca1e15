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
import io
import json
import math
import os
import pickle
import struct
import sys
import weakref
import zipfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

from .errors import CorruptFileError, UnsafePathError, UnsafePickleError
from .zipmembers import read_zip_member

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
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit


def torch_dtype(name: str):
    """The torch dtype for a dtype name such as ``"bfloat16"``."""
    import torch

    return getattr(torch, name)


def dtype_name(dtype: Any) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``; strings pass through."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class StoredTensor:
    """One tensor as it lies on disk: metadata only."""

    name: str          # the name the format gives it (a state-dict key, or a dotted path)
    shape: tuple[int, ...]
    dtype: str         # torch dtype name, e.g. "bfloat16"
    file: str          # path relative to the artifact folder
    key: str           # key inside the file (dotted for nested pickles)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES.get(self.dtype, 4)


def check_inside(root: Path, path: Path) -> Path:
    """``path`` resolved, refused with UnsafePathError when it leaves ``root``."""
    resolved = path.resolve()
    root_resolved = root.resolve()
    if resolved != root_resolved and root_resolved not in resolved.parents:
        raise UnsafePathError(
            f"points outside the artifact folder {root_resolved} (to {resolved}); "
            "modelkit only reads files inside the artifact", path)
    return resolved


_OPEN: "weakref.WeakSet[TensorFile]" = weakref.WeakSet()


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
        for attr in ("_handle", "obj"):
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

    def stored(self, prefix: str = "") -> list[StoredTensor]:
        """The file's tensors, names prefixed with ``prefix``."""
        if not prefix:
            return list(self.entries.values())
        return [StoredTensor(prefix + t.name, t.shape, t.dtype, t.file, t.key)
                for t in self.entries.values()]


class SafetensorsFile(TensorFile):
    """A ``.safetensors`` file; header validated before anything else is trusted."""

    def _validate_header(self) -> dict:
        size = self.path.stat().st_size
        if size < 8:
            raise CorruptFileError(f"truncated safetensors file ({size} bytes, no header)", self.path)
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER_BYTES or n > size - 8:
                raise CorruptFileError(
                    f"safetensors header length {n} is impossible for a file of {size} bytes "
                    "(truncated or not a safetensors file)", self.path)
            raw = f.read(n)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptFileError(f"safetensors header is not valid JSON ({e})", self.path) from None
        if not isinstance(header, dict):
            raise CorruptFileError("safetensors header is not a JSON object", self.path)
        data_size = size - 8 - n
        spans = []
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype = SAFETENSORS_DTYPES[meta["dtype"]]
                shape = tuple(int(d) for d in meta["shape"])
                begin, end = (int(o) for o in meta["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CorruptFileError(f"tensor {name!r} has a malformed header entry {meta!r}",
                                       self.path) from None
            numel = 1
            for d in shape:
                numel *= d
            if end > data_size or begin < 0 or end < begin:
                raise CorruptFileError(
                    f"tensor {name!r} has offsets [{begin}, {end}) outside the {data_size} data "
                    "bytes of the file (truncated file?)", self.path)
            if end - begin != numel * DTYPE_BYTES[dtype]:
                raise CorruptFileError(
                    f"tensor {name!r}: offsets hold {end - begin} bytes but shape {list(shape)} "
                    f"of {dtype} needs {numel * DTYPE_BYTES[dtype]}", self.path)
            spans.append((begin, end, name))
        spans.sort()
        for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise CorruptFileError(f"tensors {n0!r} and {n1!r} overlap in the file", self.path)
        return header

    @cached_property
    def entries(self) -> dict[str, StoredTensor]:
        header = self._validate_header()
        out = {}
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            out[name] = StoredTensor(name, tuple(meta["shape"]),
                                     SAFETENSORS_DTYPES[meta["dtype"]], self.rel, name)
        return out

    @cached_property
    def metadata(self) -> dict[str, str]:
        self.entries  # validates
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            return json.loads(f.read(n)).get("__metadata__") or {}

    @cached_property
    def _handle(self):
        from safetensors import safe_open

        self.entries  # validate first: never hand a bad header to the reader
        try:
            return safe_open(str(self.path), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own Rust-side error types
            raise CorruptFileError(f"cannot open safetensors file: {e}", self.path) from None

    def read(self, key: str):
        if key not in self.entries:
            raise KeyError(f"{self.path}: no tensor {key!r}")
        try:
            return self._handle.get_tensor(key)
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
    def entries(self) -> dict[str, StoredTensor]:
        tree = self.skeleton if self.skeleton is not None else self.obj
        return {key: StoredTensor(key, tuple(t.shape), dtype_name(t.dtype), self.rel, key)
                for key, t in flatten_tensors(tree)}

    def read(self, key: str):
        obj = self.obj
        for part in split_key(obj, key):
            obj = obj[part]
        return obj

    def scalars(self) -> dict[str, Any]:
        """Non-tensor leaves (ints, strings, ...) of the pickle, by dotted key."""
        tree = self.skeleton if self.skeleton is not None else self.obj
        return dict(flatten_scalars(tree))


def load_pickle(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True`` and errors that name the file."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CorruptFileError("file does not exist", path)
    if path.stat().st_size == 0:
        raise CorruptFileError("file is empty (0 bytes)", path)
    mmap = zipfile.is_zipfile(path)
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
        raise CorruptFileError(f"cannot unpickle: {text.splitlines()[0]}", path) from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, zipfile.BadZipFile) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CorruptFileError(f"cannot read torch pickle: {first}", path) from None


def _children(obj: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield str(k), v
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield str(i), v


def _is_tensor(obj: Any) -> bool:
    if isinstance(obj, TensorHeader):
        return True
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def flatten_tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, tensor or TensorHeader) for every tensor inside nested dicts/lists,
    depth first in stored order (iterative: a layer file holds ~500 of them)."""
    stack = [(prefix, obj)]
    while stack:
        key, o = stack.pop()
        if type(o) is TensorHeader or _is_tensor(o):
            yield key, o
        elif isinstance(o, (dict, list, tuple)):
            items = o.items() if isinstance(o, dict) else enumerate(o)
            stack.extend(reversed([(f"{key}.{k}" if key else str(k), v) for k, v in items]))


def flatten_scalars(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if _is_tensor(obj):
        return
    if isinstance(obj, (dict, list, tuple)):
        for k, v in _children(obj):
            yield from flatten_scalars(v, f"{prefix}.{k}" if prefix else k)
    else:
        yield prefix, obj


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


def weight_files(folder: Path) -> list[Path]:
    """Weight files directly inside ``folder`` (not recursive), sorted."""
    out = []
    for p in sorted(folder.iterdir()):
        if p.suffix in (".safetensors", ".bin", ".pt") and (p.is_file() or p.is_symlink()):
            out.append(p)
    return out


def file_size(path: Path) -> int:
    return os.stat(path).st_size


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


@dataclass(frozen=True)
class TensorHeader:
    """A tensor known by its shape and dtype only (from a pickle's structure)."""

    shape: tuple[int, ...]
    dtype: str


def _rebuild_tensor(storage: str, offset: int, size: Any, *rest: Any) -> TensorHeader:
    return TensorHeader(tuple(map(int, size)), storage)


def _rebuild_parameter(data: TensorHeader, *rest: Any) -> TensorHeader:
    return data


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
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage" and pid[1] in _STORAGE_DTYPES.values()):
            raise pickle.UnpicklingError("unexpected persistent id")
        return pid[1]


def read_pickle_skeleton(path: Path) -> Any | None:
    """The structure of a zip-format torch pickle with tensors as TensorHeader, or None."""
    try:
        if not zipfile.is_zipfile(path):
            return None
        data = read_zip_member(path, lambda n: n.endswith("/data.pkl") and n.count("/") == 1)
        if data is None:  # not the plain layout torch.save writes: the zipfile module decides
            with zipfile.ZipFile(path) as z:
                pkl = [n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
                if len(pkl) != 1:
                    return None
                data = z.read(pkl[0])
        return _SkeletonUnpickler(io.BytesIO(data)).load()
    except Exception:  # anything unusual: let torch.load (weights_only) decide
        return None
