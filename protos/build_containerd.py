"""Generate Python stubs for containerd's gRPC API from the .proto files Debian installs.

The sources are read where Debian's golang-github-containerd-containerd-dev (and its
dependencies golang-github-gogo-protobuf-dev, golang-github-containerd-cgroups-dev) put them,
under /usr/share/gocode/src; nothing of them is copied into the repository.

Those files import each other by Go paths (`github.com/containerd/containerd/api/types/...`),
which are not valid Python package names, and one of their packages is called `types`, which
would shadow the standard library if it were importable at the top level. So every file is staged
under our package prefix `adapter/api/containerd/...` with its imports rewritten, and protoc runs on
the staging tree: the modules import each other as `adapter.api.containerd...` while the proto
packages (containerd.services.tasks.v1, ...) keep their names on the wire.

Usage: python protos/build_containerd.py [--source DIR]   (protos/build.py calls it too)
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

REPO = Path(__file__).resolve().parent.parent
GOCODE = Path("/usr/share/gocode/src")
PREFIX = "adapter/api/containerd"

# Go import path prefix -> staged location under PREFIX. Longest prefixes first.
PATH_MAP: tuple[tuple[str, str], ...] = (
    ("github.com/containerd/containerd/api/", ""),
    ("github.com/containerd/containerd/protobuf/plugin/", "plugin/"),
    ("github.com/containerd/containerd/runtime/v2/runc/options/", "runc/options/"),
    ("github.com/containerd/cgroups/stats/v1/", "cgroups/v1/"),
    ("github.com/containerd/cgroups/v2/stats/", "cgroups/v2/"),
    ("github.com/gogo/protobuf/gogoproto/", "gogoproto/"),
)
# gogo.proto is imported as "gogoproto/gogo.proto" (its include root is gogo/protobuf).
BARE_IMPORTS = {"gogoproto/gogo.proto": "gogoproto/gogo.proto"}

# What the driver uses (plus everything these import, found by following imports).
ROOTS = (
    "github.com/containerd/containerd/api/services/containers/v1/containers.proto",
    "github.com/containerd/containerd/api/services/content/v1/content.proto",
    "github.com/containerd/containerd/api/services/diff/v1/diff.proto",
    "github.com/containerd/containerd/api/services/events/v1/events.proto",
    "github.com/containerd/containerd/api/services/images/v1/images.proto",
    "github.com/containerd/containerd/api/services/leases/v1/leases.proto",
    "github.com/containerd/containerd/api/services/namespaces/v1/namespace.proto",
    "github.com/containerd/containerd/api/services/snapshots/v1/snapshots.proto",
    "github.com/containerd/containerd/api/services/tasks/v1/tasks.proto",
    "github.com/containerd/containerd/api/services/version/v1/version.proto",
    "github.com/containerd/containerd/api/events/task.proto",
    "github.com/containerd/containerd/runtime/v2/runc/options/oci.proto",
    "github.com/containerd/cgroups/stats/v1/metrics.proto",
    "github.com/containerd/cgroups/v2/stats/metrics.proto",
)
IMPORT = re.compile(r'^(\s*import\s+(?:weak\s+|public\s+)?")([^"]+)(";)', re.MULTILINE)


def staged_path(go_path: str) -> str | None:
    """Where a Go-path proto lives in the staging tree; None for protoc's own (google/...)."""
    if go_path in BARE_IMPORTS:
        return f"{PREFIX}/{BARE_IMPORTS[go_path]}"
    for go_prefix, staged_prefix in PATH_MAP:
        if go_path.startswith(go_prefix):
            return f"{PREFIX}/{staged_prefix}{go_path[len(go_prefix) :]}"
    if go_path.startswith("google/protobuf/"):
        return None
    raise SystemExit(f"build_containerd: no mapping for imported proto {go_path!r}")


def source_file(source_root: Path, go_path: str) -> Path:
    if go_path in BARE_IMPORTS:
        return source_root / "github.com/gogo/protobuf" / go_path
    return source_root / go_path


def rewrite_imports(text: str) -> tuple[str, list[str]]:
    """The text with every mapped import pointing at its staged path, and the Go paths found."""
    found: list[str] = []

    def replace(match: re.Match[str]) -> str:
        go_path = match.group(2)
        staged = staged_path(go_path)
        if staged is None:
            return match.group(0)
        found.append(go_path)
        return f"{match.group(1)}{staged}{match.group(3)}"

    return IMPORT.sub(replace, text), found


def stage(source_root: Path, staging: Path) -> list[str]:
    """Stage ROOTS and their transitive imports; return the staged relative paths."""
    pending, done = list(ROOTS), set[str]()
    staged: list[str] = []
    while pending:
        go_path = pending.pop()
        if go_path in done:
            continue
        done.add(go_path)
        source = source_file(source_root, go_path)
        if not source.is_file():
            raise SystemExit(
                f"build_containerd: {source} is missing; install the Debian packages"
                " golang-github-containerd-containerd-dev and golang-github-gogo-protobuf-dev"
            )
        text, imports = rewrite_imports(source.read_text())
        relative = staged_path(go_path)
        assert relative is not None
        target = staging / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        staged.append(relative)
        pending.extend(imports)
    return sorted(staged)


def ensure_packages(out: Path) -> None:
    package = out / PREFIX
    for directory in [package, *package.rglob("*")]:
        if directory.is_dir() and not (directory / "__init__.py").exists():
            (directory / "__init__.py").write_text("")


def build(source_root: Path = GOCODE, out: Path = REPO) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp)
        files = stage(source_root, staging)
        include = str(Path(protoc.__file__).parent / "_proto")
        args = [
            "protoc",
            f"-I{staging}",
            f"-I{include}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            *files,
        ]
        if protoc.main(args) != 0:
            print("build_containerd: protoc failed", file=sys.stderr)
            return 1
    ensure_packages(out)
    print(f"generated containerd stubs for {len(files)} proto files into {PREFIX}/")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--source", type=Path, default=GOCODE, help="the Go source root")
    return build(parser.parse_args().source)


if __name__ == "__main__":
    sys.exit(main())
