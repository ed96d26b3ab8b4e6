"""Image references: canonical spelling, and malformed ones refused naming container.image."""

from __future__ import annotations

import pytest

from adapter.core.errors import InvalidArgument
from adapter.images.reference import canonical, parse_reference


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("busybox", "docker.io/library/busybox:latest"),
        ("library/busybox:1.36", "docker.io/library/busybox:1.36"),
        ("localhost/busybox", "localhost/busybox:latest"),
        ("localhost/busybox:latest", "localhost/busybox:latest"),
        ("127.0.0.1:5000/team/busybox:1", "127.0.0.1:5000/team/busybox:1"),
        ("localhost:5000/busybox", "localhost:5000/busybox:latest"),
        ("[::1]:5000/busybox:v2", "[::1]:5000/busybox:v2"),
        ("registry.example/a/b_c--d:tag-1.0", "registry.example/a/b_c--d:tag-1.0"),
        (f"localhost/busybox@sha256:{'a' * 64}", f"localhost/busybox@sha256:{'a' * 64}"),
    ],
)
def test_references_are_canonical(given: str, expected: str) -> None:
    assert canonical(given) == expected


def test_parts_of_a_reference() -> None:
    reference = parse_reference("127.0.0.1:5000/team/busybox:1")
    assert (reference.domain, reference.path, reference.tag) == (
        "127.0.0.1:5000",
        "team/busybox",
        "1",
    )
    assert reference.digest is None


@pytest.mark.parametrize(
    "malformed",
    [
        "",
        " busybox",
        "Busybox",
        "busybox:",
        "busybox:bad tag",
        "localhost/../etc:1",
        "localhost//busybox",
        "busybox@sha256:short",
        "busybox@md5:" + "a" * 32,
        "a" * 500,
        "bad\x00ref",
        "-lead/busybox",
        "localhost/busybox:" + "t" * 129,
    ],
)
def test_malformed_references_name_the_field(malformed: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        parse_reference(malformed)
    assert raised.value.field == "container.image"
    assert "not a valid image reference" in str(raised.value)


def test_the_field_can_be_named_by_the_caller() -> None:
    with pytest.raises(InvalidArgument) as raised:
        parse_reference("UPPER", field="reference")
    assert raised.value.field == "reference"
