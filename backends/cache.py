"""Content-addressed artifact cache: one directory per artifact key, verified before any load.

Layout: `<root>/<key>/manifest.json` plus the files it names with their sha256. An entry is
written into a temporary sibling directory and renamed into place in one step, so a reader
sees a whole entry or none. Every manifest carries an HMAC under this installation's key
(signing.py). `get` checks the MAC, then hashes every file against the manifest, before
returning, so an altered file (a TVM .so is native code) is never handed to a loader, even
when its hash in the manifest was altered too; `build` treats such an entry as missing,
logs why, and rebuilds it.

The cache directory is created 0700. An entry in a directory that other users can write
(a shared HETERO_CACHE_DIR) is copied into a private directory before it is checked, so
nobody can swap a file between the check and the load.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from hetero.backends import signing
from hetero.backends.base import (
    Artifact,
    Backend,
    CompileOptions,
    CompileUnit,
    Manifest,
    sha256_file,
)
from hetero.cluster.spec import DeviceSpec
from hetero.compile_times import CompileClock
from hetero.errors import ArtifactCorrupt, CompileError, ConfigError
from hetero.paths import ENV_VAR, cache_root

MANIFEST = "manifest.json"
RECORDS = "records"  # <root>/records/<kind>/<key>.json: small signed facts about artifacts
__all__ = ["ENV_VAR", "MANIFEST", "ArtifactCache"]

log = logging.getLogger("hetero.cache")


class ArtifactCache:
    """Artifacts by key under `root` (default: hetero's cache root, see hetero/paths.py)."""

    def __init__(self, root: Path | str | None = None, secret: bytes | None = None) -> None:
        self.root = cache_root(root)
        if not self.root.exists():
            self.root.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                self.root.mkdir(mode=0o700)
        if secret is None:
            where = signing.key_path().resolve()
            if where.is_relative_to(self.root.resolve()):
                raise ConfigError(
                    f"the artifact key {where} is inside the cache {self.root}: whoever can "
                    f"write the cache could replace it. Point {signing.KEY_ENV} elsewhere."
                )
            secret = signing.installation_key(where)
        self._secret = secret
        self._private: Path | None = None  # copies of entries from a directory others can write

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
        """The verified artifact for `key`; ArtifactCorrupt (naming the file) if any check fails.

        Checks, in order: the manifest parses, is for `key`, carries this installation's
        MAC; then every file it lists has its hash. Nothing is read past a failed check.
        """
        where = self.path(key)
        if _writable_by_others(self.root) or _writable_by_others(where):
            where = self._private_copy(key, where)
        mpath = where / MANIFEST
        if not mpath.is_file():
            raise ArtifactCorrupt(f"no artifact {key!r} in {self.root} (missing {mpath})")
        try:
            manifest = json.loads(mpath.read_text())
        except (OSError, ValueError) as e:
            raise ArtifactCorrupt(f"{mpath}: unreadable manifest ({e}); delete {where}") from e
        if not isinstance(manifest, dict) or manifest.get("key") != key:
            got = manifest.get("key") if isinstance(manifest, dict) else manifest
            raise ArtifactCorrupt(f"{mpath}: manifest is for {got!r}, not {key!r}")
        signing.check(manifest, self._secret, mpath)
        art = Artifact(backend=manifest.get("backend", ""), key=key, path=where, manifest=manifest)
        self.verify(art)
        return art

    def _private_copy(self, key: str, where: Path) -> Path:
        """A copy of an entry in a directory only this user can write (checked there)."""
        if self._private is None:
            self._private = Path(tempfile.mkdtemp(prefix="hetero-artifacts-"))
            log.warning(
                "artifact cache %s can be written by other users: entries are copied to %s "
                "before they are checked and loaded",
                self.root,
                self._private,
            )
        copy = self._private / key
        if copy.exists():
            shutil.rmtree(copy)
        if where.is_dir():
            shutil.copytree(where, copy, symlinks=True)
        return copy

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
        clock: CompileClock | None = None,
    ) -> Artifact:
        """The artifact for (unit, device, options): from the cache when present and intact,
        else compiled now. A corrupt entry is removed and rebuilt. `clock` hears of the
        compile (phase: the backend's name, with the steps its manifest reports), of cache
        hits and of writing the entry."""
        clock = clock if clock is not None else CompileClock()
        key = backend.artifact_key(unit, device, options)
        if key in self:
            try:
                with clock.phase("cache hits"):
                    hit = self.get(key)
                clock.add("cache hits", runs=0, counts={"artifacts": 1})
                return hit
            except ArtifactCorrupt as e:
                log.warning("rebuilding artifact %s (%s): %s", key, unit.name, e)
                self.evict(key)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=self.root))
        fresh: Artifact | None = None
        try:
            with clock.phase(backend.name):
                manifest: Manifest = backend.compile(unit, device, options, tmp)
            clock.add(
                backend.name, runs=0, parts=manifest.build_seconds, counts=manifest.build_counts
            )
            with clock.phase("artifacts"):
                manifest = replace(manifest, key=key)
                signed = signing.sign(json.loads(manifest.to_json()), self._secret)
                (tmp / MANIFEST).write_text(json.dumps(signed, indent=2, sort_keys=True))
                _fsync_dir(tmp)
                final = self.path(key)
                try:
                    os.replace(tmp, final)
                    fresh = Artifact(backend=backend.name, key=key, path=final, manifest=signed)
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
        if fresh is not None and not _writable_by_others(self.root):
            # Just written and hashed by this process into a directory only this user can
            # write: checking it again would read every file (the weights) once more for
            # nothing. An entry another process wrote, or one in a shared cache, is checked.
            return fresh
        with clock.phase("artifacts"):
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

    # ---- records -------------------------------------------------------------------------------
    def read_record(self, kind: str, key: str) -> dict[str, Any] | None:
        """A small JSON record this installation wrote (e.g. a measured backend choice,
        keyed by the artifacts it is about), or None: absent, unreadable or not signed by
        this installation (logged; the caller measures again)."""
        where = self._record_path(kind, key)
        if not where.is_file():
            return None
        try:
            record = json.loads(where.read_text())
            if not isinstance(record, dict):
                raise ArtifactCorrupt(f"{where}: not a JSON object")
            signing.check(record, self._secret, where)
        except (OSError, ValueError, ArtifactCorrupt) as e:
            log.warning("ignoring record %s: %s", where, e)
            return None
        return {k: v for k, v in record.items() if k != signing.MAC_FIELD}

    def write_record(self, kind: str, key: str, data: Mapping[str, Any]) -> None:
        """Sign `data` and write it whole (temporary file, then rename)."""
        where = self._record_path(kind, key)
        where.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", dir=where.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(signing.sign(dict(data), self._secret), f, indent=1, sort_keys=True)
        os.replace(tmp, where)

    def _record_path(self, kind: str, key: str) -> Path:
        for part in (kind, key):
            if not part or "/" in part or part.startswith("."):
                raise ConfigError(f"invalid record name {kind!r}/{key!r}")
        return self.root / RECORDS / kind / f"{key}.json"

    def keys(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if (p / MANIFEST).is_file())


def _writable_by_others(path: Path) -> bool:
    """Whether a user other than this one may change what `path` holds."""
    try:
        st = path.stat()
    except OSError:
        return False
    mine = not hasattr(os, "getuid") or st.st_uid == os.getuid()
    return not mine or bool(st.st_mode & 0o022)


def _fsync_dir(path: Path) -> None:
    for p in path.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
