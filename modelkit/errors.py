"""One exception hierarchy for everything modelkit refuses to do.

Every error names the file or reference it is about and says what is wrong, so a
researcher never has to read a traceback from inside torch to learn that a shard is
truncated.
"""
from __future__ import annotations

from pathlib import Path


class ModelkitError(Exception):
    """Base class of every error modelkit raises on purpose."""

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = str(path) if path is not None else None
        self.problem = message
        super().__init__(f"{self.path}: {message}" if self.path else message)


class RefNotFoundError(ModelkitError):
    """A reference (folder, wandb:, hf:) that cannot be resolved to local files."""


class UnknownFormatError(ModelkitError):
    """A folder that no registered format recognises."""


class ConfigError(ModelkitError):
    """A config file that is missing, malformed or self-contradictory."""


class CorruptFileError(ModelkitError):
    """A weight file that cannot be parsed (truncated, bad header, bad offsets)."""


class UnsafePickleError(ModelkitError):
    """A pickle that would import or call something other than tensors."""


class UnsafePathError(ModelkitError):
    """A symlink or index entry that points outside the artifact folder."""


class BaseModelUnavailableError(ModelkitError):
    """An artifact that needs its base model, which cannot be found locally."""


class LoadError(ModelkitError):
    """An artifact that cannot be turned into a faithful in-memory model."""


class ExportError(ModelkitError):
    """An export that cannot be completed; nothing is left at the output path."""


class OutputExistsError(ExportError):
    """The output path exists and overwriting was not requested."""


class VerificationError(ExportError):
    """An exported model whose logits disagree with its source beyond tolerance."""


class CompareError(ModelkitError):
    """A benchmark comparison that cannot be run as asked."""


def about_model(e: ModelkitError, role: str, ref: object) -> ModelkitError:
    """The same error class, its message prefixed with which model (``role``: base/trained)
    it is about; a :class:`CompareError` where that class takes other arguments."""
    try:
        return type(e)(f"cannot load the {role} model {str(ref)!r}: {e.problem}", e.path)
    except TypeError:
        return CompareError(f"cannot load the {role} model {str(ref)!r}: {e}")
