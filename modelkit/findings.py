"""Findings: what inspection concludes about an artifact, with a stable code."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum


class Severity(str, Enum):
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"


# Stable codes. Tests, notebooks and users key off these strings; never rename one.
CODES = {
    "missing-tensors": "the model needs tensors the artifact (and its base) does not provide",
    "unexpected-tensors": "the artifact stores tensors the model has no place for",
    "shape-mismatch": "a stored tensor's shape differs from the model's parameter",
    "empty-adapter": "an adapter file holds no tensors",
    "untrained-adapter": "every LoRA B matrix is zero: the adapter changes nothing",
    "missing-router": "a routed mixture without its trained router state",
    "base-required": "the artifact holds only part of a model and needs its base",
    "base-unavailable": "the base model cannot be found locally",
    "duplicated-buffers": "the same tensor is stored more than once",
    "dtype-mismatch": "tensors stored in different floating dtypes",
    "inconsistent-config": "config fields contradict each other or the stored tensors",
    "remote-code": "the config asks for code from the artifact (auto_map)",
    "corrupt-file": "a weight file cannot be read",
    "unsafe-pickle": "a pickle would import or call non-tensor code",
    "not-checked": "a check that could not be made",
    "incomplete-checkpoint": "a save in the folder cannot be used (crashed, empty, partial); another was opened",
    "trained-form-differs": "the saved form differs from the copy of the model that was actually trained",
}

# what load makes of error findings: these two mean "the trained model is its base" and are
# waived only by allow_untrained=True; these are left to the format's model builder, which
# refuses them when the model it builds needs what is missing (a dense load of one DyLoRA
# expert needs no router, the routed mixture does)
UNTRAINED_CODES = ("empty-adapter", "untrained-adapter")
LOAD_TOLERATES = ("missing-router",)


@dataclass
class Finding:
    severity: Severity
    code: str
    message: str
    tensors: list[str] = field(default_factory=list)
    file: str | None = None

    def __post_init__(self) -> None:
        if self.code not in CODES:
            raise ValueError(f"unknown finding code {self.code!r}")
        self.severity = Severity(self.severity)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["severity"] = self.severity.value
        return d


def error(code: str, message: str, tensors=(), file=None) -> Finding:
    return Finding(Severity.ERROR, code, message, list(tensors), file)


def warning(code: str, message: str, tensors=(), file=None) -> Finding:
    return Finding(Severity.WARNING, code, message, list(tensors), file)


def info(code: str, message: str, tensors=(), file=None) -> Finding:
    return Finding(Severity.INFO, code, message, list(tensors), file)
