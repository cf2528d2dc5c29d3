"""Getting artifacts to workers: build (through the artifact cache), check hashes, pack into
bytes for nodes without the shared cache directory, and load.

`build_artifact` is the one seam between the runtime and the compile cache (an
ArtifactCache), so the cache can change without touching the executors.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import stat
import tarfile
import tempfile
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from hetero.backends.base import (
    Artifact,
    Backend,
    CompileOptions,
    CompileUnit,
    Runner,
    sha256_file,
)
from hetero.backends.cache import ArtifactCache
from hetero.backends.registry import BackendRegistry
from hetero.cluster.spec import DeviceSpec
from hetero.compile_times import CompileClock
from hetero.errors import ArtifactCorrupt


def build_artifact(
    backend: Backend,
    unit: CompileUnit,
    device: DeviceSpec,
    options: CompileOptions,
    root: Path,
    clock: CompileClock | None = None,
) -> Artifact:
    """Compile `unit` for `device` under `root`, or reuse what is already there (verified:
    this installation's signature on the manifest, every file's hash). `clock` hears how
    long it took (hetero/compile_times.py)."""
    return ArtifactCache(root).build(backend, unit, device, options, clock)


def verify_artifact(artifact: Artifact) -> None:
    """Raise ArtifactCorrupt unless every file the manifest lists has its recorded hash."""
    for name, digest in artifact.files.items():
        path = Path(artifact.path) / name
        if not path.exists():
            raise ArtifactCorrupt(
                f"artifact {artifact.key}: file {path} is missing; rebuild it (`hetero compile`) "
                "or ship artifacts to this node (ship_artifacts='always')"
            )
        actual = sha256_file(path)
        if actual != digest:
            raise ArtifactCorrupt(
                f"artifact {artifact.key}: {path} has sha256 {actual[:12]}..., the manifest says "
                f"{digest[:12]}...; delete {artifact.path} and compile again"
            )


def available_here(artifact: Artifact) -> bool:
    """Whether this process sees the artifact's directory (a shared or local disk)."""
    return (Path(artifact.path) / "manifest.json").exists() or all(
        (Path(artifact.path) / n).exists() for n in artifact.files
    )


def pack(artifact: Artifact) -> bytes:
    """The artifact's files as one tar (sent through Ray's object store)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in artifact.files:
            tar.add(Path(artifact.path) / name, arcname=name)
    return buf.getvalue()


def unpack(artifact: Artifact, blob: bytes, root: Path | None = None) -> Artifact:
    """Write a packed artifact under `root` and check its hashes against the manifest (which
    came from the driver through Ray, not from the archive).

    The default root is a directory of this user's in the temp dir, 0700 and checked to be
    ours: a shared /tmp/<name> that another user created first would let them swap files
    between the check and the load. Files are written whole (temp name, then rename), so
    two workers unpacking one artifact never see each other's half-written file; and each
    build of a key unpacks to its own directory (`unpacked_name`), since two deployments on
    one host may ship the same key compiled twice, with other bytes (a replaced file would
    fail the other's hash check).
    """
    base = Path(root) if root is not None else _private_dir()
    out = base / unpacked_name(artifact)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    allowed = set(artifact.files)
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r") as tar:
        for member in tar.getmembers():
            # Only the plain files the manifest names: no links, no paths outside `out`.
            if member.name not in allowed or not member.isfile():
                raise ArtifactCorrupt(
                    f"artifact {artifact.key}: shipped archive holds unexpected entry "
                    f"{member.name!r}"
                )
            src = tar.extractfile(member)
            if src is None:
                raise ArtifactCorrupt(f"artifact {artifact.key}: cannot read {member.name!r}")
            fd, tmp = tempfile.mkstemp(prefix=f".{member.name}.", dir=out)
            with os.fdopen(fd, "wb") as f:
                f.write(src.read())
            os.replace(tmp, out / member.name)
    local = replace(artifact, path=out)
    verify_artifact(local)
    return local


def unpacked_name(artifact: Artifact) -> str:
    """The artifact's key and a digest of its files' hashes: one directory per build."""
    h = hashlib.sha256()
    for name, digest in sorted(artifact.files.items()):
        h.update(f"{name}={digest};".encode())
    return f"{artifact.key}.{h.hexdigest()[:12]}"


def _private_dir() -> Path:
    uid = os.getuid() if hasattr(os, "getuid") else 0
    path = Path(tempfile.gettempdir()) / f"hetero-shipped-{uid}"
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o077:
        # Someone else's, or open to others: use a fresh private directory instead.
        return Path(tempfile.mkdtemp(prefix="hetero-shipped-"))
    return path


def load_runner(artifact: Artifact, device: DeviceSpec, registry: BackendRegistry) -> Runner:
    """Check the artifact's hashes, then load it with its backend."""
    verify_artifact(artifact)
    return registry.get(artifact.backend).load(artifact, device)


def manifest_io(artifact: Artifact) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(inputs, outputs) the artifact's runner takes and returns, from its manifest."""
    m: Mapping[str, Any] = artifact.manifest
    return tuple(m.get("inputs", ())), tuple(m.get("outputs", ()))
