"""Layer tar headers decoded in one pass read exactly as tarfile reads them: every field of
every member, and the same refusal for a header tarfile refuses."""

from __future__ import annotations

import io
import struct
import tarfile

import pytest

from adapter.images.tar_headers import LayerTarInfo

FIELDS = (
    "name", "mode", "uid", "gid", "size", "mtime", "chksum", "type", "linkname", "uname",
    "gname", "devmajor", "devminor", "offset", "offset_data", "pax_headers", "sparse",
)  # fmt: skip


def archive(format: int, members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=format) as out:
        for member, data in members:
            out.addfile(member, io.BytesIO(data) if data else None)
    return buffer.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", **fields: object):
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mode, info.mtime = kind, len(data), 0o4755, 1_700_000_000
    for field, value in fields.items():
        setattr(info, field, value)
    return info, data


MEMBERS = [
    member("bin", tarfile.DIRTYPE),
    member("bin/busybox", data=b"\x7fELF" * 300, uid=1000, gid=1000, uname="u", gname="g"),
    member("bin/sh", tarfile.SYMTYPE, linkname="busybox"),
    member("bin/hard", tarfile.LNKTYPE, linkname="bin/busybox"),
    member("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3),
    member("run/fifo", tarfile.FIFOTYPE),
    member("d" * 90 + "/" + "e" * 90, data=b"ustar prefix or a long name"),
    member("f" * 150, data=b"a long name", linkname="l" * 120),
    member("caf\N{LATIN SMALL LETTER E WITH ACUTE}", data=b"utf-8 name"),
]
BIG_NUMBERS = [member("big", data=b"x", uid=8**8, gid=8**9, mtime=-1)]


@pytest.mark.parametrize(
    ("format", "members"),
    [
        (tarfile.USTAR_FORMAT, MEMBERS[:6] + MEMBERS[6:7]),
        (tarfile.GNU_FORMAT, MEMBERS + BIG_NUMBERS),
        (tarfile.PAX_FORMAT, MEMBERS + BIG_NUMBERS),
    ],
    ids=["ustar", "gnu", "pax"],
)
def test_archives_read_as_tarfile_reads_them(
    format: int, members: list[tuple[tarfile.TarInfo, bytes]]
) -> None:
    data = archive(format, members)
    assert read_all(data, LayerTarInfo) == read_all(data, tarfile.TarInfo)
    assert len(read_all(data, LayerTarInfo)) >= len(members)


def read_all(data: bytes, tarinfo: type[tarfile.TarInfo]) -> list[dict[str, object]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:", tarinfo=tarinfo) as read:
        members = read.getmembers()
    assert all(type(found) is tarinfo for found in members)
    return [{field: getattr(found, field) for field in FIELDS} for found in members]


def header(**fields: bytes) -> bytes:
    """One ustar header block of a small file, its fields replaced raw, its checksum fixed
    unless `chksum` is given."""
    block = bytearray(tarfile.TarInfo("file").tobuf(tarfile.USTAR_FORMAT))
    offsets = {"name": 0, "mode": 100, "uid": 108, "size": 124, "mtime": 136, "type": 156}
    offsets |= {"devmajor": 329, "prefix": 345}
    for field, value in fields.items():
        if field != "chksum":
            block[offsets[field] : offsets[field] + len(value)] = value
    checksum = fields.get("chksum")
    if checksum is None:
        checksum = b"%06o\0 " % (256 + sum(struct.unpack_from("148B8x356B", block)))
    block[148:156] = checksum
    return bytes(block)


def signed_checksum(block: bytes) -> bytes:
    return b"%06o\0 " % (256 + sum(struct.unpack_from("148b8x356b", block)))


HIGH_BIT_NAME = header(name=b"\xe9\xe9\0")
HEADERS = {
    "plain": header(),
    "spaces around numbers": header(mode=b" 0755  \0", uid=b"      7\0"),
    "numbers without a NUL": header(mode=b"00000755", size=b"00000000000\0"),
    "empty numbers": header(uid=b"\0" * 8, devmajor=b"\0" * 8),
    "blank numbers": header(uid=b"       \0"),
    "a number after a NUL": header(uid=b"\x001234567"),
    "control characters around a number": header(uid=b"\x1c0000007\0"),
    "not octal": header(mode=b"0000789\0"),
    "not ascii": header(mode=b"000\xff755\0"),
    "base-256": header(uid=b"\x80" + b"\0" * 6 + b"\x07"),
    "negative base-256": header(mtime=b"\xff" * 12),
    "signed checksum": HIGH_BIT_NAME[:148] + signed_checksum(HIGH_BIT_NAME) + HIGH_BIT_NAME[156:],
    "bad checksum": header(chksum=b"0000001\0"),
    "all zeros": bytes(512),
    "v7 directory": header(name=b"dir/\0", type=b"\0"),
    "directory slashes": header(name=b"dir///\0", type=tarfile.DIRTYPE),
    "ustar prefix": header(prefix=b"some/prefix\0"),
    "gnu sparse": header(type=tarfile.GNUTYPE_SPARSE),
    "short": header()[:300],
}


@pytest.mark.parametrize("block", HEADERS.values(), ids=HEADERS.keys())
def test_a_header_reads_or_is_refused_as_tarfile_does(block: bytes) -> None:
    expected = decoded(tarfile.TarInfo, block)
    assert decoded(LayerTarInfo, block) == expected


def decoded(tarinfo: type[tarfile.TarInfo], block: bytes) -> object:
    try:
        found = tarinfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.HeaderError as exc:
        return (type(exc), str(exc))
    fields = {field: getattr(found, field) for field in FIELDS}
    return fields | {"sparse_structs": getattr(found, "_sparse_structs", None)}
