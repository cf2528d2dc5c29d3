"""Artifacts on their way to a worker: hashes checked, shipped bytes unpacked safely."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import shutil
import tarfile

import pytest

from hetero.errors import ArtifactCorrupt
from hetero.runtime.artifacts import pack, unpack, verify_artifact
from hetero.runtime.executor import LocalExecutor


def _copy(stage, tmp_path):
    art = stage.artifact
    dst = tmp_path / art.key
    shutil.copytree(art.path, dst)
    return dataclasses.replace(stage, artifact=dataclasses.replace(art, path=dst))


def test_pack_unpack_round_trip(staged, tmp_path):
    stages, *_ = staged
    art = stages[0].artifact
    local = unpack(art, pack(art), tmp_path)
    assert local.path.parent == tmp_path and local.path.name.startswith(f"{art.key}.")
    verify_artifact(local)


def test_two_builds_of_one_key_unpack_apart(staged, tmp_path):
    """Two deployments on one host may ship one key compiled twice with other bytes: each
    unpacks whole to its own directory, and the first stays valid after the second."""
    stages, *_ = staged
    art = stages[0].artifact
    other_dir = tmp_path / "other"
    shutil.copytree(art.path, other_dir)
    name = next(iter(art.files))
    with open(other_dir / name, "ab") as f:
        f.write(b"another build")
    files = {**art.files, name: hashlib.sha256((other_dir / name).read_bytes()).hexdigest()}
    other = dataclasses.replace(art, path=other_dir, manifest={**art.manifest, "files": files})
    first = unpack(art, pack(art), tmp_path / "shipped")
    second = unpack(other, pack(other), tmp_path / "shipped")
    assert first.path != second.path
    verify_artifact(first)
    verify_artifact(second)


def test_tampered_artifact_is_never_loaded(staged, tmp_path):
    stages, needed, *_ = staged
    bad = _copy(stages[0], tmp_path)
    name = next(iter(bad.artifact.files))
    with open(bad.artifact.path / name, "ab") as f:
        f.write(b"x")
    with pytest.raises(ArtifactCorrupt, match="sha256"):
        LocalExecutor([bad, *stages[1:]], needed)


def test_shipped_archive_with_extra_entries_is_rejected(staged, tmp_path):
    stages, *_ = staged
    art = stages[0].artifact
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("../evil.py")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(ArtifactCorrupt, match="unexpected entry"):
        unpack(art, buf.getvalue(), tmp_path)


def test_runtime_names_load_lazily():
    import hetero.runtime as rt

    assert rt.LocalExecutor is LocalExecutor
    with pytest.raises(AttributeError):
        rt.nope  # noqa: B018
