"""Tensor views: an artifact seen as lazy on-disk-named tensors.

Whatever its format, an artifact can be seen as the checkpoint of a standard model: a
mapping from the names a plain Hugging Face checkpoint of its base architecture holds
(per-expert names for MoE) to *producers* that read or compute one tensor when asked. A
LoRA merge or a compressed expert is computed only when its producer runs, so export and
diff stream one tensor at a time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping

from modelkit.io.tensors import SafetensorsFile, StoredTensor, TensorFile


@dataclass(frozen=True)
class LazyTensor:
    """A tensor that is produced only when :meth:`produce` is called."""

    shape: tuple[int, ...]
    dtype: str                      # torch dtype name of what ``produce`` returns
    origin: str                     # where it comes from, for load reports
    produce: Callable[[], "object"] = field(repr=False, compare=False)
    # (file, entry) when ``produce`` returns one stored tensor unchanged: lets diff read
    # the raw bytes in chunks instead of producing the whole tensor
    stored: "tuple[TensorFile, StoredTensor] | None" = field(default=None, repr=False, compare=False)
    # ``compute(dtype)`` for a computed tensor (a compressed expert): produced directly in the
    # dtype a load or export asks for, instead of rounded to ``dtype`` and cast again
    compute: "Callable[[object], object] | None" = field(default=None, repr=False, compare=False)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def produce_as(self, dtype) -> "object":
        """The tensor for a consumer that wants ``dtype`` (a torch dtype, or None: as declared).
        Computed tensors are produced in ``dtype`` itself; stored ones are returned as stored
        (the consumer casts, exactly)."""
        if dtype is not None and self.compute is not None:
            return self.compute(dtype)
        return self.produce()

    def produce_once(self) -> "object":
        """The tensor for a consumer that reads it once and lets it go (a merge's base): a
        tensor stored in a safetensors file is read into memory of its own (``pread``), so the
        file's pages do not stay mapped, counting in the resident memory, after it is freed."""
        if self.stored is not None and isinstance(self.stored[0], SafetensorsFile):
            file, entry = self.stored
            return file.read_unmapped(entry.key)
        return self.produce()

    def stored_span(self, dtype: str) -> "tuple[object, int, int] | None":
        """``(file path, byte offset, byte length)`` when this tensor is stored unchanged in a
        safetensors file in ``dtype`` (its bytes are an export's bytes: copied file to file,
        never produced); None for anything computed, to be cast, or stored otherwise (a pickle)."""
        if self.stored is None or self.dtype != dtype or not isinstance(self.stored[0], SafetensorsFile):
            return None
        file, entry = self.stored
        if entry.dtype != dtype or tuple(entry.shape) != tuple(self.shape):
            return None
        return file.raw_span(entry.key)


def stored_tensor(file: TensorFile, entry: StoredTensor, origin: str | None = None) -> LazyTensor:
    """A LazyTensor that reads ``entry`` from ``file``."""
    return LazyTensor(entry.shape, entry.dtype, origin or f"stored:{entry.file}",
                      lambda: file.read(entry.key), stored=(file, entry))


@dataclass
class TensorView(Mapping[str, LazyTensor]):
    """On-disk-named lazy tensors, plus what the artifact stores but the view left out."""

    tensors: dict[str, LazyTensor]
    unplaced: list[StoredTensor] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __getitem__(self, name: str) -> LazyTensor:
        return self.tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def produce(self, name: str):
        return self.tensors[name].produce()
