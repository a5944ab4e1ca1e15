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


class FactError(ConfigError):
    """A fact the user supplied for what the artifact does not record (``lora_alpha=``,
    ``lora_r=``) that is not valid, contradicts the artifact, or has no use in its format."""


class MissingFactError(LoadError):
    """A fact the artifact does not record and the operation cannot do without (the merge
    scale of a checkpoint that records no ``lora_alpha``)."""


class UnknownOptionError(LoadError):
    """A load / view keyword the artifact's format does not declare (the message lists the
    ones it accepts)."""


class ExportError(ModelkitError):
    """An export that cannot be completed; nothing is left at the output path."""


class OutputExistsError(ExportError):
    """The output path exists and overwriting was not requested."""


class CompareError(ModelkitError):
    """A benchmark comparison that cannot be run as asked."""


def about_model(e: ModelkitError, role: str, ref: object) -> ModelkitError:
    """The same error class, its message prefixed with which model (``role``: base/trained)
    it is about; a :class:`CompareError` where that class takes other arguments."""
    try:
        return type(e)(f"cannot load the {role} model {str(ref)!r}: {e.problem}", e.path)
    except TypeError:
        return CompareError(f"cannot load the {role} model {str(ref)!r}: {e}")


# -- the one place where other exceptions become ModelkitErrors ---------------------------
def _first_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def translate(e: BaseException, path: str | Path | None = None,
              kind: type[ModelkitError] | None = None) -> ModelkitError | None:
    """The ModelkitError for an OS, JSON, YAML, schema or library error, or None when ``e``
    is not one of those (a bug, which must stay visible).

    ``path`` names the file when the exception does not (an OSError's own filename wins);
    ``kind`` is the class for OS errors (CorruptFileError by default, ExportError where the
    caller writes)."""
    import errno
    import json
    import pickle
    import zipfile

    if isinstance(e, ModelkitError):
        return e
    if isinstance(e, OSError):
        where = e.filename if e.filename is not None else path
        if e.errno == errno.ENOSPC:
            return ExportError("no space left on the device; nothing was left behind. Free space "
                               "or choose another output folder", where)
        return (kind or CorruptFileError)(f"cannot access the file ({_first_line(e)})", where)
    if isinstance(e, json.JSONDecodeError):
        return ConfigError(f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}", path)
    name = type(e).__name__
    module = type(e).__module__ or ""
    if module.startswith("yaml"):
        return ConfigError(f"not valid YAML ({_first_line(e)})", path)
    if module.startswith("pydantic") and name == "ValidationError":
        return ConfigError(f"does not match its schema ({_first_line(e)})", path)
    if name == "SafetensorError" or isinstance(e, (zipfile.BadZipFile, pickle.UnpicklingError, EOFError)):
        text = _first_line(e)
        if "No space left on device" in text or "os error 28" in text:
            return ExportError("no space left on the device; nothing was left behind. Free space "
                               "or choose another output folder", path)
        return CorruptFileError(f"cannot read the file ({name}: {text})", path)
    if isinstance(e, RecursionError):
        return CorruptFileError("nested too deeply for modelkit to read", path)
    if isinstance(e, (OverflowError, UnicodeError)):
        return CorruptFileError(f"holds a value modelkit cannot represent ({name}: {_first_line(e)})", path)
    return None


def guarded(kind: type[ModelkitError] | None = None):
    """Decorator for public entry points: OS, JSON, YAML, schema and library errors leave
    as ModelkitErrors (see :func:`translate`), named by the file or the first argument."""
    import functools

    def wrap(func):
        @functools.wraps(func)
        def inner(*args, **kwargs):
            try:
                return func(*args, **kwargs)
            except ModelkitError:
                raise
            except Exception as e:
                err = translate(e, args[0] if args and isinstance(args[0], (str, Path)) else None, kind)
                if err is None:
                    raise
                raise err from None
        return inner

    return wrap


class Cancelled(ModelkitError):
    """The user cancelled a running operation (a panel's Cancel button); like any other
    error, nothing partial is left behind."""
