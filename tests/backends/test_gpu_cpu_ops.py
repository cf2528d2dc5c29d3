"""hetero's split ops inside a program: torch.export records each call as one node, the
program survives save/load, and Inductor compiles it around the calls (here on the CPU,
where both shares run on the host)."""

from __future__ import annotations

import pytest
import torch
from split_programs import split_calls, split_module

from hetero.backends import gpu_cpu_mm as gcm
from hetero.backends.gpu_cpu_mm import ACTIVATIONS, gpu_cpu_mlp, gpu_cpu_mm, mlp_share
from hetero.errors import WorkerError
from hetero.partitioner import mlp_pattern


class Layer(torch.nn.Module):
    """q/k of one input (one gpu_cpu_mm), then a gated MLP (one gpu_cpu_mlp)."""

    def __init__(self) -> None:
        super().__init__()
        self.q = torch.nn.Linear(32, 32, bias=False)
        self.k = torch.nn.Linear(32, 32, bias=True)
        self.gate = torch.nn.Linear(32, 80, bias=False)
        self.up = torch.nn.Linear(32, 80, bias=False)
        self.down = torch.nn.Linear(80, 32, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + torch.tanh(self.q(x)) * self.k(x)
        return h + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))


def _split_layer():
    torch.manual_seed(0)
    layer = Layer().eval()
    x = torch.randn(1, 4, 32)
    split, args, _ = split_module(layer, x, 0.4, torch.float32)
    return layer, x, split, args


def test_export_keeps_each_op_one_node_through_save_and_load(tmp_path):
    layer, x, split, args = _split_layer()
    ep = torch.export.export(split, args)
    assert sorted(map(str, split_calls(ep.graph_module))) == sorted(
        map(str, [gpu_cpu_mm, gpu_cpu_mlp])
    )
    torch.export.save(ep, tmp_path / "p.pt2")
    again = torch.export.load(tmp_path / "p.pt2")
    assert len(split_calls(again.graph_module)) == 2
    (out,) = again.module()(*args)
    torch.testing.assert_close(out, layer(x), rtol=1e-5, atol=1e-5)


def test_inductor_compiles_around_the_ops():
    layer, x, split, args = _split_layer()
    module = torch.export.export(split, args).module()
    compiled = torch.compile(module, backend="inductor", fullgraph=True)
    (out,) = compiled(*args)
    torch.testing.assert_close(out, layer(x), rtol=1e-5, atol=1e-5)


def test_the_activations_the_graphs_fuse_are_the_ones_the_op_computes():
    assert {*mlp_pattern.ACTIVATIONS.values(), "gelu_tanh"} == set(ACTIVATIONS)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_a_16_bit_share_rounds_its_activation_once_from_float32(dtype, act):
    """What the unsplit program computes on its GPU (float32 between casts, or CUDA's
    float32 arithmetic inside a 16-bit kernel), here on the host too."""
    torch.manual_seed(0)
    x = torch.randn(3, 16).to(dtype)
    w = (torch.randn(3 * 24, 16) / 4).to(dtype)  # gate, up, down's columns: 24 features
    h = x @ w[:48].t()
    fn = ACTIVATIONS[act]
    want = (fn(h[:, :24].float()).to(dtype) * h[:, 24:]) @ w[48:]
    assert torch.equal(mlp_share(x, w, act, gated=True), want)


# ---- overlapped hand-offs: the tasks and the watchdog, with the test playing the GPU -------


def _cells() -> torch.Tensor:
    return torch.zeros(2 * gcm._Y, dtype=torch.int32)


@pytest.mark.parametrize("cpu_dtype", [torch.float32, torch.bfloat16])
def test_overlapped_tasks_wait_for_their_flag_then_compute_what_the_ops_do(cpu_dtype):
    tasks = gcm._tasks()
    assert tasks is not None
    cells = _cells()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 64, generator=g)
    w = torch.randn(40, 64, generator=g).to(cpu_dtype)
    wm = torch.randn(3 * 24, 64, generator=g).to(cpu_dtype)
    convert = cpu_dtype != x.dtype
    xc = torch.empty(3, 64, dtype=cpu_dtype) if convert else x
    y, ym = torch.empty(3, 40, dtype=cpu_dtype), torch.empty(3, 64, dtype=cpu_dtype)
    first = tasks["queue"](tasks["finished"](0), cells, 1, x, xc, convert, w, "", False, y)
    second = tasks["queue"](first, cells, 2, x, xc, convert, wm, "silu", True, ym)
    # the second's flag first: it must still wait for the first task
    cells[gcm._X] = 2
    assert not first.done() and int(cells[gcm._Y]) == 0
    cells[gcm._X] = 1
    first.wait()
    assert torch.equal(y, x.to(cpu_dtype) @ w.t())
    # the first set its rows flag (1); the second saw 1 on the x flag, not its 2: waits
    assert int(cells[gcm._Y]) == 1 and not second.done()
    cells[gcm._X] = 2
    second.wait()
    assert int(cells[gcm._Y]) == 2
    assert torch.equal(ym, mlp_share(x.to(cpu_dtype), wm, "silu", True, host=True))


class _NoStream:
    """The flags' driver calls, for a chain driven by a test instead of a GPU."""

    def address(self, flag: torch.Tensor) -> int:
        return flag.data_ptr()

    def wait(self, *args) -> None: ...

    def write(self, *args) -> None: ...


def test_a_failed_task_releases_the_waiting_stream_and_drain_says_so():
    """A task that raises would leave the GPU waiting on a flag nobody sets (a hang at the
    next synchronisation): the watchdog sets it once the GPU reached the hand-off, and
    leaving `overlapped()` raises a WorkerError instead of returning stale rows."""
    tasks = gcm._tasks()
    chain = gcm._Chain(torch.device("cpu"), _NoStream(), tasks, gcm._Staging())
    cells = chain.cells
    bad_y = torch.empty(3, 40, dtype=torch.int64)  # no float product lands there: it raises
    x, w = torch.randn(3, 64), torch.randn(40, 64)
    chain._queued(1, tasks["queue"](chain.last, cells, 1, x, x, False, w, "", False, bad_y))
    cells[gcm._X] = 1  # the "GPU" reaches the hand-off
    with pytest.raises(WorkerError, match="CPU share failed"):
        chain.drain()
    assert int(cells[gcm._Y]) == 1  # released: the stream would go on
    chain.drain()  # reported once; the chain serves the next step


def test_a_task_runs_while_the_launching_thread_holds_the_python_lock():
    """The launching thread may hold the Python lock inside a driver call that waits for
    the GPU (cuModuleLoad did, run 21), and the GPU waits for the task's rows flag: the
    task must get there without the lock. Its tensors are held by C++ references, so
    dropping its own does not release a PyObject (which needs the lock)."""
    import ctypes

    tasks = gcm._tasks()
    chain = gcm._Chain(torch.device("cpu"), _NoStream(), tasks, gcm._Staging())
    x, w, y = torch.randn(1, 64), torch.randn(40, 64), torch.empty(1, 40)
    chain._queue_task(1, x, x, w, "", False, y)
    chain.cells[gcm._X] = 1  # the "GPU" reaches the hand-off
    ctypes.PyDLL(None).usleep(300_000)  # PyDLL: the call keeps the Python lock
    done = int(chain.cells[gcm._Y])
    chain.drain()
    assert done == 1, "the task waited for the Python lock"
    assert torch.equal(y, x @ w.t()) and chain._held == []


def test_overlapped_blocks_of_two_threads_take_turns():
    """Two generations stepping at once in two threads would share one task thread and, on
    one CUDA stream, could wait on each other forever: their blocks run one at a time."""
    import threading

    order = []

    def other() -> None:
        with gcm.overlapped():
            order.append("other")

    with gcm.overlapped(), gcm.overlapped():  # nested in one thread: no self-deadlock
        t = threading.Thread(target=other)
        t.start()
        t.join(timeout=0.2)
        assert t.is_alive()  # waiting for this block
        order.append("this")
    t.join(timeout=5)
    assert order == ["this", "other"]
