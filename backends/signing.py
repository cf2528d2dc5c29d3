"""Keyed manifests: the cache loads an artifact only if this installation wrote it.

A manifest lists every file of an artifact with its sha256, and the cache checks those
before anything is loaded. Hashes alone stop accidents, not people: whoever can write the
cache can swap a TVM `.so` (native code, whose constructors run when it is mapped) and
its hash together. So every manifest the cache writes carries an HMAC-SHA256 of its
canonical JSON under a key that belongs to this installation, and `get` refuses a
manifest whose MAC does not match before it reads any file the manifest names.

The key is 32 random bytes in a file outside the cache directory (`HETERO_KEY_FILE`, else
`<user config dir>/hetero/artifact.key`), created 0600 on first use. A key file that
others can read (group or world permission bits) or that another user owns is refused:
it would let them sign artifacts. README.md's Security section says what this does and
does not protect.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import platformdirs

from hetero.errors import ArtifactCorrupt, ConfigError

KEY_ENV = "HETERO_KEY_FILE"
MAC_FIELD = "mac"


def key_path() -> Path:
    env = os.environ.get(KEY_ENV)
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_config_dir("hetero")) / "artifact.key"


def installation_key(path: Path | None = None) -> bytes:
    """This installation's key: read (after checking who may read it) or created 0600."""
    path = path or key_path()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process created it first: use theirs
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
    st = path.stat()
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise ConfigError(
            f"{path}: the artifact key belongs to uid {st.st_uid}, not to you; whoever owns it "
            f"can sign artifacts this process will load. Remove it (a new one is made) or "
            f"point {KEY_ENV} at a key of your own."
        )
    if st.st_mode & 0o077:
        raise ConfigError(
            f"{path}: the artifact key is readable or writable by others "
            f"(mode {st.st_mode & 0o777:o}); anyone who reads it can sign artifacts. "
            f"`chmod 600 {path}`, or remove it (a new one is made and the cache rebuilt)."
        )
    text = path.read_text().strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) < 16:
        raise ConfigError(f"{path}: not an artifact key (expected 64 hex digits); remove it")
    return key


def mac(manifest: Mapping[str, Any], key: bytes) -> str:
    """HMAC-SHA256 of the manifest's canonical JSON (every field but the MAC itself)."""
    body = {k: v for k, v in manifest.items() if k != MAC_FIELD}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def sign(manifest: Mapping[str, Any], key: bytes) -> dict[str, Any]:
    out = dict(manifest)
    out[MAC_FIELD] = mac(out, key)
    return out


def check(manifest: Mapping[str, Any], key: bytes, where: Path) -> None:
    """Raise ArtifactCorrupt unless `manifest` carries this installation's MAC."""
    given = manifest.get(MAC_FIELD)
    if not isinstance(given, str):
        raise ArtifactCorrupt(
            f"{where}: the manifest is not signed (written by an older hetero, or not by this "
            "installation); it is not trusted"
        )
    if not hmac.compare_digest(given, mac(manifest, key)):
        raise ArtifactCorrupt(
            f"{where}: the manifest's MAC does not match this installation's key (altered, "
            "or written by another installation); it is not trusted"
        )
