"""Every JSON / YAML file modelkit reads from an artifact is checked against its schema.

A config from a stranger's checkpoint decides what modelkit computes: a ``lora_alpha`` of
``NaN`` would become a NaN merge, ``"num_hidden_layers": 1000000`` an empty model of a
million layers, ``"weight_map": 5`` a TypeError deep inside a format. Each file is checked
here, by its name, before any format looks at it: :func:`validate` raises a
:class:`~modelkit.errors.ConfigError` naming the file and the first offending fields. The
schemas themselves are pydantic models (:mod:`modelkit.schema_models`; the names are
importable from here too).

Importing pydantic and building the schemas costs more than the rest of a whole
``modelkit inspect`` (0.25 of 0.34 s CPU, measured), so what passed is remembered: a
marker named by the SHA-256 of the schema's source, pydantic's version, the schema and the
data (canonical JSON) under ``$MODELKIT_CACHE/valid``. The same content checked again by
the same schemas is known valid without importing pydantic; anything else (an edited file,
another pydantic, data JSON cannot spell exactly) is checked in full. Failures are never
remembered. ``MODELKIT_CACHE=off`` turns the memory off.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from pathlib import Path
from typing import Any

from modelkit.cache import cache_root
from modelkit.errors import ConfigError

MODELS = ("AdapterConfig", "AnyMapping", "CompressedMetadata", "CompressionSettings", "ModelConfig",
          "ProjectionSidecar", "WeightIndex")
_BY_NAME = {
    "config.json": "ModelConfig",
    "adapter_config.json": "AdapterConfig",
    "model.safetensors.index.json": "WeightIndex",
    "pytorch_model.bin.index.json": "WeightIndex",
    "compression_config.json": "CompressionSettings",
    "compression_config.yaml": "CompressionSettings",
    "compressed_metadata.json": "CompressedMetadata",
}
_BY_PATTERN = [
    (re.compile(r".*\.safetensors\.index\.json$"), "WeightIndex"),
    (re.compile(r"^[a-z_]+_proj_metadata\.json$"), "ProjectionSidecar"),
]
_VERSION = "1"   # of the marker scheme


def schema_name(path: str | Path) -> str:
    """The name of a file's schema, by the file's name (``AnyMapping`` for files without one)."""
    name = Path(path).name
    if name in _BY_NAME:
        return _BY_NAME[name]
    for pattern, schema in _BY_PATTERN:
        if pattern.match(name):
            return schema
    return "AnyMapping"


def schema_for(path: str | Path):
    """The schema (a pydantic model class) of a file, by its name."""
    from modelkit import schema_models

    return getattr(schema_models, schema_name(path))


def validate(data: Any, path: str | Path, schema: type | None = None) -> dict[str, Any]:
    """``data`` (parsed from ``path``) checked against its schema; returned unchanged.

    ConfigError names the file and up to three offending fields, e.g.
    ``adapter_config.json: does not match its schema: lora_alpha: Input should be a
    finite number (got nan)``."""
    if not isinstance(data, dict):
        raise ConfigError(f"expected a JSON/YAML object (a mapping), found {type(data).__name__}", path)
    name = schema.__name__ if schema is not None else schema_name(path)
    if name == "AnyMapping":
        return data
    marker = _marker(name, data)
    if marker is not None and marker.exists():
        return data
    from modelkit import schema_models

    schema_models.check(data, path, schema if schema is not None else getattr(schema_models, name))
    if marker is not None:
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        except OSError:
            pass  # a read-only cache only costs the next check its pydantic import
    return data


def _marker(schema: str, data: dict) -> Path | None:
    """Where "``data`` passed ``schema``" is remembered, or None (no cache, or data that
    canonical JSON cannot spell exactly)."""
    root = cache_root()
    if root is None or not _exact_json(data):
        return None
    try:
        text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError):
        return None
    digest = hashlib.sha256()
    for part in (_VERSION, _fingerprint(), schema):
        digest.update(part.encode() + b"\0")
    digest.update(text.encode("utf-8", "surrogatepass"))
    return root / "valid" / digest.hexdigest()


def _exact_json(data: Any) -> bool:
    """Whether JSON spells ``data`` one way only: str keys (JSON would turn ``1`` into
    ``"1"``), lists (not tuples), and str / int / float / bool / None leaves."""
    stack = [data]
    while stack:
        v = stack.pop()
        t = type(v)
        if t is dict:
            for k, item in v.items():
                if type(k) is not str:
                    return False
                stack.append(item)
        elif t is list:
            stack.extend(v)
        elif not (v is None or t in (str, int, float, bool)):
            return False
    return True


_FINGERPRINT: list[str] = []


def _fingerprint() -> str:
    """The schemas' source and pydantic's version file, hashed (read, never imported)."""
    if not _FINGERPRINT:
        digest = hashlib.sha256(Path(__file__).with_name("schema_models.py").read_bytes())
        spec = importlib.util.find_spec("pydantic")
        version = Path(spec.origin).with_name("version.py") if spec and spec.origin else None
        digest.update(version.read_bytes() if version is not None and version.is_file() else b"?")
        _FINGERPRINT.append(digest.hexdigest())
    return _FINGERPRINT[0]


def __getattr__(name: str):
    """The schema models (``modelkit.schemas.ModelConfig``) and ``describe``, imported on first use."""
    if name in MODELS or name == "describe":
        from modelkit import schema_models

        return getattr(schema_models, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [*MODELS, "schema_for", "schema_name", "validate"]
