"""Names to numbers without a name service (adapter/core/identity.py): Docker's rules, and an
image's /etc read as the hostile thing it may be."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from adapter.core.errors import InvalidArgument
from adapter.core.identity import (
    MAX_ETC_BYTES,
    EtcFiles,
    HostIdentities,
    host_etc,
    image_etc,
    resolve_identity,
    workload_identity,
)
from adapter.core.model import Identity, LinuxOptions

PASSWD = """\
root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
web:x:1000:1000:Web,,,:/home/web:/bin/sh
nohome:x:1001:1001::
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
"""
GROUP = """\
root:x:0:
daemon:x:1:web
web:x:1000:
audio:x:29:web, root
staff:x:50:web,daemon
nogroup:x:65534:
"""
ETC = EtcFiles(PASSWD, GROUP, "the image's")


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        (None, Identity(0, 0, (29,), "/root")),  # root is a member of audio
        ("", Identity(0, 0, (29,), "/root")),
        ("root", Identity(0, 0, (29,), "/root")),
        ("web", Identity(1000, 1000, (1, 29, 50), "/home/web")),
        ("1000", Identity(1000, 1000, (1, 29, 50), "/home/web")),  # a uid with an entry
        ("4242", Identity(4242, 0, (), "/")),  # runc: a uid without an entry gets gid 0
        ("nohome", Identity(1001, 1001, (), "/")),
        ("web:staff", Identity(1000, 50, (), "/home/web")),  # explicit group: only that one
        ("web:77", Identity(1000, 77, (), "/home/web")),
        ("4242:staff", Identity(4242, 50, (), "/")),
        ("4242:4343", Identity(4242, 4343, (), "/")),
        ("daemon", Identity(1, 1, (50,), "/usr/sbin")),  # its primary group is not repeated
    ],
)
def test_every_user_form(user: str | None, expected: Identity) -> None:
    assert resolve_identity(user, ETC) == expected


def test_group_replaces_the_primary_gid_and_extra_groups_follow_deduplicated() -> None:
    identity = resolve_identity("web", ETC, group=50, extra_groups=(7, 29, 7, 50, 8))
    assert identity == Identity(1000, 50, (1, 29, 7, 8), "/home/web")


@pytest.mark.parametrize(
    ("user", "words"),
    [
        ("ghost", ("ghost", "no such user", "the image's /etc/passwd")),
        ("web:ghosts", ("ghosts", "no such group", "the image's /etc/group")),
        ("web:", ("empty group",)),
        ("99999999999", ("not a number",)),
        ("-1", ("no such user",)),
        ("web:-5", ("no such group",)),
    ],
)
def test_what_cannot_be_resolved_names_command_user(user: str, words: tuple[str, ...]) -> None:
    with pytest.raises(InvalidArgument) as refused:
        resolve_identity(user, ETC)
    assert refused.value.field == "command.user"
    for word in words:
        assert word in str(refused.value)


@pytest.mark.parametrize(
    ("options", "field"),
    [({"group": -1}, "linux.group"), ({"extra_groups": (2**32,)}, "linux.supplementary_groups")],
)
def test_group_numbers_out_of_range_name_their_field(
    options: dict[str, object], field: str
) -> None:
    with pytest.raises(InvalidArgument) as refused:
        resolve_identity("web", ETC, **options)  # type: ignore[arg-type]
    assert refused.value.field == field


def test_malformed_lines_are_skipped() -> None:
    passwd = "\n".join(
        [
            "# a comment",
            "+nis::0:0:::",
            "short:x:7",
            "badid:x:abc:1:::",
            "badgid:x:8:-1:::",
            ":x:9:9:::",
            "huge:x:4294967296:0:::",
            "ok:x:10:10:ok:/home/ok:/bin/sh",
            "ok:x:11:11:shadowed:/elsewhere:/bin/sh",  # the first entry wins
        ]
    )
    group = "broken\nok2:x:notanumber:ok\nokgroup:x:12:ok,,\n"
    etc = EtcFiles(passwd, group)
    assert resolve_identity("ok", etc) == Identity(10, 10, (12,), "/home/ok")
    for name in ("short", "badid", "badgid", "huge", "nis", "+nis"):
        with pytest.raises(InvalidArgument):
            resolve_identity(name, etc)


def test_no_files_at_all_still_resolve_numbers_and_root() -> None:
    assert resolve_identity(None, EtcFiles()) == Identity(0, 0, (), "/")
    assert resolve_identity("5:6", EtcFiles()) == Identity(5, 6, (), "/")
    with pytest.raises(InvalidArgument, match="no such user"):
        resolve_identity("root", EtcFiles())


# --- an image's files, read without trusting it ------------------------------------------------


def image(tmp_path: Path, passwd: str = PASSWD, group: str = GROUP) -> Path:
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc" / "passwd").write_text(passwd)
    (rootfs / "etc" / "group").write_text(group)
    return rootfs


def test_an_images_files_are_read(tmp_path: Path) -> None:
    etc = image_etc(image(tmp_path))
    assert (etc.passwd, etc.group, etc.origin) == (PASSWD, GROUP, "the image's")


def test_a_symlinked_passwd_is_never_followed(tmp_path: Path) -> None:
    secret = tmp_path / "shadow"
    secret.write_text("root:$6$secret:19000:0:99999:7:::\nweb:x:1000:1000::/:/bin/sh\n")
    rootfs = image(tmp_path)
    for name in ("passwd", "group"):
        (rootfs / "etc" / name).unlink()
        (rootfs / "etc" / name).symlink_to(secret)
    assert image_etc(rootfs) == EtcFiles("", "", "the image's")
    with pytest.raises(InvalidArgument, match="no such user"):
        resolve_identity("web", image_etc(rootfs))


def test_a_symlinked_etc_directory_is_never_followed(tmp_path: Path) -> None:
    host_like = image(tmp_path / "elsewhere")
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    (rootfs / "etc").symlink_to(host_like / "etc")
    assert image_etc(rootfs) == EtcFiles("", "", "the image's")


def test_files_that_are_not_regular_read_as_absent(tmp_path: Path) -> None:
    rootfs = image(tmp_path)
    (rootfs / "etc" / "passwd").unlink()
    os.mkfifo(rootfs / "etc" / "passwd")  # would block a plain open forever
    (rootfs / "etc" / "group").unlink()
    (rootfs / "etc" / "group").mkdir()
    assert image_etc(rootfs) == EtcFiles("", "", "the image's")


def test_missing_files_read_as_empty(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    assert image_etc(rootfs) == EtcFiles("", "", "the image's")
    (rootfs / "etc").write_text("not a directory")
    assert image_etc(rootfs) == EtcFiles("", "", "the image's")


def test_a_huge_file_is_read_only_up_to_the_bound_and_never_a_cut_line(tmp_path: Path) -> None:
    filler = "x" * 60 + ":x:5:5::/:/bin/sh\n"
    lines = MAX_ETC_BYTES // len(filler)
    cut = f"late:x:{'1' * 40}:0::/:/bin/sh\n"  # straddles the bound: its uid would be cut short
    padding = MAX_ETC_BYTES - lines * len(filler) - 10
    passwd = filler * lines + "#" * padding + "\n" + cut + "far:x:6:6::/:/bin/sh\n" * 100_000
    etc = image_etc(image(tmp_path, passwd=passwd))
    assert len(etc.passwd.encode()) <= MAX_ETC_BYTES
    assert etc.passwd.endswith("\n") and "late" not in etc.passwd
    with pytest.raises(InvalidArgument, match="no such user"):
        resolve_identity("far", etc)


def test_undecodable_bytes_do_not_stop_the_rest(tmp_path: Path) -> None:
    rootfs = image(tmp_path)
    (rootfs / "etc" / "passwd").write_bytes(b"\xff\xfe:x:1:1::/:/bin/sh\n" + PASSWD.encode())
    assert resolve_identity("web", image_etc(rootfs)).uid == 1000


def test_the_hosts_files_are_read() -> None:
    etc = host_etc()
    assert etc.origin == "the host's"
    assert resolve_identity("root", etc).uid == 0


async def test_workload_identity_reads_the_rootfs_or_the_host(tmp_path: Path) -> None:
    linux = LinuxOptions(group=50, supplementary_groups=(9,))
    in_image = await workload_identity("web", linux, image(tmp_path))
    assert in_image == Identity(1000, 50, (1, 29, 9), "/home/web")
    on_host = await workload_identity(None, LinuxOptions(), None)
    assert (on_host.uid, on_host.gid) == (0, 0)


def test_host_identities_are_resolved_again_when_the_files_change(tmp_path: Path) -> None:
    passwd, group = tmp_path / "passwd", tmp_path / "group"
    passwd.write_text(PASSWD)
    group.write_text("root:x:0:\nweb:x:1000:\n")
    identities = HostIdentities((passwd, group))
    assert identities.resolve("web", LinuxOptions()) == Identity(1000, 1000, (), "/home/web")
    assert identities.resolve(None, LinuxOptions()) == Identity(0, 0, (), "/root")

    # Replaced, as useradd and vipw do: a new inode; and rewritten in place, longer.
    replacement = tmp_path / "group.new"
    replacement.write_text("root:x:0:\nweb:x:1000:\nlogs:x:4:web\n")
    replacement.rename(group)
    assert identities.resolve("web", LinuxOptions()).groups == (4,)
    with passwd.open("a") as appended:
        appended.write("late:x:1500:1500::/srv/late:/bin/sh\n")
    assert identities.resolve("late", LinuxOptions()) == Identity(1500, 1500, (), "/srv/late")


def test_host_identities_keep_no_failed_lookup(tmp_path: Path) -> None:
    passwd, group = tmp_path / "passwd", tmp_path / "group"
    passwd.write_text(PASSWD)
    group.write_text(GROUP)
    identities = HostIdentities((passwd, group))
    with pytest.raises(InvalidArgument, match="no such user in the host's /etc/passwd"):
        identities.resolve("ghost", LinuxOptions())
    with pytest.raises(InvalidArgument, match="ghost"):
        identities.resolve("ghost", LinuxOptions())
    assert identities.resolve(
        "web", LinuxOptions(group=7, supplementary_groups=(8,))
    ) == resolve_identity("web", EtcFiles(PASSWD, GROUP), group=7, extra_groups=(8,))
