"""Plain Hugging Face checkpoints: single file, sharded with an index, or legacy ``.bin``."""
from __future__ import annotations

from collections import Counter
from functools import cached_property
from pathlib import Path

from modelkit.errors import UnsafePathError
from modelkit.findings import Finding, warning
from modelkit.formats import register
from modelkit.formats.base import Artifact, Format
from modelkit.formats.view import TensorView, stored_tensor
from modelkit.io.tensors import FLOAT_DTYPES, StoredTensor, check_inside

SINGLE = ("model.safetensors", "pytorch_model.bin")
INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class PlainHFArtifact(Artifact):
    format = "plain-hf"

    @cached_property
    def weight_map(self) -> dict[str, str]:
        """tensor name -> file (relative), from the index or the single file."""
        for index in INDEXES:
            if (self.folder / index).exists():
                wm = self.read_json(index)["weight_map"]  # a str -> str map (modelkit.schemas)
                # confined once per distinct file: 10^6 entries name a handful of shards
                for rel in set(wm.values()):
                    try:
                        check_inside(self.trust_root, self.folder / rel)
                    except UnsafePathError as e:
                        name = next(n for n, r in wm.items() if r == rel)
                        raise UnsafePathError(
                            f"weight_map sends {name!r} to {rel!r}: {e.problem}; refused",
                            self.folder / index) from None
                return wm
        for single in SINGLE:
            if (self.folder / single).exists():
                return {t.name: single for t in self.entries_of(single)}
        return {}

    def files(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def stored(self) -> list[StoredTensor]:
        out = []
        for rel in self.files():
            if not (self.folder / rel).exists():
                continue  # reported by check() as missing tensors
            out += self.entries_of(rel)
        return out

    def config(self):
        from modelkit.architecture.bridge import load_config

        return load_config(self.folder / "config.json")

    def architecture(self):
        # JSON is validated here; expected_tensors validates the rest on a cache miss
        self.read_json("config.json")
        return self.folder / "config.json"

    def view(self, base: Artifact | None = None, **options) -> TensorView:
        self.check_options(options)  # a plain folder takes none
        tensors = {}
        for rel in self.files():
            if (self.folder / rel).exists():
                f = self.file(rel)
                for t in self.entries_of(rel):
                    tensors[t.name] = stored_tensor(f, t)
        return TensorView(tensors)

    def check(self, base: Artifact | None, deep: bool = False) -> list[Finding]:
        findings = []
        absent = sorted({rel for rel in self.files() if not (self.folder / rel).exists()})
        if absent:
            names = [n for n, rel in self.weight_map.items() if rel in absent]
            dangling = [rel for rel in absent if (self.folder / rel).is_symlink()]
            why = (f" ({', '.join(dangling)}: a link to a file that does not exist; an interrupted "
                   "download? download it again)") if dangling else ""
            findings.append(Finding("error", "missing-tensors",
                                    f"the index names shard(s) that are not in the folder: {', '.join(absent)}{why}",
                                    names))
        findings += self._index_findings(set(absent))
        findings += mixed_dtype_findings(self.stored())
        return findings

    def _index_findings(self, absent: set[str]) -> list[Finding]:
        """Index entries whose (present, readable) shard does not hold the tensor."""
        held: dict[str, set[str]] = {}
        unheld = []
        for name, rel in self.weight_map.items():
            if rel in absent:
                continue
            if rel not in held:
                held[rel] = {t.name for t in self.entries_of(rel)}
                if not held[rel] and any(e.path and Path(e.path).name == Path(rel).name for e in self.file_errors):
                    absent.add(rel)  # unreadable: reported as corrupt-file
                    continue
            if name not in held[rel]:
                unheld.append(name)
        if not unheld:
            return []
        return [Finding("error", "missing-tensors",
                        f"the index names {len(unheld)} tensor(s) that their shard does not hold", unheld)]


def mixed_dtype_findings(stored: list[StoredTensor], what: str = "the checkpoint") -> list[Finding]:
    """A dtype-mismatch warning when floating tensors of one checkpoint disagree in dtype."""
    counts = Counter(t.dtype for t in stored if t.dtype in FLOAT_DTYPES)
    if len(counts) <= 1:
        return []
    main = counts.most_common(1)[0][0]
    odd = [t.name for t in stored if t.dtype in FLOAT_DTYPES and t.dtype != main]
    return [warning("dtype-mismatch",
                    f"{what} mixes floating dtypes ({dict(counts)}); {len(odd)} tensor(s) are not "
                    f"{main}: a loader casts them silently", odd)]


class PlainHF(Format):
    name = "plain-hf"
    looks_for = ("config.json with a transformers model_type, plus model.safetensors, "
                 "model-*-of-*.safetensors + model.safetensors.index.json, or pytorch_model.bin")
    priority = 90

    def detect(self, folder: Path) -> str | None:
        if not (folder / "config.json").exists():
            return None
        if (folder / "model.safetensors.index.json").exists():
            return "sharded-safetensors"
        if (folder / "model.safetensors").exists():
            return "safetensors"
        if (folder / "pytorch_model.bin.index.json").exists():
            return "sharded-bin"
        if (folder / "pytorch_model.bin").exists():
            return "bin"
        return None

    def open(self, folder: Path, layout: str, source=None) -> Artifact:
        return PlainHFArtifact(folder, layout, source)


register(PlainHF())
