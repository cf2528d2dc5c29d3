"""The autotuner's precompile without a GPU: a fake program whose kernels record what is
compiled where, so the deferred forward's contract is checked on the CPU (the real
kernels' compile on a card: tests/gpu/test_autotune_precompile_gpu.py)."""

from __future__ import annotations

import threading
import types

import torch

from hetero.backends.triton import autotune
from hetero.backends.triton.codegen import Kernel


class FakeJit:
    """What precompile needs of a Triton JITFunction: `warmup` and `kernel[grid](...)`."""

    def __init__(self, name: str, log: list) -> None:
        self.name = name
        self.log = log

    def warmup(self, *args, grid, **kwargs):
        self.log.append(
            ("compile", self.name, kwargs.get("BLOCK"), threading.current_thread().name)
        )

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append(
                ("launch", self.name, kwargs.get("BLOCK"), threading.current_thread().name)
            )
            args[-1].fill_(3)  # the kernel's output: an index past the table below

        return launch


def program(log: list) -> types.ModuleType:
    """forward(x, table): k0 (tuned) makes an index per row of x, k1 (not tuned) scales the
    table's rows the index picks; both run twice, as a layer repeated."""
    mod = types.ModuleType("fake_program")
    mod.k0, mod.k1 = FakeJit("k0", log), FakeJit("k1", log)
    mod._SUM = FakeJit("_SUM", log)  # a @jit helper a kernel's body calls: never replaced

    def launch_k0(x, cfg=None):
        cfg = cfg or {"BLOCK": 64}
        idx = torch.empty(x.shape[0], dtype=torch.long)
        mod.k0[(1,)](x, idx, BLOCK=cfg["BLOCK"])
        return (idx,)

    def launch_k1(rows, cfg=None):
        cfg = cfg or {"BLOCK": 32}
        out = torch.empty_like(rows)
        mod.k1[(1,)](rows, out, BLOCK=cfg["BLOCK"])
        return (out,)

    def forward(x, table):
        for _ in range(2):
            (idx,) = mod.launch_k0(x)
            (y,) = mod.launch_k1(table.index_select(0, idx))  # an index out of range raises
        return y

    mod.launch_k0, mod.launch_k1, mod.forward = launch_k0, launch_k1, forward
    return mod


def test_precompile_compiles_every_kernel_in_the_pool_and_launches_none(monkeypatch):
    cands = tuple({"BLOCK": b} for b in (16, 32, 64, 128))
    monkeypatch.setitem(autotune.CANDIDATES, "fake", cands)
    log: list = []
    mod = program(log)
    before = dict(vars(mod))
    x, table = torch.zeros(4, 2), torch.randn(3, 5)
    tuned = Kernel("k0", "fake", "key0", uses=2)
    seen_helper = []

    def run():
        seen_helper.append(mod._SUM)  # as a kernel's compile reads it
        return mod.forward(x, table)

    autotune.precompile(mod, [tuned], run, 0, torch.device("cpu"), threads=3)
    assert not [e for e in log if e[0] == "launch"]
    assert all(e[3].startswith("hetero-tune") for e in log)  # none in the caller's thread
    compiled = sorted((e[1], e[2]) for e in log)
    # every candidate of the tuned kernel once; the other kernel at its own config, once:
    # its second layer's launch has the same arguments
    assert compiled == sorted([("k0", c["BLOCK"]) for c in cands] + [("k1", 32)])
    assert {n: vars(mod)[n] for n in before} == before  # kernels and launchers restored
    assert seen_helper == [mod._SUM]


def test_a_deferred_launch_returns_its_fresh_outputs_zeroed_and_leaves_its_inputs():
    log: list = []
    mod = program(log)
    rows = torch.full((2, 3), 5.0)
    seen = {}

    def run():
        seen["out"] = mod.launch_k1(rows)[0]

    autotune.precompile(mod, [], run, 0, torch.device("cpu"), threads=2)
    assert torch.equal(seen["out"], torch.zeros(2, 3))
    assert torch.equal(rows, torch.full((2, 3), 5.0))


def test_the_compile_key_tells_layouts_and_values_apart():
    a = torch.zeros(4, 4)
    assert autotune._compile_key((a, 3)) == autotune._compile_key((torch.ones(4, 4), 3))
    assert autotune._compile_key((a, 3)) != autotune._compile_key((a.t(), 3))
    assert autotune._compile_key((a, 3)) != autotune._compile_key((a, 4))
    assert autotune._compile_key((a, [1])) == autotune._compile_key((a, [1]))  # unhashable


def test_a_forward_that_fails_on_the_zeroed_values_ends_the_precompile_not_the_tuning():
    log: list = []
    mod = program(log)

    def run():
        (idx,) = mod.launch_k0(torch.zeros(4, 2))
        if not idx.any():  # an assert on data the kernel never wrote
            raise RuntimeError("expected a nonzero index")

    autotune.precompile(mod, [], run, 0, torch.device("cpu"), threads=2)
    assert [e[:2] for e in log] == [("compile", "k0")]
    assert mod.launch_k0 is vars(mod)["launch_k0"] and not isinstance(mod.k0, autotune._CompileOnly)
