"""Generate the Python stubs under adapter/api/ from the .proto files, with grpcio-tools.

protoc derives Python import paths from .proto paths, so a file compiled as
`containerizer/v1/x.proto` would import `containerizer.v1`, a package that does not exist. We
compile from a staging tree that places every source under `adapter/api/`, so the generated
modules import each other as `adapter.api...` while the proto packages (containerizer.v1, mesos,
mesos.containerizer) keep their real names on the wire.

Usage: python protos/build.py   (run from anywhere; writes into the repository)
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import build_containerd  # a sibling script: run as a script, protos/ is on sys.path
from grpc_tools import protoc

REPO = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO / "protos"
PACKAGE_PREFIX = Path("adapter/api")
SOURCES = ["containerizer/v1", "mesos"]


def _stage(staging: Path) -> list[str]:
    """Copy our .proto files under the package prefix; return their staged relative paths."""
    staged = []
    for source in SOURCES:
        for proto in sorted((PROTO_ROOT / source).glob("*.proto")):
            relative = PACKAGE_PREFIX / proto.relative_to(PROTO_ROOT)
            target = staging / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(_rewrite_imports(proto.read_text()))
            staged.append(str(relative))
    return staged


def _rewrite_imports(text: str) -> str:
    """Point `import "mesos/..."` statements at the staged location."""
    return text.replace('import "mesos/', f'import "{PACKAGE_PREFIX}/mesos/')


def _ensure_packages(out: Path) -> None:
    for directory in [out / PACKAGE_PREFIX, *(out / PACKAGE_PREFIX).rglob("*")]:
        if directory.is_dir() and not (directory / "__init__.py").exists():
            (directory / "__init__.py").write_text("")


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp)
        files = _stage(staging)
        include = str(Path(protoc.__file__).parent / "_proto")
        args = [
            "protoc",
            f"-I{staging}",
            f"-I{include}",
            f"--python_out={REPO}",
            f"--pyi_out={REPO}",
            f"--grpc_python_out={REPO}",
            *files,
        ]
        for generated in (REPO / PACKAGE_PREFIX).iterdir():
            if generated.is_dir():
                shutil.rmtree(generated)
        if protoc.main(args) != 0:
            print("protos/build.py: protoc failed", file=sys.stderr)
            return 1
    _ensure_packages(REPO)
    print(f"generated stubs for {len(files)} proto files into {PACKAGE_PREFIX}/")
    return build_containerd.build()  # containerd's API, from the installed Debian .proto files


if __name__ == "__main__":
    sys.exit(main())
