"""Generate (or, with --check, verify) the committed protobuf code.

The .proto sources live under ``proto/`` in the depot layout tvix uses
(``tvix/castore/protos/castore.proto`` ...), so the descriptors registered at
runtime carry the same file names as tvix's and server reflection matches.
protoc would emit modules named ``tvix.castore.protos.*``; this script moves
them into our packages and rewrites their imports:

    tvix/castore/protos/X  ->  src/tvix_castore/protos/X   (tvix_castore.protos)
    tvix/store/protos/X    ->  src/tvix_store/protos/X     (tvix_store.protos)

For each proto it writes ``X_pb2.py`` + ``X_pb2.pyi`` (mypy-protobuf), and for
protos that declare a service also ``X_pb2_grpc.py`` + ``X_pb2_grpc.pyi``.
Output depends only on the inputs and the pinned tool versions.

Usage:
    python scripts/gen_protos.py          # regenerate in place
    python scripts/gen_protos.py --check  # exit 1 if the committed files differ
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"

# proto directory (relative to PROTO_ROOT) -> (output directory, Python package)
PACKAGES: dict[str, tuple[Path, str]] = {
    "tvix/castore/protos": (ROOT / "src/tvix_castore/protos", "tvix_castore.protos"),
    "tvix/store/protos": (ROOT / "src/tvix_store/protos", "tvix_store.protos"),
}

GENERATED_GLOB = "*_pb2*.py*"
_SERVICE_RE = re.compile(r"^\s*service\s+\w+", re.MULTILINE)


def _rewrite(text: str) -> str:
    """Point protoc's flat ``tvix.<x>.protos`` module names at our packages."""
    for proto_dir, (_, package) in PACKAGES.items():
        flat = re.escape(proto_dir.replace("/", "."))
        text = re.sub(rf"\b{flat}\b", package, text)
    return text


def _plugin(name: str) -> str:
    """Locate a protoc plugin installed next to the running interpreter."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise SystemExit(f"{name} not found next to {sys.executable}; run `make venv`")
    return f"--plugin={name}={path}"


def _run_protoc(sources: list[str], out: Path) -> None:
    from grpc_tools import protoc  # type: ignore[import-untyped]

    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out=quiet:{out}",
        f"--mypy_grpc_out=quiet:{out}",
        _plugin("protoc-gen-mypy"),
        _plugin("protoc-gen-mypy_grpc"),
        *sources,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def generate() -> dict[Path, str]:
    """Run protoc into a scratch dir; return {final path: content} of every output."""
    sources = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    result: dict[Path, str] = {}
    with tempfile.TemporaryDirectory() as scratch:
        raw_root = Path(scratch)
        _run_protoc(sources, raw_root)
        for source in sources:
            proto_dir, _, filename = source.rpartition("/")
            if proto_dir not in PACKAGES:
                raise SystemExit(f"{source}: no Python package configured for {proto_dir}")
            out_dir, _ = PACKAGES[proto_dir]
            stem = filename.removesuffix(".proto")
            has_service = _SERVICE_RE.search((PROTO_ROOT / source).read_text()) is not None
            suffixes = ["_pb2.py", "_pb2.pyi"]
            if has_service:
                suffixes += ["_pb2_grpc.py", "_pb2_grpc.pyi"]
            for suffix in suffixes:
                raw = (raw_root / proto_dir / f"{stem}{suffix}").read_text()
                result[out_dir / f"{stem}{suffix}"] = _rewrite(raw)
    return result


def _committed() -> dict[Path, str]:
    files: dict[Path, str] = {}
    for out_dir, _ in PACKAGES.values():
        for path in sorted(out_dir.glob(GENERATED_GLOB)):
            files[path] = path.read_text()
    return files


def check(expected: dict[Path, str]) -> int:
    """Compare generated content with the committed files; print a diff."""
    actual = _committed()
    problems: list[str] = []
    for path in sorted(expected.keys() | actual.keys()):
        rel = path.relative_to(ROOT)
        if path not in actual:
            problems.append(f"missing: {rel}")
        elif path not in expected:
            problems.append(f"stale (not generated from any .proto): {rel}")
        elif actual[path] != expected[path]:
            diff = difflib.unified_diff(
                actual[path].splitlines(keepends=True),
                expected[path].splitlines(keepends=True),
                fromfile=f"committed/{rel}",
                tofile=f"generated/{rel}",
                n=1,
            )
            problems.append(f"differs: {rel}\n" + "".join(list(diff)[:40]))
    if problems:
        print("generated protobuf code is out of date:", file=sys.stderr)
        for problem in problems:
            print("  " + problem, file=sys.stderr)
        print("run `make protos` (python scripts/gen_protos.py) and commit", file=sys.stderr)
        return 1
    print(f"protobuf code up to date ({len(expected)} files)")
    return 0


def write(files: dict[Path, str]) -> None:
    """Write the generated files and remove stale ones."""
    for path in _committed().keys() - files.keys():
        path.unlink()
    for path, content in sorted(files.items()):
        path.parent.mkdir(parents=True, exist_ok=True)
        init = path.parent / "__init__.py"
        if not init.exists():
            init.write_text('"""Generated protobuf and gRPC code (see scripts/gen_protos.py)."""\n')
        if not path.exists() or path.read_text() != content:
            path.write_text(content)
            print(f"wrote {path.relative_to(ROOT)}")


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="verify instead of writing; exit 1 on any difference"
    )
    args = parser.parse_args(argv)
    files = generate()
    if args.check:
        return check(files)
    write(files)
    return 0


if __name__ == "__main__":
    sys.exit(main())
