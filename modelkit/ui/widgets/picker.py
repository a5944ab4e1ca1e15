"""Artifact picker: the artifacts found under a root folder, or a typed ``wandb:`` /
``hf:`` reference (or any folder path)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import ipywidgets as widgets

from modelkit.errors import ModelkitError, UnknownFormatError

SKIP_DIRS = {"__pycache__", "node_modules", ".git", ".ipynb_checkpoints"}


def is_artifact(folder: str | Path) -> bool:
    """Whether a registered format recognises ``folder`` (or, for an artifact root such as
    a W&B download, its ``best_model/``). A folder a format claims but cannot read (a
    malformed config) counts: inspecting it is how the user learns what is wrong."""
    from modelkit.formats import detect
    from modelkit.io.sources import resolve

    try:
        detect(resolve(folder, download=False).folder)
    except UnknownFormatError:
        return False
    except ModelkitError:
        return True
    except OSError:
        return False
    return True


def find_folders(root: str | Path, matches: Callable[[Path], bool], depth: int = 3) -> dict[str, str]:
    """Folders under ``root`` for which ``matches`` holds: ``{path relative to root:
    absolute path}``, sorted. Walks at most ``depth`` levels, never into hidden or
    ``SKIP_DIRS`` folders nor into a match; a folder reached twice (links) is walked once."""
    root = Path(os.path.abspath(Path(root).expanduser()))
    found: dict[str, str] = {}
    seen: set[Path] = set()

    def walk(folder: Path, level: int) -> None:
        real = folder.resolve()
        if real in seen:
            return
        seen.add(real)
        if matches(folder):
            found[folder.relative_to(root).as_posix() if folder != root else "."] = str(folder)
            return
        if level >= depth:
            return
        try:
            children = sorted(p for p in folder.iterdir() if p.is_dir())
        except OSError:
            return
        for child in children:
            if not child.name.startswith(".") and child.name not in SKIP_DIRS:
                walk(child, level + 1)

    if root.is_dir():
        walk(root, 0)
    return dict(sorted(found.items()))


def discover(root: str | Path, depth: int = 3) -> dict[str, str]:
    """Artifacts under ``root``: ``{path relative to root: absolute path}``, sorted (see
    :func:`find_folders`; the ``checkpoint-*/`` beside a ``best_model/`` are reported by
    inspect, not listed here)."""
    return find_folders(root, is_artifact, depth)


class ArtifactPicker(widgets.VBox):
    """Pick an artifact found under ``root``, or type a ref; ``value`` is the ref to use.

    A typed ref (``wandb:entity/project/name:vN``, ``hf:org/name`` or a folder) wins over
    the list. ``root_from`` makes this picker list what another picker found (one root
    field for the A and B sides of a diff).
    """

    def __init__(self, root: str | Path | None = None, value: str | Path | None = None,
                 description: str = "artifact", root_from: "ArtifactPicker | None" = None):
        self.root = widgets.Text(value=str(root or ""), description="root",
                                 placeholder="folder to search for artifacts",
                                 continuous_update=False, layout=widgets.Layout(width="60%"))
        self.scan_button = widgets.Button(description="rescan", icon="refresh",
                                          layout=widgets.Layout(width="auto"))
        self.dropdown = widgets.Dropdown(description=description, options=[],
                                         layout=widgets.Layout(width="60%"))
        self.dropdown.add_class("mk-picker")
        self.ref = widgets.Text(description="or ref", continuous_update=False,
                                placeholder="wandb:entity/project/name:vN, hf:org/name or a folder "
                                            "(overrides the list)",
                                layout=widgets.Layout(width="60%"))
        self.ref.add_class("mk-ref")
        rows: list[widgets.Widget] = [self.dropdown, self.ref]
        if root_from is None:
            self.root.observe(lambda _: self.scan(), "value")
            self.scan_button.on_click(lambda _: self.scan())
            rows.insert(0, widgets.HBox([self.root, self.scan_button]))
            self.scan()
        else:
            self.root = root_from.root
            widgets.dlink((root_from.dropdown, "options"), (self.dropdown, "options"))
        super().__init__(rows)
        if value is not None:
            self.value = value

    @property
    def choices(self) -> dict[str, str]:
        """What the list offers: ``{label: absolute path}``."""
        return dict(self.dropdown.options)

    def scan(self) -> dict[str, str]:
        """Search the root folder again and offer what was found."""
        root = self.root.value.strip()
        found = discover(root) if root else {}
        keep = self.dropdown.value
        self.dropdown.options = list(found.items())
        if keep in found.values():
            self.dropdown.value = keep
        return found

    def select(self, label: str) -> None:
        """Pick the listed artifact ``label`` (its path relative to the root) and clear the ref field."""
        self.dropdown.value = self.choices[label]
        self.ref.value = ""

    @property
    def value(self) -> str | None:
        """The ref to use: the typed one, else the listed artifact picked (None: nothing)."""
        return self.ref.value.strip() or self.dropdown.value

    @value.setter
    def value(self, ref: str | Path | None) -> None:
        if ref is None:
            self.ref.value = ""
            return
        paths = {os.path.realpath(p): p for p in self.choices.values()}
        text = str(ref)
        listed = paths.get(os.path.realpath(text)) if not text.startswith(("wandb:", "hf:")) else None
        if listed is not None:
            self.dropdown.value = listed
            self.ref.value = ""
        else:
            self.ref.value = text
