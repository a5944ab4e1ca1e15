"""Turn a reference into local files: a folder, a W&B artifact, a Hugging Face model id.

* ``/path/to/folder`` (or ``./rel``): used in place, never written.
* ``wandb:entity/project/name:vN`` (or ``:alias``; the bare ``entity/project/name:vN``
  form too): downloaded once with ``wandb.Api().artifact(...).download(root=...)`` into
  the cache; a complete earlier download is reused without touching the network.
* ``hf:org/name``: the local Hugging Face cache (offline), never a download.

Inside an artifact root (a W&B download), ``best_model/`` is chosen when present and the
``checkpoint-*/`` folders beside it are listed.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from modelkit.cache import cache_dir
from modelkit.errors import RefNotFoundError
from modelkit.io.checkpoints import checkpoint_folders

WANDB_REF = re.compile(r"^(?:wandb:)?(?P<entity>[\w.-]+)/(?P<project>[\w.-]+)/(?P<name>[\w.-]+):(?P<version>[\w.-]+)$")
COMPLETE_MARKER = ".modelkit-download.json"


WANDB_REF_NO_VERSION = re.compile(r"^wandb:(?P<entity>[\w.-]+)/(?P<project>[\w.-]+)/(?P<name>[\w.-]+)$")


def wandb_api_key() -> str | None:
    """The W&B API key this process would use (``WANDB_API_KEY`` or a ``wandb login``
    entry in ~/.netrc), None when there is none: then modelkit says so instead of letting
    wandb prompt for one, which in a notebook kernel blocks until interrupted."""
    import netrc
    from urllib.parse import urlparse

    if os.environ.get("WANDB_API_KEY"):
        return os.environ["WANDB_API_KEY"]
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        auth = netrc.netrc(os.environ.get("NETRC") or None).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return None
    return auth[2] if auth and auth[2] else None


@dataclass
class Source:
    """Where an artifact's files are, and how they got there."""

    ref: str                          # what the user typed
    kind: str                         # "local", "wandb" or "hf"
    root: Path                        # the folder the ref names (artifact root)
    folder: Path                      # the folder to open (best_model/ inside a root)
    checkpoints: list[Path] = field(default_factory=list)  # checkpoint-*/ beside it
    note: str = ""                    # e.g. "reused cached download"

    @property
    def trust_root(self) -> Path:
        """Symlinks and index entries may point anywhere under this folder, nowhere else."""
        return self.root


def resolve(ref: str | Path, *, download: bool = True) -> Source:
    """Resolve ``ref`` to local files (see module docstring). RefNotFoundError if impossible."""
    text = str(ref).strip()
    if not text:  # Path("") is the current folder: never what an empty field meant
        raise RefNotFoundError("no artifact given: pass a folder, `wandb:entity/project/name:version` or "
                               "`hf:org/name`", repr(str(ref)))
    if text.startswith("hf:"):
        repo = text[3:]
        path = hf_cached_snapshot(repo)
        if path is None:
            raise RefNotFoundError(
                f"Hugging Face model {repo!r} is not in the local cache "
                f"({hf_cache_root()}); modelkit never downloads weights. Download it where "
                "you have network (`hf download REPO`) or pass a local folder instead", text)
        return _select(text, "hf", path, trust_root=_hf_repo_folder(path))
    try:
        local = Path(text).expanduser()
        exists = local.exists()
    except (OSError, RuntimeError, ValueError) as e:  # ~nouser, a name too long, a NUL byte
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
        raise RefNotFoundError(f"not a usable path ({why})", text) from None
    if exists:
        if not local.is_dir():
            raise RefNotFoundError("is a file; pass the folder that holds the checkpoint", text)
        # a Hugging Face cache snapshot (what snapshot_download() returns) links into
        # ../../blobs: trusted up to its cache repo folder, never beyond it
        return _select(text, "local", local, trust_root=_hf_repo_folder(local) if is_hf_snapshot(local) else None)
    m = WANDB_REF.match(text)
    if m and (text.startswith("wandb:") or not local.exists()):
        return wandb_download(text, **m.groupdict(), download=download)
    m = WANDB_REF_NO_VERSION.match(text)
    if m:   # wandb:entity/project/name: the version W&B calls "latest", said in the note
        return wandb_download(text, **m.groupdict(), version="latest", download=download)
    raise RefNotFoundError(
        "no such folder. Give a local folder, `wandb:entity/project/name:version` or "
        "`hf:org/name` (from the local Hugging Face cache)", text)


def _select(ref: str, kind: str, root: Path, trust_root: Path | None = None, note: str = "") -> Source:
    root = root.resolve()
    checkpoints = checkpoint_folders(root)
    folder = root / "best_model" if (root / "best_model").is_dir() else root
    src = Source(ref, kind, trust_root.resolve() if trust_root else root, folder,
                 checkpoints if folder != root else [], note)
    return src


# -- W&B ------------------------------------------------------------------------------
def wandb_cache_folder(entity: str, project: str, name: str, version: str) -> Path:
    return cache_dir() / "wandb" / entity / project / f"{name}:{version}"


def wandb_download(ref: str, entity: str, project: str, name: str, version: str,
                   *, download: bool = True) -> Source:
    """Download (or reuse) a W&B artifact. The marker file is written last, so a download
    that died half-way is never mistaken for a complete one."""
    target = wandb_cache_folder(entity, project, name, version)
    marker = target / COMPLETE_MARKER
    if marker.exists():
        return _select(ref, "wandb", target, note=f"reused complete download in {target}")
    if not download:
        raise RefNotFoundError(f"not downloaded yet (looked in {target})", ref)
    if wandb_api_key() is None:
        raise RefNotFoundError(
            "no W&B API key here (WANDB_API_KEY unset, no `wandb login` entry in ~/.netrc) and the "
            "artifact is not downloaded yet; modelkit never prompts for one. Set WANDB_API_KEY or run "
            "`wandb login` in a terminal, or download the artifact where you can and pass its folder "
            f"(looked in {target})", ref)
    try:
        import wandb

        api = wandb.Api()
        artifact = api.artifact(f"{entity}/{project}/{name}:{version}")
    except Exception as e:  # wandb raises many types: CommError, ValueError, ...
        raise RefNotFoundError(
            f"cannot fetch the W&B artifact ({type(e).__name__}: {e}). Log in with "
            "`wandb login` where you have network, or download it there and pass the folder",
            ref) from None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        artifact.download(root=str(tmp))
        (tmp / COMPLETE_MARKER).write_text(json.dumps({
            "ref": f"{entity}/{project}/{name}:{version}",
            "version": getattr(artifact, "version", version),
            "digest": getattr(artifact, "digest", None),
            "downloaded_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }, indent=1))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RefNotFoundError(f"W&B download failed ({type(e).__name__}: {e})", ref) from None
    return _select(ref, "wandb", target, note=f"downloaded into {target}")


# -- Hugging Face cache ----------------------------------------------------------------
def hf_cache_root() -> Path:
    from huggingface_hub.constants import HF_HUB_CACHE

    return Path(HF_HUB_CACHE)


def hf_cached_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot folder of ``repo_id``, or None. Never touches the network."""
    # the cache folder is looked at first: for a base never downloaded (the usual case on a
    # cluster node), importing snapshot_download (hf_api, httpx: ~0.25 s) would double the
    # cost of every warm inspect that looks its base up
    try:
        if not (hf_cache_root() / f"models--{repo_id.replace('/', '--')}" / "snapshots").is_dir():
            return None
    except (OSError, ValueError):
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        return None


def is_hf_snapshot(folder: Path) -> bool:
    """``<cache>/models--org--name/snapshots/<rev>`` with its ``blobs/`` beside."""
    folder = Path(os.path.abspath(folder))
    repo = folder.parent.parent
    return (folder.parent.name == "snapshots" and repo.name.startswith(("models--", "datasets--"))
            and (repo / "blobs").is_dir())


def _hf_repo_folder(snapshot: Path) -> Path:
    # <cache>/models--org--name/snapshots/<rev>: blobs live two levels up
    return snapshot.parent.parent if snapshot.parent.name == "snapshots" else snapshot


# -- base models -----------------------------------------------------------------------
def resolve_base(name: str | None, *, explicit: str | Path | None = None,
                 relative_to: Path | None = None) -> tuple[Path | None, str]:
    """Find a base model locally: the explicit ``--base``, a path as written (absolute or
    relative to the artifact), or the HF cache. Returns (folder or None, how/why-not)."""
    if explicit is not None:
        src = resolve(explicit)
        return src.folder, f"--base {explicit}"
    if not name:
        return None, "the artifact names no base model"
    candidates = [Path(name).expanduser()]
    if relative_to is not None and not Path(name).is_absolute():
        candidates += [relative_to / name, relative_to.parent / name]
    for c in candidates:
        if c.is_dir() and (c / "config.json").exists():
            return c.resolve(), f"local folder {c.resolve()}"
    if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
        snap = hf_cached_snapshot(name)
        if snap is not None:
            return snap, f"Hugging Face cache {snap}"
    return None, (f"{name!r} is neither a local folder nor in the Hugging Face cache "
                  f"({hf_cache_root()}); pass --base FOLDER")


# -- fingerprints ----------------------------------------------------------------------
def fingerprint_folder(folder: Path, root: Path | None = None) -> str:
    """A content fingerprint: each file's relative name, size and the sha256 of its first
    and last 64 KiB (safetensors headers and pickles' tails). Stable under copying and
    touching; cheap for multi-GB shards. Only regular files inside ``root`` (default: the
    folder, or its Hugging Face cache repo) are read; for anything else (a symlink out of
    the artifact, a FIFO) only the name counts. Symlinked folders are not entered."""
    from modelkit.errors import ModelkitError
    from modelkit.io.files import default_root, open_regular

    h = hashlib.sha256()
    folder = Path(folder)
    root = root or default_root(folder / "_")
    paths = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        paths += [Path(dirpath) / n for n in filenames if n != COMPLETE_MARKER]
    for p in sorted(paths):
        rel = p.relative_to(folder)
        try:
            with open_regular(p, root) as f:
                size = os.fstat(f.fileno()).st_size
                h.update(f"{rel}\0{size}\0".encode())
                h.update(f.read(65536))
                if size > 131072:
                    f.seek(size - 65536)
                    h.update(f.read(65536))
        except ModelkitError:
            h.update(f"{rel}\0unreadable\0".encode())
    return h.hexdigest()[:16]
