"""Format plugins and their registry.

Each format is one module here; importing it registers it. A new format is one new
module plus one line in ``_BUILTIN``.
"""
from __future__ import annotations

import importlib
from pathlib import Path

from modelkit.errors import UnknownFormatError
from modelkit.formats.base import Artifact, BaseRef, Format

_REGISTRY: dict[str, Format] = {}
_BUILTIN = ("dylora", "compressed_moe", "peft_lora", "plain_hf")
_loaded = False


def register(fmt: Format) -> Format:
    """Add a format plugin to the registry (replacing one of the same name)."""
    _REGISTRY[fmt.name] = fmt
    return fmt


def formats() -> list[Format]:
    """Registered formats, in detection order."""
    global _loaded
    if not _loaded:
        _loaded = True
        for mod in _BUILTIN:
            importlib.import_module(f"{__name__}.{mod}")
    return sorted(_REGISTRY.values(), key=lambda f: (f.priority, f.name))


def detect(folder: Path) -> tuple[Format, str]:
    """The format and layout of ``folder``; UnknownFormatError lists what was looked for."""
    folder = Path(folder)
    for fmt in formats():
        layout = fmt.detect(folder)
        if layout is not None:
            return fmt, layout
    looked = "\n".join(f"  - {f.name}: {f.looks_for}" for f in formats())
    entries = sorted(folder.iterdir()) if folder.is_dir() else []
    broken = [p for p in entries if p.is_symlink() and not p.exists()]
    present = ", ".join(p.name + (" (a link to nothing)" if p in broken else "") for p in entries[:20]) or "nothing"
    why = ""
    if broken:  # what an interrupted download leaves in a Hugging Face cache snapshot
        why = (f": {', '.join(p.name for p in broken)} "
               f"{'is a link' if len(broken) == 1 else 'are links'} to a file that does not exist "
               "(an interrupted download? download it again)")
    raise UnknownFormatError(
        f"no known artifact format here{why}. Looked for:\n{looked}\nFound: {present}", folder)


__all__ = ["Artifact", "BaseRef", "Format", "detect", "formats", "register"]
