"""Model files are loaded without running code from them."""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from hetero.errors import ConfigError
from hetero.interfaces.config import config_from_dict
from hetero.interfaces.modelfile import load_exported
from hetero.interfaces.models import mlp_block

RAN = Path(os.environ.get("TMPDIR", "/tmp")) / "hetero-test-code-ran"


class _Payload:
    """Unpickling this would run a shell command (it must never happen)."""

    def __reduce__(self):
        return (os.system, (f"touch {RAN}",))


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    model, example = mlp_block(batch=2, seq=4)
    path = tmp_path_factory.mktemp("pt2") / "mlp.pt2"
    torch.export.save(torch.export.export(model, example), path)
    return path, model


def test_an_exported_program_loads_and_runs(exported, tmp_path):
    path, model = exported
    cfg = config_from_dict({"model": str(path)}, tmp_path / "c.yaml")
    loaded = cfg.load_model()
    x = loaded.example_inputs[0]
    torch.testing.assert_close(loaded.module(x), model(x))


def _refused(path: Path, *words: str) -> None:
    RAN.unlink(missing_ok=True)
    with pytest.raises(ConfigError) as info:
        load_exported(path)
    for w in words:
        assert w in str(info.value), str(info.value)
    assert not RAN.exists(), "the file's code ran"


def test_a_pickle_named_pt2_is_refused(tmp_path):
    bare = tmp_path / "bare.pt2"
    bare.write_bytes(pickle.dumps(_Payload()))
    _refused(bare, "not a .pt2 archive")
    saved = tmp_path / "saved.pt2"
    torch.save({"weights": _Payload()}, saved)  # a torch.save zip with a malicious pickle
    _refused(saved, "refusing to load", "system")


def _with_member(src_path: Path, dest: Path, member: str, data: bytes) -> Path:
    with zipfile.ZipFile(src_path) as src, zipfile.ZipFile(dest, "w") as dst:
        names = src.namelist()
        for name in names:
            dst.writestr(name, src.read(name))
        dst.writestr(f"{names[0].split('/')[0]}/{member}", data)
    return dest


def test_a_pt2_with_a_malicious_member_is_refused(exported, tmp_path):
    path, _ = exported
    buf = io.BytesIO()
    torch.save(_Payload(), buf)  # a nested torch.save archive, as pickled weights are stored
    evil = _with_member(path, tmp_path / "evil.pt2", "data/weights/weight_99", buf.getvalue())
    _refused(evil, "refusing to load", "weight_99", "posix.system")
    opaque = _with_member(
        path, tmp_path / "opaque.pt2", "data/constants/opaque_obj_0", pickle.dumps(_Payload())
    )
    _refused(opaque, "pickled Python object", "opaque_obj_0")
    # through the config, the error names the config file and its key
    cfg = config_from_dict({"model": str(evil)}, tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match=r"c\.yaml: model"):
        cfg.load_model()
    assert not RAN.exists()
