"""Tar headers read in one struct unpack instead of tarfile's twenty-odd field calls.

A layer is mostly small entries (symlinks, directories, short files), so decoding each 512-byte
header is a large share of applying it. `LayerTarInfo` decodes the common header (ustar or GNU,
octal numbers, the unsigned checksum) itself and hands every other one (base-256 numbers, a
signed checksum, old GNU sparse entries, anything malformed) to tarfile's own `frombuf`, so a
header either reads exactly as tarfile reads it or is left to tarfile. Extended headers (pax,
GNU long names) are still tarfile's: they go through `_proc_member` as before.
"""

from __future__ import annotations

import struct
import tarfile
from typing import Self

# name, mode, uid, gid, size, mtime, chksum, type, linkname, (magic, version), uname, gname,
# devmajor, devminor, prefix: tarfile.frombuf's slices, in order.
HEADER = struct.Struct("100s8s8s8s12s12s8sc100s8x32s32s8s8s155s")
# The checksum sums the header with its own field counted as spaces (8 * 0x20 = 256).
CHECKSUM_BYTES = struct.Struct("148B8x356B")
CHECKSUM_FIELD_AS_SPACES = 256
BASE_256_MARKS = (0o200, 0o377)


class LayerTarInfo(tarfile.TarInfo):
    """tarfile's member, its plain headers decoded in one pass (`tarfile.open(tarinfo=...)`)."""

    __slots__ = ()

    @classmethod
    def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> Self:
        if len(buf) != tarfile.BLOCKSIZE or buf[156:157] == tarfile.GNUTYPE_SPARSE:
            return super().frombuf(buf, encoding, errors)
        try:
            return cls._plain_header(buf, encoding, errors)
        except ValueError:  # not a plain header: tarfile decides what it is, or refuses it
            return super().frombuf(buf, encoding, errors)

    @classmethod
    def _plain_header(cls, buf: bytes | bytearray, encoding: str, errors: str) -> Self:
        (name, mode, uid, gid, size, mtime, checksum, kind, linkname, uname, gname, major, minor,
         prefix) = HEADER.unpack_from(buf)  # fmt: skip
        member = cls()
        member.chksum = _octal(checksum)
        if member.chksum != CHECKSUM_FIELD_AS_SPACES + sum(CHECKSUM_BYTES.unpack_from(buf)):
            raise ValueError("not the unsigned checksum")
        member.name = _text(name, encoding, errors)
        member.mode, member.uid, member.gid = _octal(mode), _octal(uid), _octal(gid)
        member.size, member.mtime = _octal(size), _octal(mtime)
        member.type = kind
        member.linkname = _text(linkname, encoding, errors)
        member.uname, member.gname = _text(uname, encoding, errors), _text(gname, encoding, errors)
        member.devmajor, member.devminor = _octal(major), _octal(minor)
        # What tarfile.frombuf does after the fields, in its order.
        if member.type == tarfile.AREGTYPE and member.name.endswith("/"):
            member.type = tarfile.DIRTYPE  # an old V7 directory: a file named with a slash
        if member.isdir():
            member.name = member.name.rstrip("/")
        full_prefix = _text(prefix, encoding, errors)
        if full_prefix and member.type not in tarfile.GNU_TYPES:
            member.name = full_prefix + "/" + member.name
        return member


def _octal(field: bytes) -> int:
    """An octal number field as tarfile's `nti` reads it; ValueError for any other encoding
    (base-256 or not ASCII octal: tarfile reads or refuses those)."""
    if field[0] in BASE_256_MARKS:
        raise ValueError("base-256 number")
    end = field.find(b"\0")
    digits = field if end < 0 else field[:end]
    # int() strips the ASCII whitespace that bytes.strip() does; what else tarfile's str.strip()
    # would take (\x1c-\x1f) makes int() raise, and then tarfile reads the header.
    return int(digits, 8) if digits.strip() else 0


def _text(field: bytes, encoding: str, errors: str) -> str:
    """A NUL-terminated text field, as tarfile's `nts` reads it."""
    end = field.find(b"\0")
    return (field if end < 0 else field[:end]).decode(encoding, errors)
