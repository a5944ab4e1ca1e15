"""Fuzz suite (issue 10): Hypothesis mutates headers, pickles, configs and indexes of
catalog artifacts; every case runs ``inspect`` (and ``export``) in a forked child
(:mod:`modelkit.testing.fuzz`) and must end in a report or a typed error, within its
time and memory budget, with no code executed, the source unchanged, nothing from outside
the artifact in the output, and no partial export.

``make test`` runs the bounded profile (``MODELKIT_FUZZ=ci``, a fixed seed, about 200
cases); ``make fuzz`` the long one (``MODELKIT_FUZZ=long``, thousands of random cases) and
writes the outcome counts to ``$MODELKIT_FUZZ_REPORT`` (see README, Reliability).
"""
from __future__ import annotations

import atexit
import collections
import json
import os
import pickle
import shutil
import struct
import tempfile
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelkit.testing.fuzz import FAILURES, SECRET, SENTINEL, plant_secret, run_case

PROFILE = os.environ.get("MODELKIT_FUZZ", "ci")
EXAMPLES = {"ci": 40, "long": int(os.environ.get("MODELKIT_FUZZ_EXAMPLES", "700"))}[PROFILE]
settings.register_profile("fuzz-ci", max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                          suppress_health_check=list(HealthCheck))
settings.register_profile("fuzz-long", max_examples=EXAMPLES, deadline=None, database=None,
                          suppress_health_check=list(HealthCheck))
FUZZ = settings.get_profile(f"fuzz-{PROFILE}")
EXPORT_SHARE = 0.25  # a quarter of the cases also export (an export costs ~10x an inspect)

COUNTS: collections.Counter = collections.Counter()
EXAMPLES_OF: dict[str, list[str]] = collections.defaultdict(list)


def _write_counts() -> None:
    path = os.environ.get("MODELKIT_FUZZ_REPORT")
    if path and COUNTS:
        Path(path).write_text(json.dumps({"profile": PROFILE, "counts": dict(COUNTS),
                                          "examples": {k: v[:5] for k, v in EXAMPLES_OF.items()}}, indent=1))


atexit.register(_write_counts)

ARTIFACTS = ("plain-llama", "plain-sharded", "plain-bin", "peft-lora", "peft-lora-bin", "dylora-b",
             "compressed-checkpoint-N", "compressed-checkpoint-0")


@pytest.fixture(scope="module")
def warm(catalog):
    """Each artifact inspected once in this process, so forked children start warm."""
    import modelkit

    for name in ARTIFACTS:
        modelkit.inspect(catalog[name])
    return catalog


# ------------------------------------------------------------------ values and damage

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70), st.sampled_from([0, 1, -1, 2**63, 2**64]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["", "\x00", "../secret-token.txt", "/etc/passwd", "bfloat16", "evil", "NaN", "yes"]))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=8)


class Case:
    """An artifact copied into a fresh folder, with a secret planted beside it."""

    def __init__(self, catalog, name: str):
        self.root = Path(tempfile.mkdtemp(prefix="modelkit-fuzz-"))
        self.folder = self.root / "art"
        shutil.copytree(catalog[name], self.folder, symlinks=True)
        self.secret = plant_secret(self.folder)
        self.name = name
        self.damage: list[str] = []

    def files(self, *suffixes: str) -> list[Path]:
        return sorted(p for p in self.folder.rglob("*") if p.is_file() and not p.is_symlink()
                      and (not suffixes or p.name.endswith(suffixes)))

    def run(self, export: bool):
        try:
            outcome = run_case(self.folder, out=self.root / "out" if export else None, sentinel_root=self.root)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
        COUNTS[outcome.kind] += 1
        COUNTS["cases"] += 1
        if outcome.kind not in ("report", "error"):
            EXAMPLES_OF[outcome.kind].append(f"{self.name}: {self.damage}: {outcome.detail[:300]}")
        if COUNTS["cases"] % 50 == 0:
            _write_counts()  # a long run stopped from outside still leaves its counts
        assert outcome.kind not in FAILURES, f"{outcome.kind} on {self.name} after {self.damage}: {outcome.detail}"
        assert outcome.seconds < 60


def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_header(path: Path, header, data: bytes) -> None:
    blob = json.dumps(header, allow_nan=True).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


@st.composite
def header_damage(draw, case: Case):
    files = case.files(".safetensors")
    if not files:
        return
    path = draw(st.sampled_from(files))
    kind = draw(st.sampled_from(["field", "metadata", "drop-field", "rename", "raw-bytes", "truncate",
                                 "length", "append", "whole-header"]))
    case.damage.append(f"{path.name}:{kind}")
    try:
        header, data = _header(path)
    except (ValueError, struct.error):
        header, data = None, b""
    if not isinstance(header, dict) or not all(isinstance(v, dict) for k, v in header.items() if k != "__metadata__"):
        kind = "raw-bytes" if kind not in ("truncate", "length", "append") else kind
        header = {}
    names = [k for k in header if k != "__metadata__"]
    if kind == "field" and names:
        name = draw(st.sampled_from(names))
        key = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        how = draw(st.sampled_from(["value", "element"]))
        if how == "element" and isinstance(header[name][key], list) and header[name][key]:
            i = draw(st.integers(0, len(header[name][key]) - 1))
            header[name][key][i] = draw(json_scalars)
        else:
            header[name][key] = draw(json_values)
        _write_header(path, header, data)
    elif kind == "metadata":
        header["__metadata__"] = draw(json_values)
        _write_header(path, header, data)
    elif kind == "drop-field" and names:
        name = draw(st.sampled_from(names))
        header[name].pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
        _write_header(path, header, data)
    elif kind == "rename" and names:
        name = draw(st.sampled_from(names))
        header[draw(st.text(max_size=20))] = header.pop(name)
        _write_header(path, header, data)
    elif kind == "whole-header":
        _write_header(path, draw(json_values), data)
    elif len(raw := bytearray(path.read_bytes())) > 1:
        if kind in ("raw-bytes", "field", "drop-field", "rename"):
            for _ in range(draw(st.integers(1, 8))):
                raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
        elif kind == "truncate":
            raw = raw[:draw(st.integers(0, len(raw) - 1))]
        elif kind == "length":
            raw[:8] = struct.pack("<Q", draw(st.one_of(st.integers(0, 2**64 - 1), st.integers(0, len(raw)))))
        else:
            raw += draw(st.binary(min_size=1, max_size=64))
        path.write_bytes(bytes(raw))


class _Touch:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _shared(levels: int):
    x: object = 0
    for _ in range(levels):
        x = [x, x]
    return x


@st.composite
def pickle_damage(draw, case: Case):
    files = case.files(".bin", ".pt")
    if not files:
        return
    path = draw(st.sampled_from(files))
    kind = draw(st.sampled_from(["flip-pkl", "truncate", "evil", "shared", "deep", "compressed", "raw-bytes",
                                 "bad-size"]))
    case.damage.append(f"{path.relative_to(case.folder)}:{kind}")
    try:
        with zipfile.ZipFile(path) as z:
            z.infolist()
        intact = True
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        intact = False
    if kind in ("truncate", "raw-bytes") or (not intact and zipfile.is_zipfile(path)) or path.stat().st_size < 2:
        raw = bytearray(path.read_bytes()) or bytearray(b"\0\0")
        if kind == "truncate":
            raw = raw[:draw(st.integers(0, len(raw) - 1))]
        else:
            for _ in range(draw(st.integers(1, 16))):
                raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
        path.write_bytes(bytes(raw))
        return
    if not zipfile.is_zipfile(path):
        path.write_bytes(pickle.dumps({"x": _Touch(str(case.root / SENTINEL))}, protocol=2))
        return
    try:
        with zipfile.ZipFile(path) as z:
            members = {i.filename: z.read(i.filename) for i in z.infolist()}
    except Exception:  # noqa: BLE001 - damaged by an earlier mutation (bad CRC, ...): leave it
        return
    pkl = next((n for n in members if n.endswith("data.pkl")), None)
    if pkl is None or not members[pkl]:
        return
    data = bytearray(members[pkl])
    if kind == "flip-pkl":
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    elif kind == "evil":
        data = bytearray(pickle.dumps({"state": _Touch(str(case.root / SENTINEL))}, protocol=2))
    elif kind == "shared":
        data = bytearray(pickle.dumps({"w": _shared(draw(st.integers(20, 40)))}, protocol=2))
    elif kind == "deep":
        n = draw(st.integers(1000, 200_000))
        data = bytearray(b"\x80\x02" + b"]" * n + b"a" * (n - 1) + b".")
    elif kind == "bad-size":  # a tensor record whose size is not a tuple of non-negative ints
        data = bytearray(bytes(data).replace(b"K\x03K\x04", b"J\xff\xff\xff\xff", 1))
    members[pkl] = bytes(data)
    method = zipfile.ZIP_DEFLATED if kind == "compressed" else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", method) as z:
        for name, blob in members.items():
            z.writestr(name, blob)


CONFIG_KEYS = ["model_type", "num_hidden_layers", "hidden_size", "vocab_size", "torch_dtype", "dtype",
               "num_attention_heads", "intermediate_size", "tie_word_embeddings", "architectures", "auto_map",
               "num_experts", "lora_alpha", "lora_r", "_dylora_num_experts", "_dylora_lora_alpha",
               "base_model_name_or_path", "r", "use_rslora", "target_modules", "peft_type", "rank",
               "projections", "model_name", "compressed_layer_indices", "total_layers", "rms_norm_eps"]


@st.composite
def config_damage(draw, case: Case):
    files = case.files(".json", ".yaml")
    files = [p for p in files if not p.name.endswith(".index.json")] or files
    if not files:
        return
    path = draw(st.sampled_from(files))
    kind = draw(st.sampled_from(["key", "drop", "whole", "truncate", "nested", "bigint", "symlink-secret",
                                 "symlink-device", "fifo", "folder", "alias-bomb"]))
    case.damage.append(f"{path.relative_to(case.folder)}:{kind}")
    text = path.read_text()
    if kind in ("key", "drop"):
        try:
            data = json.loads(text) if path.suffix == ".json" else None
        except (ValueError, RecursionError):  # an earlier mutation nested it too deeply
            data = None
        if not isinstance(data, dict):
            kind = "truncate"
        else:
            key = draw(st.sampled_from(CONFIG_KEYS + sorted(data)))
            if kind == "key":
                data[key] = draw(json_values)
            else:
                data.pop(key, None)
            path.write_text(json.dumps(data, allow_nan=True))
            return
    if kind == "whole":
        path.write_text(json.dumps(draw(json_values), allow_nan=True))
    elif kind == "truncate":
        path.write_text(text[:draw(st.integers(0, max(len(text) - 1, 0)))])
    elif kind == "nested":
        n = draw(st.integers(100, 100_000))
        path.write_text('{"a": ' + "[" * n + "]" * n + "}" if path.suffix == ".json" else "a: " + "[" * n + "]" * n)
    elif kind == "alias-bomb":
        width, depth = draw(st.integers(2, 12)), draw(st.integers(2, 12))
        lines = [f"a0: &a0 [{', '.join(['x'] * width)}]"]
        lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]" for i in range(1, depth)]
        path.write_text("\n".join(lines) + "\n")
    elif kind == "bigint":
        path.write_text('{"model_type": "llama", "num_hidden_layers": ' + "9" * draw(st.integers(20, 6000)) + "}")
    elif kind == "symlink-secret":
        path.unlink()
        os.symlink(case.secret, path)
    elif kind == "symlink-device":
        path.unlink()
        os.symlink(draw(st.sampled_from(["/dev/zero", "/dev/urandom", "/dev/null"])), path)
    elif kind == "fifo":
        path.unlink()
        os.mkfifo(path)
    else:
        path.unlink()
        path.mkdir()


@st.composite
def index_damage(draw, case: Case):
    files = case.files(".index.json")
    if not files:
        return
    path = draw(st.sampled_from(files))
    try:
        index = json.loads(path.read_text())
    except (ValueError, RecursionError):
        index = None
    kind = draw(st.sampled_from(["value", "entry", "weight_map", "many", "outside"]))
    if not isinstance(index, dict):
        index = {}
    wm = index.get("weight_map")
    if not (isinstance(wm, dict) and wm and all(isinstance(v, str) for v in wm.values())):
        kind = "weight_map"
    case.damage.append(f"{path.name}:{kind}")
    if kind == "value":
        wm[draw(st.sampled_from(sorted(wm)))] = draw(json_values)
    elif kind == "entry":
        wm[draw(st.text(max_size=30))] = draw(st.sampled_from(sorted(set(wm.values()))))
    elif kind == "weight_map":
        index["weight_map"] = draw(json_values)
    elif kind == "many":
        shard = sorted(set(wm.values()))[0]
        wm.update({f"model.ghost.{i}.weight": shard for i in range(draw(st.integers(1, 50_000)))})
    else:
        wm[draw(st.sampled_from(sorted(wm)))] = draw(st.sampled_from(
            ["../secret-token.txt", "/etc/passwd", "../../art/x", "sub/../../secret-token.txt", "\x00"]))
    path.write_text(json.dumps(index, allow_nan=True))


@st.composite
def escape_damage(draw, case: Case):
    """A file the kit reads or copies (tokenizer, generation config, template) linked out."""
    name = draw(st.sampled_from(["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                 "generation_config.json", "chat_template.jinja", "vocab.json", "merges.txt",
                                 "tokenizer.model", "model.safetensors", "config.json"]))
    target = case.folder / name
    case.damage.append(f"{name}:symlink-out")
    if target.exists() or target.is_symlink():
        target.unlink()
    os.symlink(draw(st.sampled_from([str(case.secret), "../secret-token.txt", "/etc/hostname"])), target)


def _fuzz(warm, data, damage, artifacts=ARTIFACTS):
    case = Case(warm, data.draw(st.sampled_from(artifacts), label="artifact"))
    for _ in range(data.draw(st.integers(1, 2), label="mutations")):
        data.draw(damage(case))
    case.run(export=data.draw(st.floats(0, 1)) < EXPORT_SHARE)


@FUZZ
@given(data=st.data())
def test_fuzz_safetensors_headers(warm, data):
    _fuzz(warm, data, header_damage, ("plain-llama", "plain-sharded", "peft-lora", "compressed-checkpoint-N"))


@FUZZ
@given(data=st.data())
def test_fuzz_pickles(warm, data):
    _fuzz(warm, data, pickle_damage, ("plain-bin", "peft-lora-bin", "dylora-b", "compressed-checkpoint-N",
                                      "compressed-checkpoint-0"))


@FUZZ
@given(data=st.data())
def test_fuzz_configs(warm, data):
    _fuzz(warm, data, config_damage)


@FUZZ
@given(data=st.data())
def test_fuzz_indexes(warm, data):
    _fuzz(warm, data, index_damage, ("plain-sharded",))


@FUZZ
@given(data=st.data())
def test_fuzz_escapes(warm, data):
    _fuzz(warm, data, escape_damage, ("plain-llama", "plain-sharded", "peft-lora"))


def test_the_runner_sees_each_failure_kind(catalog, tmp_path, monkeypatch):
    """The judge is not blind: a hang, an executed pickle and a modified source are caught."""
    import modelkit.ops.inspect

    folder = tmp_path / "art"
    shutil.copytree(catalog["plain-llama"], folder)
    first = run_case(folder)
    assert first.kind == "report", first.detail

    def hang(*a, **k):
        import time
        time.sleep(60)
    monkeypatch.setattr(modelkit.ops.inspect, "inspect_artifact", hang)
    assert run_case(folder, seconds=2).kind == "hang"

    def execute(artifact, **k):
        (tmp_path / SENTINEL).write_text("ran")
        raise RuntimeError("boom")
    monkeypatch.setattr(modelkit.ops.inspect, "inspect_artifact", execute)
    assert run_case(folder, sentinel_root=tmp_path).kind == "executed"
    (tmp_path / SENTINEL).unlink()

    monkeypatch.setattr(modelkit.ops.inspect, "inspect_artifact", lambda artifact, **k: 1 / 0)
    assert run_case(folder).kind == "traceback"

    def modify(artifact, **k):
        (folder / "config.json").write_text("{}")
        raise modelkit.errors.ConfigError("x")
    monkeypatch.setattr(modelkit.ops.inspect, "inspect_artifact", modify)
    assert run_case(folder).kind == "modified"

    def blow(artifact, **k):
        return bytearray(2 * 2**30)
    monkeypatch.setattr(modelkit.ops.inspect, "inspect_artifact", blow)
    assert run_case(folder, memory_mb=512).kind == "memory"
    assert SECRET not in (folder / "config.json").read_bytes()
