"""Image references: `[host[:port]/]path[:tag][@sha256:hex]` -> one canonical spelling.

Canonical form follows Docker's normalisation so that `busybox`, `library/busybox:latest` and
`docker.io/library/busybox:latest` name the same image: a first component without `.` or `:`
that is not `localhost` is part of the path (domain `docker.io`, `library/` for one-component
paths), and a missing tag is `latest`. The grammar is the distribution spec's
(distribution/reference: reference.go); anything else is refused before it reaches disk or a
registry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from adapter.core.errors import InvalidArgument

DEFAULT_DOMAIN = "docker.io"
DEFAULT_TAG = "latest"
MAX_REFERENCE = 255 + 128 + 80  # name, tag and digest limits of the distribution spec
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
PATH_PATTERN = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
DOMAIN_PATTERN = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
    r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?"
)
TAG_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
DIGEST_PATTERN = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass(frozen=True)
class Reference:
    domain: str  # host or host:port of the registry
    path: str  # repository path inside the registry, e.g. library/busybox
    tag: str | None
    digest: str | None

    @property
    def name(self) -> str:
        return f"{self.domain}/{self.path}"

    def __str__(self) -> str:
        text = self.name
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text


def parse_reference(text: str, field: str = "container.image") -> Reference:
    """Parse and normalise `text`; InvalidArgument naming `field` and the value when malformed."""

    def refuse(why: str) -> InvalidArgument:
        shown = text if len(text) <= 100 else text[:100] + "..."
        return InvalidArgument(
            field,
            f"{shown!r} is not a valid image reference: {why} (expected [HOST[:PORT]/]NAME[:TAG])",
        )

    if not text or len(text) > MAX_REFERENCE or text != text.strip() or "\x00" in text:
        raise refuse("empty, too long, or with surrounding whitespace or NUL")
    remainder, _, digest = text.partition("@")
    if digest and not DIGEST_PATTERN.fullmatch(digest):
        raise refuse("the digest must be sha256: and 64 lowercase hex digits")
    name, tag = remainder, None
    colon = remainder.rfind(":")
    if colon > remainder.rfind("/"):
        name, tag = remainder[:colon], remainder[colon + 1 :]
        if not TAG_PATTERN.fullmatch(tag):
            raise refuse(f"bad tag {tag!r}")
    first, slash, rest = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        domain, path = first, rest
        if not DOMAIN_PATTERN.fullmatch(domain):
            raise refuse(f"bad registry host {domain!r}")
    else:
        domain, path = DEFAULT_DOMAIN, name
    if domain == DEFAULT_DOMAIN and "/" not in path:
        path = f"library/{path}"
    if not PATH_PATTERN.fullmatch(path):
        raise refuse(f"bad repository name {path!r}: lowercase letters, digits and . _ - /")
    if tag is None and not digest:
        tag = DEFAULT_TAG
    return Reference(domain=domain, path=path, tag=tag, digest=digest or None)


def canonical(text: str, field: str = "container.image") -> str:
    return str(parse_reference(text, field))
