"""Read one small member of a large zip (a torch pickle's ``data.pkl``) without building
the whole directory.

``zipfile.ZipFile`` makes a ``ZipInfo`` object for every member; a compressed-MoE layer
file holds ~520 (one per storage), so listing a real checkpoint's 144 layer files spent
more time building directory objects than unpickling the structure. This scans the
central directory with ``struct`` only and reads the one member asked for, checking its
local header and CRC as ``zipfile`` does. Anything it does not expect (compressed or
encrypted members, zip64 fields on that member, several matches) returns None, and the
caller falls back to ``zipfile`` — so it can be faster, never more permissive.
"""
from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from typing import Callable

_EOCD = struct.Struct("<4sHHHHIIH")            # end of central directory
_EOCD64_LOCATOR = struct.Struct("<4sIQI")
_EOCD64 = struct.Struct("<4sQHHIIQQQQ")
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")  # central directory file header
_LOCAL = struct.Struct("<4sHHHHHIIIHH")         # local file header
_NAME_LENGTHS = struct.Struct("<HHH")            # name, extra, comment lengths: at 28 in a central header
_CENTRAL_SIG = b"PK\x01\x02"
_MAX_TAIL = 22 + 0xFFFF                          # EOCD plus the longest comment


def _directory(f, size: int) -> tuple[int, int, int] | None:
    """(central directory offset, size, entries), or None."""
    tail_len = min(size, _MAX_TAIL)
    f.seek(size - tail_len)
    tail = f.read(tail_len)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or at + _EOCD.size > len(tail):
        return None
    _, disk, _, _, entries, cd_size, cd_offset, _ = _EOCD.unpack_from(tail, at)
    if disk != 0:
        return None
    if entries == 0xFFFF or cd_size == 0xFFFFFFFF or cd_offset == 0xFFFFFFFF:
        loc = at - _EOCD64_LOCATOR.size
        if loc < 0:
            return None
        sig, _, eocd64_at, _ = _EOCD64_LOCATOR.unpack_from(tail, loc)
        if sig != b"PK\x06\x07" or eocd64_at + _EOCD64.size > size:
            return None
        f.seek(eocd64_at)
        rec = f.read(_EOCD64.size)
        sig, _, _, _, _, _, _, entries, cd_size, cd_offset = _EOCD64.unpack(rec)
        if sig != b"PK\x06\x06":
            return None
    if cd_offset + cd_size > size:
        return None
    return cd_offset, cd_size, entries


def read_zip_member(path: Path | str, want: Callable[[str], bool], contains: bytes = b"") -> bytes | None:
    """The bytes of the one stored (uncompressed) member whose name satisfies ``want``, or
    None when there is not exactly one, or the zip is anything but plain. ``contains``: bytes
    every wanted name holds as encoded (e.g. ``b"/data.pkl"``); names without them are
    passed over undecoded (a torch layer file has ~500 members, one of them wanted)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            found = _directory(f, size)
            if found is None:
                return None
            cd_offset, cd_size, entries = found
            f.seek(cd_offset)
            cd = f.read(cd_size)
            pos, match, head, end = 0, None, _CENTRAL.size, len(cd)
            for _ in range(entries):
                if pos + head > end or not cd.startswith(_CENTRAL_SIG, pos):
                    return None
                n, m, k = _NAME_LENGTHS.unpack_from(cd, pos + 28)
                at = pos + head
                if cd.find(contains, at, at + n) >= 0:  # clamped at the end, as the slice is
                    name = cd[at:at + n].decode("utf-8", "replace")
                    if want(name):
                        if match is not None:
                            return None
                        (_, _, _, flags, method, _, _, crc, csize, usize, _, _, _, _, _, _,
                         offset) = _CENTRAL.unpack_from(cd, pos)
                        match = (name, flags, method, crc, csize, usize, offset)
                pos = at + n + m + k
            if match is None:
                return None
            name, flags, method, crc, csize, usize, offset = match
            if method != 0 or flags & 0x1 or csize != usize or 0xFFFFFFFF in (csize, offset):
                return None
            f.seek(offset)
            local = f.read(_LOCAL.size)
            if len(local) != _LOCAL.size:
                return None
            sig, _, _, _, _, _, _, _, _, n, m = _LOCAL.unpack(local)
            if sig != b"PK\x03\x04" or f.read(n).decode("utf-8", "replace") != name:
                return None
            f.seek(m, 1)
            data = f.read(csize)
    except OSError:
        return None
    if len(data) != csize or zlib.crc32(data) != crc:
        return None
    return data
