"""backends/export.py and `SharedExports`: every backend that compiles a unit sharing its
exports (what the measured choice hands its candidates) starts from one torch.export of it,
writes the same artifacts as from its own export, and runs them to the same values."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch
from block_units import Block, unit_of

import hetero.backends.eager as eager
from hetero.backends.base import CompileOptions, SharedExports
from hetero.backends.cudagraphs import CudaGraphsBackend
from hetero.backends.eager import EagerBackend, export_streamed
from hetero.backends.export import export_unit, save_program
from hetero.backends.inductor import InductorBackend, InductorGraphsBackend
from hetero.cluster.spec import DeviceSpec

CPU = DeviceSpec("test/cpu0", "cpu", "test", cores=2)
# compiles only (no CUDA here): the graph backends' compile is their base's, for a GPU
GPU = DeviceSpec("test/gpu0", "gpu", "test")


@pytest.fixture
def block():
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(3, 16)
    unit = unit_of(model, x)
    with torch.no_grad():
        return model, x, unit


@pytest.fixture
def exports(monkeypatch):
    """Every program made of a partition: each torch.export.export call (backends/export.py
    and eager.py look it up on the module, so each export passes here) and each streamed
    program wrapped from the captured graph without one (backends/lifted.py)."""
    calls = []
    real = torch.export.export
    real_lifted = eager.lifted_program

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    def lifting(*a, **k):
        ep = real_lifted(*a, **k)
        if ep is not None:
            calls.append(1)
        return ep

    monkeypatch.setattr(torch.export, "export", counting)
    monkeypatch.setattr(eager, "lifted_program", lifting)
    return calls


# (backend, device): every built-in backend that starts from export_unit, on a device where
# it compiles here
EXPORTING = [
    (EagerBackend(), CPU),
    (InductorBackend(), CPU),
    (CudaGraphsBackend(), GPU),
    (InductorGraphsBackend(), GPU),
]


def compile_all(unit, tmp_path, backends=EXPORTING, options=CompileOptions()):
    out = {}
    for backend, device in backends:
        where = tmp_path / f"{backend.name}-{device.kind}"
        where.mkdir(parents=True)
        out[backend.name] = (backend.compile(unit, device, options, where), where)
    return out


def test_the_backends_of_a_sharing_unit_export_it_once(block, tmp_path, exports):
    _, _, unit = block
    shared = unit.sharing_exports()
    compile_all(shared, tmp_path)
    assert len(exports) == 1, (
        f"{len(exports)} exports of one partition by {len(EXPORTING)} backends"
    )
    assert len(shared.exports) == 1


def test_a_plain_unit_keeps_no_export(block, tmp_path, exports):
    """Outside a choice each compile exports afresh and nothing holds the program (its
    weights) after it."""
    _, _, unit = block
    compile_all(unit, tmp_path, EXPORTING[:2])
    assert len(exports) == 2 and unit.exports is None


def test_shared_exports_write_the_same_artifacts(block, tmp_path):
    """The same files (program.pt2 byte for byte) and keys as each backend's own export: the
    artifact cache sees no difference."""
    _, _, unit = block
    own = compile_all(unit, tmp_path / "own")
    shared_unit = unit.sharing_exports()
    shared = compile_all(shared_unit, tmp_path / "shared")
    for name, (manifest, _) in own.items():
        assert shared[name][0].files == manifest.files, name
    for backend, device in EXPORTING:
        opts = CompileOptions()
        assert backend.artifact_key(unit, device, opts) == backend.artifact_key(
            shared_unit, device, opts
        )


def test_runs_from_a_shared_export_match_eager(block, tmp_path):
    from hetero.backends.base import Artifact

    model, x, unit = block
    shared = unit.sharing_exports()
    built = compile_all(shared, tmp_path, EXPORTING[:2])
    with torch.no_grad():
        want = model(x)
    for backend, device in EXPORTING[:2]:
        manifest, where = built[backend.name]
        art = Artifact(backend.name, "k", where, {**manifest.__dict__, "files": manifest.files})
        (got,) = backend.load(art, device)(x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_tvm_shares_the_export_of_a_unit_without_sizes_to_carry(block, tmp_path, exports):
    """TVM exports with carry_sizes; with no size crossing the cut it is eager's program,
    and its run_decompositions leaves the shared program as it was."""
    pytest.importorskip("tvm")
    from hetero.backends.tvm.backend import TVMBackend

    _, _, unit = block
    shared = unit.sharing_exports()
    ep = export_unit(shared)
    before = str(ep.graph)
    compile_all(shared, tmp_path, [(TVMBackend(), CPU), (EagerBackend(), CPU)])
    assert len(exports) == 1
    assert str(ep.graph) == before


def test_other_dtypes_and_flags_are_other_exports(block, exports):
    _, _, unit = block
    shared = unit.sharing_exports()
    a = export_unit(shared)
    assert export_unit(shared, carry_sizes=True) is a  # no sizes to carry: the same program
    assert export_unit(shared, torch.float16) is not a
    assert export_streamed(shared)[0] is not a
    assert export_streamed(shared)[0] is export_streamed(shared)[0]
    assert len(exports) == 3


def test_streamed_backends_share_one_export_and_keep_its_examples(block, tmp_path, exports):
    _, _, unit = block
    shared = unit.sharing_exports()
    streamed = CompileOptions(extra=(("weights", "streamed"),))
    built = compile_all(shared, tmp_path, EXPORTING[:2], streamed)
    assert len(exports) == 1
    # save_program dropped the examples from what it wrote, not from the shared program
    assert export_streamed(shared)[0].example_inputs is not None
    eager, inductor = built["eager"][0].files, built["inductor"][0].files
    for name in ("program.pt2", "weights.safetensors"):
        assert eager[name] == inductor[name], name


def test_save_program_leaves_the_program_as_it_was(block, tmp_path):
    _, _, unit = block
    ep, _ = export_streamed(unit)
    save_program(ep, tmp_path / "p.pt2", weights_as_inputs=True)
    assert ep.example_inputs is not None
    loaded = torch.export.load(tmp_path / "p.pt2")
    assert loaded.example_inputs is None


def test_a_unit_changed_by_replace_or_sent_away_shares_nothing(block):
    _, _, unit = block
    shared = unit.sharing_exports()
    export_unit(shared)
    assert dataclasses.replace(shared, name="other").exports is None
    sent = pickle.loads(pickle.dumps(shared))
    assert isinstance(sent.exports, SharedExports) and len(sent.exports) == 0
    assert shared == unit  # not part of the unit's identity


def test_sharing_keeps_the_parameters_digest(block):
    _, _, unit = block
    key = unit.graph_hash()
    shared = unit.sharing_exports()
    assert "_params_digest" in shared.__dict__
    assert shared.graph_hash() == key


def test_a_save_without_torchs_canonical_self_check_writes_the_same_archive(tmp_path, monkeypatch):
    """export_save skips only a check whose result torch throws away: every entry of the
    archive is what torch.export.save writes, it loads and runs alike, and torch's check is
    in place again after."""
    import zipfile

    import torch._export.serde.serialize as serde

    from hetero.backends.export import export_save

    checks = []

    def check(program, constants=None):
        checks.append(program)
        return program

    monkeypatch.setattr(serde, "canonicalize", check)
    model, x = Block(), torch.randn(3, 16)
    ep = torch.export.export(model, (x,))
    (tmp_path / "torch").mkdir()
    (tmp_path / "ours").mkdir()
    torch.export.save(ep, tmp_path / "torch" / "p.pt2")
    assert len(checks) == 1  # torch's save checks
    export_save(ep, tmp_path / "ours" / "p.pt2")
    assert len(checks) == 1 and serde.canonicalize is check  # ours did not; put back after
    theirs, ours = (zipfile.ZipFile(tmp_path / w / "p.pt2") for w in ("torch", "ours"))
    assert [(i.filename, theirs.read(i)) for i in theirs.infolist()] == [
        (i.filename, ours.read(i)) for i in ours.infolist()
    ]
    back = torch.export.load(tmp_path / "ours" / "p.pt2")
    torch.testing.assert_close(back.module()(x), model(x))
