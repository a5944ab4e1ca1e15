"""The fast zip-member reader behind pickle listing: the same bytes as ``zipfile`` for
what torch.save writes, and None (so ``zipfile`` decides) for anything else."""
from __future__ import annotations

import zipfile

import torch

from modelkit.io.tensors import read_pickle_skeleton
from modelkit.io.zipmembers import read_zip_member


def is_pkl(name: str) -> bool:
    return name.endswith("/data.pkl") and name.count("/") == 1


def test_reads_data_pkl_of_a_torch_save_like_zipfile(tmp_path):
    path = tmp_path / "layer.pt"
    torch.save({"core": torch.zeros(3, 4), "wrappers": [{"U": torch.ones(4, 2)} for _ in range(5)],
                "layer_idx": 2}, path)
    with zipfile.ZipFile(path) as z:
        expected = z.read(next(n for n in z.namelist() if is_pkl(n)))
    assert read_zip_member(path, is_pkl) == expected
    skeleton = read_pickle_skeleton(path)
    assert skeleton["layer_idx"] == 2 and skeleton["core"].shape == (3, 4)
    assert [w["U"].shape for w in skeleton["wrappers"]] == [(4, 2)] * 5


def test_anything_unusual_is_left_to_zipfile(tmp_path):
    deflated = tmp_path / "deflated.zip"
    with zipfile.ZipFile(deflated, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"x" * 1000)
    assert read_zip_member(deflated, is_pkl) is None
    twice = tmp_path / "twice.zip"
    with zipfile.ZipFile(twice, "w") as z:
        z.writestr("a/data.pkl", b"1")
        z.writestr("b/data.pkl", b"2")
    assert read_zip_member(twice, is_pkl) is None
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"not a zip at all" * 100)
    assert read_zip_member(plain, is_pkl) is None
    assert read_zip_member(tmp_path / "absent.pt", is_pkl) is None


def test_a_corrupted_member_is_not_trusted(tmp_path):
    path = tmp_path / "layer.pt"
    torch.save({"w": torch.zeros(2)}, path)
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if is_pkl(i.filename))
    raw = bytearray(path.read_bytes())
    start = raw.index(b"\x80", info.header_offset + 30)  # the pickle's PROTO opcode
    raw[start + 5] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert read_zip_member(path, is_pkl) is None  # CRC mismatch
