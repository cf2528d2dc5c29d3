"""Content-addressed artifact cache: one directory per artifact key, verified before any load.

Layout: `<root>/<key>/manifest.json` plus the files it names with their sha256. An entry is
written into a temporary sibling directory and renamed into place in one step, so a reader
sees a whole entry or none. `get` hashes every file against the manifest before returning,
so a truncated or altered file (a TVM .so is native code) is never handed to a loader;
`build` treats such an entry as missing and rebuilds it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from hetero.backends.base import (
    Artifact,
    Backend,
    CompileOptions,
    CompileUnit,
    Manifest,
    sha256_file,
)
from hetero.cluster.spec import DeviceSpec
from hetero.errors import ArtifactCorrupt, CompileError
from hetero.paths import ENV_VAR, cache_root

MANIFEST = "manifest.json"
__all__ = ["ENV_VAR", "MANIFEST", "ArtifactCache"]


class ArtifactCache:
    """Artifacts by key under `root` (default: hetero's cache root, see hetero/paths.py)."""

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = cache_root(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"ArtifactCache({str(self.root)!r})"

    def path(self, key: str) -> Path:
        if not key or "/" in key or key.startswith("."):
            raise ArtifactCorrupt(f"invalid artifact key {key!r}")
        return self.root / key

    def __contains__(self, key: str) -> bool:
        return (self.path(key) / MANIFEST).is_file()

    # ---- reading -------------------------------------------------------------------------------
    def get(self, key: str) -> Artifact:
        """The verified artifact for `key`; ArtifactCorrupt (naming the file) if any check fails."""
        where = self.path(key)
        mpath = where / MANIFEST
        if not mpath.is_file():
            raise ArtifactCorrupt(f"no artifact {key!r} in {self.root} (missing {mpath})")
        try:
            manifest = json.loads(mpath.read_text())
        except (OSError, ValueError) as e:
            raise ArtifactCorrupt(f"{mpath}: unreadable manifest ({e}); delete {where}") from e
        if manifest.get("key") != key:
            raise ArtifactCorrupt(f"{mpath}: manifest is for {manifest.get('key')!r}, not {key!r}")
        art = Artifact(backend=manifest.get("backend", ""), key=key, path=where, manifest=manifest)
        self.verify(art)
        return art

    def verify(self, artifact: Artifact) -> None:
        """Check every file's sha256 against the manifest; raise ArtifactCorrupt naming the first
        that is missing, truncated or altered."""
        files = artifact.files
        if not files:
            raise ArtifactCorrupt(f"{artifact.path / MANIFEST}: the manifest lists no files")
        for name, want in sorted(files.items()):
            p = artifact.path / name
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise ArtifactCorrupt(
                    f"{artifact.path / MANIFEST}: file name {name!r} escapes the entry"
                )
            if not p.is_file():
                raise ArtifactCorrupt(f"{p}: missing (artifact {artifact.key})")
            got = sha256_file(p)
            if got != want:
                raise ArtifactCorrupt(
                    f"{p}: sha256 {got[:16]}… does not match the manifest's {want[:16]}… "
                    f"(artifact {artifact.key}, {p.stat().st_size} bytes); it is not loaded. "
                    "The cache rebuilds it on the next compile."
                )

    # ---- writing -------------------------------------------------------------------------------
    def build(
        self,
        backend: Backend,
        unit: CompileUnit,
        device: DeviceSpec,
        options: CompileOptions,
    ) -> Artifact:
        """The artifact for (unit, device, options): from the cache when present and intact,
        else compiled now. A corrupt entry is removed and rebuilt."""
        key = backend.artifact_key(unit, device, options)
        if key in self:
            try:
                return self.get(key)
            except ArtifactCorrupt:
                self.evict(key)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=self.root))
        try:
            manifest: Manifest = backend.compile(unit, device, options, tmp)
            manifest = replace(manifest, key=key)
            (tmp / MANIFEST).write_text(manifest.to_json())
            _fsync_dir(tmp)
            final = self.path(key)
            try:
                os.replace(tmp, final)
            except OSError:
                # Another process finished the same key first; its entry is equivalent.
                if key not in self:
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except CompileError:
            raise
        except Exception as e:
            raise CompileError(
                f"{backend.name} failed to compile partition {unit.name} for {device.name}: "
                f"{type(e).__name__}: {e}"
            ) from e
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return self.get(key)

    def evict(self, key: str) -> None:
        """Remove an entry (moved aside first, so a concurrent reader never sees half of it)."""
        where = self.path(key)
        if not where.exists():
            return
        trash = Path(tempfile.mkdtemp(prefix=f".trash.{key}.", dir=self.root))
        with contextlib.suppress(OSError):
            os.replace(where, trash / key)
        shutil.rmtree(trash, ignore_errors=True)

    def keys(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if (p / MANIFEST).is_file())


def _fsync_dir(path: Path) -> None:
    for p in path.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
