"""Keyed manifests: a native library swapped together with its hash is never loaded (its
constructor never runs), every rebuild says why, and the key itself is guarded."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import stat
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from hetero.backends import signing
from hetero.backends.base import Backend, CompileOptions, Manifest, sha256_file
from hetero.backends.cache import MANIFEST, ArtifactCache
from hetero.errors import ArtifactCorrupt, ConfigError
from hetero.runtime.artifacts import pack, unpack

CC = shutil.which("cc") or shutil.which("gcc")
BENIGN = "int answer(void) { return 42; }\n"
EVIL = """
#include <stdio.h>
__attribute__((constructor)) static void pwn(void) {
    FILE *f = fopen("%s", "w"); if (f) { fputs("pwned", f); fclose(f); }
}
int answer(void) { return 666; }
"""


def _cc(source: str, out: Path) -> None:
    src = out.with_suffix(".c")
    src.write_text(source)
    subprocess.run([CC, "-shared", "-fPIC", "-o", str(out), str(src)], check=True)
    src.unlink()


class NativeBackend(Backend):
    """A backend whose artifact is a shared library, mapped with dlopen on load."""

    name = "native"
    device_kinds = ("cpu",)

    def __init__(self) -> None:
        self.compiles = 0

    def artifact_key(self, unit, device, options) -> str:
        return "native-0123456789abcdef"

    def compile(self, unit, device, options, out_dir: Path) -> Manifest:
        self.compiles += 1
        _cc(BENIGN, out_dir / "lib.so")
        return Manifest(
            "native", "", "c", "cpu", (), (), {}, {"lib.so": sha256_file(out_dir / "lib.so")}
        )

    def load(self, artifact, device):
        lib = ctypes.CDLL(str(artifact.path / "lib.so"))
        return lambda: lib.answer()


@pytest.fixture
def keyed(tmp_path, monkeypatch):
    monkeypatch.setenv(signing.KEY_ENV, str(tmp_path / "config" / "artifact.key"))
    return ArtifactCache(tmp_path / "cache")


def _build(cache, backend, cpu_device):
    return cache.build(backend, SimpleNamespace(name="p0"), cpu_device, CompileOptions())


def _rewrite_manifest(art, change) -> None:
    path = art.path / MANIFEST
    m = json.loads(path.read_text())
    change(m)
    path.write_text(json.dumps(m))


@pytest.mark.skipif(CC is None, reason="needs a C compiler to build the libraries")
def test_a_swapped_library_with_its_hash_is_never_loaded(keyed, cpu_device, tmp_path, caplog):
    backend = NativeBackend()
    art = _build(keyed, backend, cpu_device)
    assert backend.load(art, cpu_device)() == 42
    marker = tmp_path / "constructor-ran"
    _cc(EVIL % marker, art.path / "lib.so")  # the attacker swaps the library ...
    evil_hash = sha256_file(art.path / "lib.so")
    _rewrite_manifest(art, lambda m: m["files"].update({"lib.so": evil_hash}))  # ... and hash
    with pytest.raises(ArtifactCorrupt, match="MAC does not match"):
        keyed.get(art.key)
    # ... or re-signs it with a key of their own
    _rewrite_manifest(art, lambda m: m.update(mac=signing.mac(m, b"\x00" * 32)))
    with pytest.raises(ArtifactCorrupt, match="MAC does not match"):
        keyed.get(art.key)
    caplog.set_level(logging.WARNING, logger="hetero.cache")
    again = _build(keyed, backend, cpu_device)
    assert backend.compiles == 2  # rebuilt ...
    assert "rebuilding artifact native-0123456789abcdef" in caplog.text  # ... saying why
    assert "MAC does not match" in caplog.text
    assert backend.load(again, cpu_device)() == 42
    assert not marker.exists()  # the attacker's constructor never ran


def test_an_unsigned_manifest_is_rebuilt_and_the_reason_logged(keyed, cpu_device, caplog):
    backend = FakeBackend()
    art = _build(keyed, backend, cpu_device)
    _rewrite_manifest(art, lambda m: m.pop("mac"))  # as an older hetero wrote them
    with pytest.raises(ArtifactCorrupt, match="not signed"):
        keyed.get(art.key)
    caplog.set_level(logging.WARNING, logger="hetero.cache")
    _build(keyed, backend, cpu_device)
    assert backend.compiles == 2 and "not signed" in caplog.text
    (art.path / "data.bin").write_bytes(b"flipped")  # a plain corruption is logged too
    _build(keyed, backend, cpu_device)
    assert backend.compiles == 3 and "sha256" in caplog.text


class FakeBackend(NativeBackend):
    name = "fake"

    def artifact_key(self, unit, device, options) -> str:
        return "fake-0123456789abcdef"

    def compile(self, unit, device, options, out_dir: Path) -> Manifest:
        self.compiles += 1
        (out_dir / "data.bin").write_bytes(b"weights")
        return Manifest(
            "fake", "", "c", "cpu", (), (), {}, {"data.bin": sha256_file(out_dir / "data.bin")}
        )


def test_the_key_is_made_private_and_refused_when_others_can_read_it(tmp_path):
    path = tmp_path / "conf" / "artifact.key"
    key = signing.installation_key(path)
    assert len(key) == 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert signing.installation_key(path) == key  # the same key from then on
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="readable or writable by others"):
        signing.installation_key(path)


def test_a_key_inside_the_cache_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv(signing.KEY_ENV, str(tmp_path / "cache" / "artifact.key"))
    with pytest.raises(ConfigError, match="inside the cache"):
        ArtifactCache(tmp_path / "cache")


def test_a_cache_others_can_write_is_read_through_a_private_copy(keyed, cpu_device, caplog):
    backend = FakeBackend()
    art = _build(keyed, backend, cpu_device)
    os.chmod(keyed.root, 0o777)
    caplog.set_level(logging.WARNING, logger="hetero.cache")
    copy = ArtifactCache(keyed.root).get(art.key)
    assert copy.path != art.path and not copy.path.is_relative_to(keyed.root)
    assert stat.S_IMODE(copy.path.parent.stat().st_mode) == 0o700
    assert "can be written by other users" in caplog.text
    os.chmod(keyed.root, 0o700)


def test_a_new_cache_is_private(keyed):
    assert stat.S_IMODE(keyed.root.stat().st_mode) == 0o700


def test_shipped_artifacts_unpack_into_a_private_directory(keyed, cpu_device):
    art = _build(keyed, FakeBackend(), cpu_device)
    local = unpack(art, pack(art))
    parent = local.path.parent
    st = parent.stat()
    assert st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o700
