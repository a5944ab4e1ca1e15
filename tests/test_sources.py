"""Resolving references: local folders, W&B artifacts (at the wandb.Api boundary), the HF cache."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import modelkit
from modelkit.errors import RefNotFoundError
from modelkit.io.sources import COMPLETE_MARKER, resolve, resolve_base
from modelkit.testing import write_plain_hf


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    return write_plain_hf(tmp_path_factory.mktemp("src") / "tiny-llama")


def _artifact_root(dest: Path, best: Path) -> None:
    """What `wandb artifact download` leaves: best_model/ plus checkpoint-*/ beside it."""
    shutil.copytree(best, dest / "best_model")
    for step in (200, 1000):
        shutil.copytree(best, dest / f"checkpoint-{step}")


class FakeWandbArtifact:
    def __init__(self, source: Path, fail_after_copy: bool = False):
        self.source, self.fail = source, fail_after_copy
        self.version, self.digest = "v3", "abc123"
        self.downloads = 0

    def download(self, root: str) -> str:
        self.downloads += 1
        _artifact_root(Path(root), self.source)
        if self.fail:
            raise ConnectionError("connection reset while downloading")
        return root


def _install_fake_api(monkeypatch, artifact: FakeWandbArtifact, calls: list):
    import wandb

    class FakeApi:
        def __init__(self, *a, **k):
            calls.append("Api()")

        def artifact(self, name: str):
            calls.append(name)
            return artifact

    monkeypatch.setattr(wandb, "Api", FakeApi)
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)


def test_local_folder_resolves_in_place(plain):
    src = resolve(str(plain))
    assert src.kind == "local" and src.folder == plain.resolve()
    assert src.checkpoints == []


def test_artifact_root_prefers_best_model_and_lists_checkpoints(tmp_path, plain):
    _artifact_root(tmp_path, plain)
    src = resolve(tmp_path)
    assert src.folder == tmp_path.resolve() / "best_model"
    assert [p.name for p in src.checkpoints] == ["checkpoint-200", "checkpoint-1000"]


def test_wandb_ref_downloads_once_then_reuses_the_complete_download(monkeypatch, plain):
    calls: list = []
    art = FakeWandbArtifact(plain)
    _install_fake_api(monkeypatch, art, calls)
    src = resolve("wandb:team/proj/best-dylora-model-full:v3")
    assert calls == ["Api()", "team/proj/best-dylora-model-full:v3"]
    assert src.kind == "wandb" and src.folder.name == "best_model"
    assert (src.root / COMPLETE_MARKER).exists()
    assert len(src.checkpoints) == 2
    # second time: no network at all (the fake would record a call)
    calls.clear()
    again = resolve("team/proj/best-dylora-model-full:v3")  # bare form
    assert calls == [] and again.folder == src.folder and "reused" in again.note
    assert modelkit.inspect(again).format == "plain-hf"


def test_interrupted_wandb_download_leaves_nothing_that_looks_complete(monkeypatch, plain):
    calls: list = []
    _install_fake_api(monkeypatch, FakeWandbArtifact(plain, fail_after_copy=True), calls)
    with pytest.raises(RefNotFoundError, match="download failed"):
        resolve("wandb:team/proj/broken:v1")
    cache = Path(os.environ["MODELKIT_CACHE"]) / "wandb" / "team" / "proj"
    assert not (cache / "broken:v1").exists()
    assert not any(p.name.startswith(".broken") for p in cache.iterdir())


def test_wandb_without_network_explains_how_to_provide_the_artifact(monkeypatch):
    import wandb

    class NoNetworkApi:
        def __init__(self, *a, **k):
            raise ConnectionError("Max retries exceeded with url: /graphql")

    monkeypatch.setattr(wandb, "Api", NoNetworkApi)
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    with pytest.raises(RefNotFoundError) as e:
        resolve("wandb:team/proj/model:latest")
    assert "wandb:team/proj/model:latest" in str(e.value) and "wandb login" in str(e.value)


def test_wandb_without_an_api_key_says_so_and_never_calls_wandb(monkeypatch, tmp_path):
    import wandb

    def prompt(*a, **k):   # what wandb.Api() would do without a key: ask for one
        raise AssertionError("wandb was asked (it would prompt for a login)")

    monkeypatch.setattr(wandb, "Api", prompt)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with pytest.raises(RefNotFoundError) as e:
        resolve("wandb:team/proj/model:v2")
    assert "no W&B API key" in str(e.value) and "WANDB_API_KEY" in str(e.value)


def test_wandb_ref_without_a_version_means_latest(monkeypatch, plain):
    calls: list = []
    _install_fake_api(monkeypatch, FakeWandbArtifact(plain), calls)
    src = resolve("wandb:team/proj/best-model")
    assert calls == ["Api()", "team/proj/best-model:latest"] and src.kind == "wandb"


def _cache_snapshot(hub: Path, repo: str, src: Path) -> Path:
    """Lay out a model the way huggingface_hub caches it: blobs + symlinked snapshot."""
    repo_dir = hub / ("models--" + repo.replace("/", "--"))
    rev = "0123456789abcdef0123456789abcdef01234567"
    snap = repo_dir / "snapshots" / rev
    (repo_dir / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(rev)
    for i, f in enumerate(sorted(src.iterdir())):
        blob = repo_dir / "blobs" / f"blob{i}"
        shutil.copy(f, blob)
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    return snap


def test_hf_ref_and_base_names_resolve_from_the_local_cache_only(plain):
    from huggingface_hub.constants import HF_HUB_CACHE

    snap = _cache_snapshot(Path(HF_HUB_CACHE), "tiny-org/tiny-llama", plain)
    src = resolve("hf:tiny-org/tiny-llama")
    assert src.kind == "hf" and src.folder == snap.resolve()
    report = modelkit.inspect("hf:tiny-org/tiny-llama")  # symlinks into blobs/ are allowed
    assert report.format == "plain-hf" and not report.errors
    path, how = resolve_base("tiny-org/tiny-llama")
    assert path == snap and "cache" in how


def test_a_cache_snapshot_folder_is_accepted_its_links_stay_inside_the_cache_repo(plain, tmp_path):
    snap = _cache_snapshot(tmp_path / "hub", "tiny-org/tiny-llama", plain)   # what snapshot_download() returns
    src = resolve(str(snap))
    assert src.kind == "local" and src.trust_root == (tmp_path / "hub" / "models--tiny-org--tiny-llama").resolve()
    report = modelkit.inspect(snap)
    assert report.format == "plain-hf" and not report.errors
    # a link leaving the cache repo is still refused
    weights = snap / "model.safetensors"
    outside = tmp_path / "outside.safetensors"
    shutil.copy(weights, outside)
    weights.unlink()
    os.symlink(outside, weights)
    with pytest.raises(modelkit.errors.UnsafePathError):
        modelkit.inspect(snap)


def _interrupted_download(tmp_path: Path, shards: int) -> tuple[Path, Path]:
    """What an interrupted `hf download` leaves: the snapshot links a blob not there yet."""
    snap = _cache_snapshot(tmp_path / "hub", "tiny-org/tiny-llama", write_plain_hf(tmp_path / "src", shards=shards))
    weights = sorted(snap.glob("model*.safetensors"))[-1]
    Path(os.path.realpath(weights)).unlink()
    return snap, weights


def test_an_interrupted_download_of_a_single_file_model_is_named_as_such(tmp_path):
    snap, _ = _interrupted_download(tmp_path, shards=1)
    with pytest.raises(modelkit.errors.UnknownFormatError,
                       match="model.safetensors is a link to a file that does not exist .an interrupted download"):
        modelkit.inspect(snap)


def test_an_interrupted_download_of_a_sharded_model_names_the_missing_shard(tmp_path):
    snap, weights = _interrupted_download(tmp_path, shards=3)
    first = modelkit.inspect(snap).errors[0]
    assert first.code == "missing-tensors"
    assert f"{weights.name}: a link to a file that does not exist; an interrupted download?" in first.message


def test_unknown_refs_say_how_to_provide_them():
    with pytest.raises(RefNotFoundError, match="hf:nobody/nothing.*local cache"):
        resolve("hf:nobody/nothing")
    with pytest.raises(RefNotFoundError, match="no such folder"):
        resolve("/no/such/folder")
    path, how = resolve_base("google/codegemma-2b")
    assert path is None and "--base" in how


@pytest.mark.parametrize("value", ["off", "0", "false", "none", ""])
def test_modelkit_cache_off_is_read_the_same_everywhere(monkeypatch, value):
    from modelkit.architecture import bridge as architectures
    from modelkit.cache import cache_dir, cache_root

    monkeypatch.setenv("MODELKIT_CACHE", value)
    assert cache_root() is None and architectures._cache_dir() is None  # nothing cached across runs
    assert cache_dir().name.startswith("modelkit-nocache-")              # never a folder named "off"
    monkeypatch.setenv("MODELKIT_CACHE", "/some/where")
    assert cache_root() == Path("/some/where") and architectures._cache_dir() == Path("/some/where/expected")
