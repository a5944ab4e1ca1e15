"""Hostile and broken input (issue 10): each case a stranger's artifact or a careless user
can produce gives a typed error (or a finding) naming the file: no traceback, no hang, no
file from outside the artifact read or copied, no unbounded memory."""
from __future__ import annotations

import errno
import importlib
import json
import os
import pickle
import resource
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch

import modelkit
from modelkit.errors import ConfigError, ExportError, ModelkitError, RefNotFoundError, UnsafePathError

SECRET = "TOKEN-hf_do_not_upload_0123456789"


def copy(catalog, name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(catalog[name], dst, symlinks=True)
    return dst


def secret_file(tmp_path: Path) -> Path:
    p = tmp_path / "home" / ".secret-token"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(SECRET)
    return p


def rewrite_header(path: Path, mutate) -> None:
    """Re-encode a safetensors header after ``mutate(header) -> header | None``; raw bytes
    (BOM, trailing data) are the caller's business."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header = mutate(header) or header
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])


def inspect_codes(folder: Path) -> set[str]:
    return modelkit.inspect(folder).codes


def first_tensor(header: dict) -> str:
    return min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------ raw tracebacks before


def test_a_folder_where_config_json_should_be(catalog, tmp_path):
    art = copy(catalog, "plain-llama", tmp_path)
    (art / "config.json").unlink()
    (art / "config.json").mkdir()
    with pytest.raises(ConfigError, match=r"config\.json: .*not a regular file \(a folder\)"):
        modelkit.inspect(art)


def test_a_folder_where_a_weight_file_should_be(catalog, tmp_path):
    art = copy(catalog, "plain-sharded", tmp_path)
    shard = sorted(art.glob("model-*.safetensors"))[0]
    shard.unlink()
    shard.mkdir()
    report = modelkit.inspect(art)
    assert "corrupt-file" in report.codes
    assert any(f.file and f.file.endswith(shard.name) and "a folder" in f.message for f in report.findings)


def test_unreadable_file_without_root(catalog, request_cleanup):
    """PermissionError as a user meets it: tests run as root, so the check runs in a child
    that drops to uid 65534 (nobody) before opening the artifact."""
    if os.geteuid() != 0 and sys.platform != "linux":
        pytest.skip("needs Linux")
    base = Path(tempfile.mkdtemp(prefix="modelkit-nobody-", dir="/tmp"))
    base.chmod(0o755)
    request_cleanup.append(base)
    art = base / "art"
    shutil.copytree(catalog["plain-llama"], art)
    for p in [base, art, *art.iterdir()]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    (art / "model.safetensors").chmod(0o000)
    clean = base / "clean"
    shutil.copytree(catalog["plain-llama"], clean)
    # Python lives under /root (0700): import and warm everything as root, then drop to nobody
    code = textwrap.dedent(f"""
        import os, sys
        import modelkit
        from modelkit.ui.cli import main
        modelkit.inspect({str(clean)!r})
        if os.geteuid() == 0:
            os.setgid(65534); os.setuid(65534)
        assert not os.access({str(art / 'model.safetensors')!r}, os.R_OK)
        report = modelkit.inspect({str(art)!r})
        f = [f for f in report.findings if f.code == 'corrupt-file']
        print(f[0].file, '|', f[0].message)
        sys.exit(main(['inspect', {str(art)!r}]))
    """)
    env = {**os.environ, "HOME": str(base), "MODELKIT_CACHE": str(base / "cache"), "HF_HOME": str(base / "hf")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]  # an error finding, not a crash
    assert "model.safetensors | cannot open the file (Permission denied)" in proc.stdout
    assert "Traceback" not in proc.stderr


@pytest.fixture
def request_cleanup():
    folders: list[Path] = []
    yield folders
    for f in folders:
        shutil.rmtree(f, ignore_errors=True)


def test_symlink_loop_as_config(catalog, tmp_path):
    art = copy(catalog, "plain-llama", tmp_path)
    (art / "config.json").unlink()
    os.symlink("config.json", art / "config.json")
    with pytest.raises(ModelkitError, match=r"config\.json"):
        modelkit.inspect(art)


@pytest.mark.parametrize("ref", ["~nouser_modelkit/x", "/tmp/" + "x" * 5000, "/tmp/a\0b", "", "   "])
def test_refs_that_are_not_usable_paths(ref):
    with pytest.raises(RefNotFoundError):
        modelkit.inspect(ref)


@pytest.mark.parametrize("weight_map, message", [
    (5, "weight_map: Input should be a valid dictionary"),
    (["model-00001-of-00003.safetensors"], "weight_map: Input should be a valid dictionary"),
    ({"model.embed_tokens.weight": "model-00001\u0000.safetensors"}, "String should match pattern"),
    ({"model.embed_tokens.weight": 3}, "Input should be a valid string"),
])
def test_index_with_wrong_types(catalog, tmp_path, weight_map, message):
    art = copy(catalog, "plain-sharded", tmp_path)
    (art / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ConfigError, match=message) as e:
        modelkit.inspect(art)
    assert e.value.path.endswith("model.safetensors.index.json")


@pytest.mark.parametrize("field, value", [
    ("lora_alpha", "x"), ("lora_alpha", float("nan")), ("target_modules", [1, None]),
    ("base_model_name_or_path", 5), ("use_rslora", "yes"), ("r", 0), ("r", 2.5),
])
def test_adapter_config_with_wrong_types(catalog, tmp_path, field, value):
    art = copy(catalog, "peft-lora", tmp_path)
    cfg = json.loads((art / "adapter_config.json").read_text())
    cfg[field] = value
    (art / "adapter_config.json").write_text(json.dumps(cfg))  # NaN is written as NaN
    with pytest.raises(ConfigError, match=rf"adapter_config\.json: does not match its schema: {field}"):
        modelkit.inspect(art)


@pytest.mark.parametrize("field, value", [
    ("num_experts", {}), ("_dylora_lora_alpha", "x"), ("lora_alpha", float("nan")), ("_dylora_num_experts", -1),
])
def test_dylora_config_with_wrong_types(catalog, tmp_path, field, value):
    art = copy(catalog, "dylora-b", tmp_path)
    cfg = json.loads((art / "config.json").read_text())
    cfg[field] = value
    (art / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=rf"config\.json: does not match its schema: {field}"):
        modelkit.inspect(art)


@pytest.mark.parametrize("field, value", [("torch_dtype", "evil"), ("num_hidden_layers", 1_000_000),
                                          ("vocab_size", -3), ("tie_word_embeddings", "no")])
def test_model_config_with_impossible_values(catalog, tmp_path, field, value):
    art = copy(catalog, "plain-llama", tmp_path)
    cfg = json.loads((art / "config.json").read_text())
    cfg[field] = value
    (art / "config.json").write_text(json.dumps(cfg))
    t = time.perf_counter()
    with pytest.raises(ConfigError, match=field):
        modelkit.inspect(art)
    assert time.perf_counter() - t < 30  # a million layers are refused, never built


def test_infinity_and_negative_and_fractional_shapes_are_corrupt_files(catalog, tmp_path):
    for i, bad in enumerate([float("inf"), -4, 2.5, "8", True, 2**64]):
        art = copy(catalog, "plain-llama", tmp_path / str(i))

        def mutate(h, bad=bad):
            h[first_tensor(h)]["shape"][0] = bad
        rewrite_header(art / "model.safetensors", mutate)
        report = modelkit.inspect(art)
        assert "corrupt-file" in report.codes and "shape-mismatch" not in report.codes, bad
        assert any("dimensions must be unsigned integers" in f.message for f in report.findings)


def test_deeply_nested_json_yaml_and_pickle(catalog, tmp_path):
    art = copy(catalog, "plain-llama", tmp_path)
    (art / "config.json").write_text('{"model_type": "llama", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ConfigError, match="config.json"):
        modelkit.inspect(art)

    comp = copy(catalog, "compressed-checkpoint-N", tmp_path)
    (comp / "compression_config.yaml").write_text("a: " + "[" * 50_000 + "]" * 50_000 + "\n")
    report = modelkit.inspect(comp)  # the settings are unusable: reported, not a crash
    assert any("compression_config.yaml" in f.message and "cannot" in f.message for f in report.findings)

    binart = copy(catalog, "plain-bin", tmp_path)
    deep = b"\x80\x02" + b"]" * 100_000 + b"a" * 99_999 + b"."  # 100,000 nested lists (no recursion to write)
    replace_data_pkl(binart / "pytorch_model.bin", deep)
    report = modelkit.inspect(binart)
    assert any(f.code == "corrupt-file" and "levels deep" in f.message for f in report.findings)


def replace_data_pkl(path: Path, data: bytes) -> None:
    """Swap the pickle inside a torch.save zip (members stay uncompressed, like torch's)."""
    with zipfile.ZipFile(path) as z:
        members = {i.filename: z.read(i.filename) for i in z.infolist()}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, blob in members.items():
            z.writestr(name, data if name.endswith("/data.pkl") else blob)


def test_five_thousand_digit_integer(catalog, tmp_path):
    art = copy(catalog, "plain-llama", tmp_path)
    cfg = (art / "config.json").read_text()
    (art / "config.json").write_text(cfg.replace('"num_hidden_layers": 2', '"num_hidden_layers": ' + "9" * 5000))
    with pytest.raises(ConfigError, match="config.json: not valid JSON: Exceeds the limit"):
        modelkit.inspect(art)


def test_full_disk_in_the_middle_of_a_tensor_is_an_export_error(catalog, tmp_path, monkeypatch):
    """The disk fills after part of a tensor's bytes were written (a short write, then ENOSPC)."""
    stream = importlib.import_module("modelkit.io.safetensors_stream")
    real = stream.write_all

    def full(fd, data):
        if len(data) > 64:
            real(fd, data[:len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, data)

    def full_copy(src, dst, offset, length):  # a stored tensor copied file to file: the same
        if length > 64:
            real_copy(src, dst, offset, length // 2)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_copy(src, dst, offset, length)

    real_copy = stream.copy_range
    monkeypatch.setattr(stream, "write_all", full)
    monkeypatch.setattr(stream, "copy_range", full_copy)
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="no space left"):
        modelkit.export(catalog["plain-llama"], out, progress=False)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_cli_argument_errors_are_one_line_and_come_before_the_work(catalog, tmp_path, monkeypatch, capsys):
    from modelkit.ui import cli

    called = []
    monkeypatch.setattr("modelkit.ops.diff.diff", lambda *a, **k: called.append(a))
    with pytest.raises(SystemExit) as e:
        cli.main(["export", str(catalog["dylora-b"]), str(tmp_path / "o"), "--expert", "one"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--expert: 'one' is not an expert index" in err
    with pytest.raises(SystemExit):
        cli.main(["diff", str(catalog["plain-llama"]), str(catalog["plain-llama"]),
                  "--plot", str(tmp_path / "missing" / "fig.png")])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err and not called


def test_cli_prints_one_line_for_a_corrupt_file(catalog, tmp_path, capsys):
    from modelkit.ui.cli import main

    art = copy(catalog, "plain-llama", tmp_path)
    (art / "config.json").write_text('{"model_type": "llama", "hidden_size": "big"}')
    assert main(["inspect", str(art)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"modelkit inspect: ConfigError: {art / 'config.json'}: does not match its schema: hidden_size")


# ------------------------------------------------------------------ hangs before


def shared_reference_pickle(levels: int = 30) -> bytes:
    """About 300 bytes: a list holding the previous level twice, ``levels`` deep: 2^levels
    paths to walk for a walker that ignores the pickle's memo."""
    x: object = 0
    for _ in range(levels):
        x = [x, x]
    return pickle.dumps({"model.embed_tokens.weight": x}, protocol=2)


def test_shared_references_30_levels_deep(catalog, tmp_path):
    art = copy(catalog, "plain-bin", tmp_path)
    torch.save(pickle.loads(shared_reference_pickle()), art / "pytorch_model.bin")
    assert (art / "pytorch_model.bin").stat().st_size < 4096
    t = time.perf_counter()
    report = modelkit.inspect(art)
    assert time.perf_counter() - t < 20
    assert any(f.code == "corrupt-file" and "a state dict is a tree" in f.message for f in report.findings)


@pytest.mark.parametrize("kind", ["fifo", "urandom", "zero"])
def test_config_json_that_never_ends(catalog, tmp_path, kind):
    art = copy(catalog, "plain-llama", tmp_path)
    (art / "config.json").unlink()
    if kind == "fifo":
        os.mkfifo(art / "config.json")
    else:
        os.symlink(f"/dev/{kind}", art / "config.json")
    before = peak_rss_mb()
    t = time.perf_counter()
    with pytest.raises(ModelkitError, match=r"config\.json: (is not a regular file \(a FIFO\)|points outside)"):
        modelkit.inspect(art)
    assert time.perf_counter() - t < 20
    assert peak_rss_mb() - before < 200


def test_fifo_weight_file_and_tokenizer(catalog, tmp_path):
    art = copy(catalog, "plain-llama", tmp_path)
    (art / "model.safetensors").unlink()
    os.mkfifo(art / "model.safetensors")
    report = modelkit.inspect(art)
    assert any(f.code == "corrupt-file" and "FIFO" in f.message for f in report.findings)


# ------------------------------------------------------------------ memory blow-ups before


def test_deflate_bomb_pickle_is_refused_without_inflating(catalog, tmp_path):
    art = copy(catalog, "plain-bin", tmp_path)
    bomb = art / "pytorch_model.bin"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        with z.open("archive/data.pkl", "w") as f:  # a 300 MB pickle (mostly padding), ~300 KB on disk
            f.write(pickle.dumps({"x": 1}, protocol=2)[:-1])
            chunk = b"N" * (1 << 20)  # NONE opcodes: a valid (if useless) pickle stream
            for _ in range(300):
                f.write(chunk)
            f.write(b"0.")
        z.writestr("archive/version", "3\n")
    assert bomb.stat().st_size < 2_000_000
    before = peak_rss_mb()
    report = modelkit.inspect(art)
    assert any(f.code == "corrupt-file" and "compressed" in f.message for f in report.findings)
    assert peak_rss_mb() - before < 150


def test_a_zip_of_a_version_python_cannot_read_is_a_corrupt_file(catalog, tmp_path):
    # found by `make fuzz`: a deflated member, then a byte of the central directory changed
    # so that the zip claims it needs version 6.4 to extract (zipfile: NotImplementedError)
    art = copy(catalog, "plain-bin", tmp_path)
    weights = art / "pytorch_model.bin"
    with zipfile.ZipFile(weights) as z:
        members = [(i.filename, z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(weights, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members:
            z.writestr(name, data)
    raw = bytearray(weights.read_bytes())
    at = raw.index(b"PK\x01\x02")            # the first central directory entry
    raw[at + 6:at + 8] = struct.pack("<H", 64)  # "version needed to extract": 6.4
    weights.write_bytes(raw)
    with pytest.raises(NotImplementedError):
        zipfile.ZipFile(weights)               # the case: the standard library refuses it
    findings = [f for f in modelkit.inspect(art).findings if f.code == "corrupt-file"]
    assert findings and Path(findings[0].file) == weights
    assert "zip file version 6.4" in findings[0].message


# ------------------------------------------------------------------ escapes before


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                  "generation_config.json", "chat_template.jinja", "vocab.json"])
def test_files_linked_from_outside_are_never_copied_into_an_export(catalog, tmp_path, name):
    art = copy(catalog, "plain-llama", tmp_path)
    secret = secret_file(tmp_path)
    if (art / name).exists():
        (art / name).unlink()
    os.symlink(secret, art / name)
    out = tmp_path / "out"
    with pytest.raises(UnsafePathError, match=rf"{name}: points outside the artifact folder"):
        modelkit.export(art, out, progress=False)
    assert not out.exists()
    for p in tmp_path.rglob("*"):
        if p.is_file() and not p.is_symlink() and p != secret:
            assert SECRET not in p.read_text(errors="replace"), p


def test_tokenizer_linked_from_outside_is_not_loaded(catalog, tmp_path):
    art = copy(catalog, "plain-llama", tmp_path)
    (art / "tokenizer.json").unlink()
    os.symlink(secret_file(tmp_path), art / "tokenizer.json")
    with pytest.raises(UnsafePathError, match="tokenizer.json"):
        modelkit.load(art)


# ------------------------------------------------------------------ accepted-invalid before


def _safetensors_refuses(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                f.get_tensor(k)
    except Exception:
        return True
    return False


def _bom(path: Path) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    path.write_bytes(struct.pack("<Q", n + 3) + b"\xef\xbb\xbf" + raw[8:])


def _trailing(path: Path) -> None:
    with open(path, "ab") as f:
        f.write(b"\0" * 16)


def _hole(path: Path) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    b, e = header[last]["data_offsets"]
    header[last]["data_offsets"] = [b + 16, e + 16]
    blob = json.dumps(header).encode()
    data = raw[8 + n:]
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data[:b] + b"\0" * 16 + data[b:])


@pytest.mark.parametrize("name, damage", [
    ("metadata-not-str", lambda p: rewrite_header(p, lambda h: h.__setitem__("__metadata__", {"format": 5}))),
    ("metadata-list", lambda p: rewrite_header(p, lambda h: h.__setitem__("__metadata__", ["pt"]))),
    ("bom", _bom),
    ("trailing-bytes", _trailing),
    ("offsets-as-strings", lambda p: rewrite_header(
        p, lambda h: h[first_tensor(h)].__setitem__("data_offsets", [str(o) for o in h[first_tensor(h)]["data_offsets"]]))),
    ("hole", _hole),
    ("unknown-dtype", lambda p: rewrite_header(p, lambda h: h[first_tensor(h)].__setitem__("dtype", "Q7"))),
])
def test_headers_the_safetensors_library_refuses_are_corrupt_at_inspect(catalog, tmp_path, name, damage):
    art = copy(catalog, "plain-llama", tmp_path)
    damage(art / "model.safetensors")
    assert _safetensors_refuses(art / "model.safetensors"), "the library itself must refuse this file"
    report = modelkit.inspect(art)
    assert "corrupt-file" in report.codes, report.summary()


def test_clean_headers_are_accepted_exactly_like_the_library(catalog):
    from modelkit.io.tensors import SafetensorsFile

    for path in Path(catalog["plain-llama"]).parent.rglob("*.safetensors"):
        if "bad-" in str(path) or path.is_symlink():
            continue
        assert not _safetensors_refuses(path), path
        assert SafetensorsFile(path).entries, path


def test_index_naming_tensors_no_shard_holds(catalog, tmp_path):
    art = copy(catalog, "plain-sharded", tmp_path)
    index = json.loads((art / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"].update({f"model.ghost.{i}.weight": shard for i in range(200_000)})
    (art / "model.safetensors.index.json").write_text(json.dumps(index))
    report = modelkit.inspect(art)
    f = next(f for f in report.findings if f.code == "missing-tensors" and "their shard does not hold" in f.message)
    assert len(f.tensors) == 200_000 and f.severity.value == "error"


# ------------------------------------------------------------------ --force and small ones


def test_force_keeps_the_old_out_until_the_new_one_is_in_place(catalog, tmp_path, monkeypatch):
    """Fallback replace (no atomic exchange): the second rename fails; the old OUT is back."""
    at = importlib.import_module("modelkit.io.atomic")
    out = tmp_path / "out"
    modelkit.export(catalog["plain-llama"], out, progress=False)
    (out / "mine.txt").write_text("previous export")
    monkeypatch.setattr(at, "exchange", lambda a, b: False)
    real_rename = os.rename

    def rename(src, dst):
        if Path(dst) == out and ".partial-" in Path(src).name:
            raise OSError(errno.EIO, "simulated failure", str(dst))
        return real_rename(src, dst)

    monkeypatch.setattr(at.os, "rename", rename)
    with pytest.raises(ExportError):
        modelkit.export(catalog["plain-llama"], out, force=True, progress=False)
    assert (out / "mine.txt").read_text() == "previous export"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_a_dead_exports_stash_is_restored_never_deleted(catalog, tmp_path):
    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stash = tmp_path / f".out.old-{dead.pid}-xyz"
    (stash / "previous").mkdir(parents=True)
    (stash / "previous" / "mine.txt").write_text("previous export")
    with pytest.raises(modelkit.errors.OutputExistsError):  # restored, so OUT exists again
        modelkit.export(catalog["plain-llama"], out, progress=False)
    assert (out / "mine.txt").read_text() == "previous export" and not stash.exists()


def test_force_replaces_with_an_atomic_exchange(catalog, tmp_path):
    from modelkit.io.atomic import exchange

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    if not exchange(a, b):
        pytest.skip("no renameat2(RENAME_EXCHANGE) on this platform or filesystem")
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"
    out = tmp_path / "out"
    modelkit.export(catalog["plain-llama"], out, progress=False)
    (out / "mine.txt").write_text("old")
    modelkit.export(catalog["plain-llama"], out, force=True, progress=False)
    assert not (out / "mine.txt").exists() and (out / "config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_exported_files_get_the_umask_permissions(catalog, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "out"
        modelkit.export(catalog["plain-sharded"], out, max_shard_size="60KB", progress=False)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert set(modes.values()) == {0o644}, modes


def test_eio_on_the_folder_fsync_is_an_error(catalog, tmp_path, monkeypatch):
    at = importlib.import_module("modelkit.io.atomic")
    real = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(fd)

    monkeypatch.setattr(at.os, "fsync", fsync)
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="cannot flush the folder to disk"):
        modelkit.export(catalog["plain-llama"], out, progress=False)


def test_unbuildable_config_error_names_its_source(catalog, tmp_path):
    from modelkit.architecture.bridge import expected_tensors

    art = copy(catalog, "plain-llama", tmp_path)
    cfg = json.loads((art / "config.json").read_text())
    cfg.update(pad_token_id=cfg["vocab_size"] + 100)
    (art / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="cannot be built from this config") as e:
        expected_tensors(art / "config.json", cache=False)
    assert e.value.path == str(art / "config.json")


def test_the_source_is_never_modified_and_no_pickle_runs(catalog, tmp_path):
    art = copy(catalog, "bad-evil-pickle", tmp_path)
    before = {p: p.read_bytes() for p in art.rglob("*") if p.is_file()}
    with pytest.raises(modelkit.errors.UnsafePickleError):
        modelkit.export(art, tmp_path / "out", progress=False)
    assert {p: p.read_bytes() for p in art.rglob("*") if p.is_file()} == before
    assert not list(tmp_path.rglob("PWNED"))


def test_yaml_alias_bomb_in_compression_settings(catalog, tmp_path):
    """Nine levels of nine aliases: 387 million nodes for whoever walks the settings."""
    comp = copy(catalog, "compressed-checkpoint-N", tmp_path)
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    (comp / "compression_config.yaml").write_text("\n".join(lines) + "\n")
    before = peak_rss_mb()
    t = time.perf_counter()
    report = modelkit.inspect(comp)
    assert time.perf_counter() - t < 20 and peak_rss_mb() - before < 200
    assert any("expand to over" in f.message for f in report.findings)
