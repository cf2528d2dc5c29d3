"""Shared fixtures: small models (built from configs, random weights, nothing downloaded)."""

from __future__ import annotations

import gc
import os
import tempfile

import pytest
import torch
from llm_models import captured_llama, llama_lm

# Keep the 2-core CI machine responsive when several torch ops run in tests.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# The artifact cache signs manifests with a per-installation key (backends/signing.py):
# tests use their own, never the user's. Child processes (hetero serve, Ray) inherit it.
os.environ.setdefault(
    "HETERO_KEY_FILE", os.path.join(tempfile.mkdtemp(prefix="hetero-test-key-"), "artifact.key")
)
# Nor the user's cache: a calibration profile saved there (`./tools/demo` writes one for
# dev-box-npu) changed the plans the tests make, and a CI machine starts without one.
os.environ.setdefault("HETERO_CACHE_DIR", tempfile.mkdtemp(prefix="hetero-test-cache-"))
# hetero.compile measures every backend of a device kind per partition by default: the
# tests of everything else compile with the planned backend only (tests/runtime/
# test_choice.py asks for the measured choice).
os.environ.setdefault("HETERO_CHOOSE", "fixed")


def gpt2_model(layers: int = 2, dim: int = 64, heads: int = 4, vocab: int = 128, ctx: int = 64):
    from transformers import GPT2Config, GPT2Model

    cfg = GPT2Config(
        n_layer=layers, n_embd=dim, n_head=heads, vocab_size=vocab, n_positions=ctx,
        use_cache=False, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    return GPT2Model(cfg).eval()


def bert_model(layers: int = 2, dim: int = 64, heads: int = 4, vocab: int = 128):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        num_hidden_layers=layers, hidden_size=dim, num_attention_heads=heads,
        intermediate_size=4 * dim, vocab_size=vocab, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    return BertModel(cfg).eval()


class TestMLP(torch.nn.Module):
    """A plain MLP defined in the tests (two hidden layers, ReLU and SiLU)."""

    __test__ = False

    def __init__(self, d_in: int = 32, hidden: int = 64, d_out: int = 16) -> None:
        super().__init__()
        self.l1 = torch.nn.Linear(d_in, hidden)
        self.l2 = torch.nn.Linear(hidden, hidden)
        self.l3 = torch.nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l3(torch.nn.functional.silu(self.l2(torch.relu(self.l1(x)))))


# Compute-only modules (compiles, TVM, the Triton interpreter, captures, partitioner
# properties, generation correctness): tools/test runs them in a second pytest process under
# `nice -n 19` (HETERO_TEST_SHARE=background) beside the rest at normal priority
# (HETERO_TEST_SHARE=foreground). Chosen with `pytest --durations=0`: the foreground's Ray,
# servers and subprocesses wait more than they compute, so a compute-only module left there
# adds its whole time to the suite's, while here it fills those waits, until this share is
# the longer (2026-12-05, quiet 2-core box: moving 15 modules, 44 s run alone, made it the
# longer by 29 s; the 6 smallest went back). Whatever measures wall time stays out of here,
# as it would measure its own starvation: Ray and servers, the fault suite, the online
# re-plans, the measured backend choice (runtime/test_choice.py), calibration, and the
# default planner's proof of optimality within its one-second exact search
# (partitioner/test_scale.py). A test of a module listed here that uses Ray, or is marked
# `timing`, stays in the foreground.
BACKGROUND = (
    "tests/runtime/test_generation.py",
    "tests/partitioner/test_generation_plan.py",
    "tests/runtime/test_split_linear.py",
    "tests/calibration/test_generation_feedback.py",
    "tests/partitioner/test_algorithms.py",
    "tests/runtime/test_streaming.py",
    "tests/partitioner/test_phases.py",
    "tests/interfaces/test_pretrained.py",
    "tests/interfaces/test_validation.py",
    "tests/interfaces/test_dynamo.py",
    # compute-only modules of the foreground (2026-12-06: 20 s there alone; test_host_dtype
    # reads a capture this share has already made)
    "tests/partitioner/test_host_dtype.py",
    "tests/partitioner/test_search_prices.py",
    "tests/partitioner/test_split.py",
    "tests/backends/test_library_ops.py",
    # from background2, which finished last (2026-12-06, three shares on the quiet 2-core box,
    # collection and garbage collection trimmed: foreground 477 s, background 437 s,
    # background2 517 s; these three ~23 s of background2's): captures and eager/exported
    # programs, no compiler
    "tests/partitioner/test_capture.py",
    "tests/backends/test_export.py",
    "tests/backends/test_eager.py",
)
# The compilers' own modules (TVM, the Triton interpreter, Inductor, the artifact cache) and
# torch.export's captures: a third process, also under `nice -n 19`
# (HETERO_TEST_SHARE=background2). With one background process the two cores sat a third idle
# (clean CI 2026-12-06: 13:40 of user time in 11:07 on two cores, the background the longer by
# 98 s): the foreground's waits leave a core to each.
# Split so (clean CI 2026-12-06): foreground 7:42, background 8:22 (the capture module since
# moved here), this share 7:54; 9:58 in all with the set-up. Then (clean CI, 10:09 in all):
# foreground 8:12, background 7:38, this share 8:34, alone on the quiet box 222 s and 305 s:
# this share's compiles run in more threads and processes (TVM's, its subprocesses) and so
# take more of the cores the two share, about 0.6 of one against the other's 0.5 while the
# foreground runs. Balanced for that, in the same ratio: with the generation modules'
# captures shared (llm_models) and five small modules out of the foreground, the background
# ~233 s alone and this share ~289 s (2026-12-06, each alone; ±10% from run to run).
BACKGROUND_2 = (
    "tests/backends/test_tvm.py",
    "tests/backends/triton/test_triton_rules.py",
    "tests/backends/test_tvm_lowering.py",
    "tests/backends/test_cache.py",
    "tests/backends/test_tvm_safe_index.py",
    "tests/backends/triton/test_triton_kernels.py",
    "tests/backends/triton/test_triton_fusion.py",
    "tests/backends/triton/test_triton_backend.py",
    "tests/backends/test_inductor.py",
    "tests/backends/test_linear_fold.py",
    "tests/backends/test_cpu_gemv.py",
)
SHARES = ("foreground", "background", "background2")


def _uses_ray(item: pytest.Item) -> bool:
    return bool(item.get_closest_marker("ray")) or "ray_cluster" in item.fixturenames


def _share(item: pytest.Item, root) -> str:
    if _uses_ray(item) or item.get_closest_marker("timing"):
        return "foreground"
    module = item.path.relative_to(root).as_posix()
    if module in BACKGROUND_2:
        return "background2"
    return "background" if module in BACKGROUND else "foreground"


def _select_share(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Keeps the tests of $HETERO_TEST_SHARE (all when unset). A BACKGROUND entry that names
    no file fails every run: a renamed module would otherwise move to the foreground
    unnoticed and the two shares drift apart."""
    root = config.rootpath
    missing = [m for m in (*BACKGROUND, *BACKGROUND_2) if not (root / m).is_file()]
    if missing:
        raise pytest.UsageError(
            f"tests/conftest.py BACKGROUND(_2) names modules that do not exist: {missing}; "
            "update the list (measure the shares with `pytest --durations=0`)"
        )
    share = os.environ.get("HETERO_TEST_SHARE", "")
    if not share:
        return
    if share not in SHARES:
        raise pytest.UsageError(f"HETERO_TEST_SHARE={share!r} is not one of {SHARES}")
    kept, dropped = [], []
    for item in items:
        (kept if _share(item, root) == share else dropped).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def pytest_ignore_collect(collection_path, config: pytest.Config) -> bool | None:
    """A background share collects only its own modules: every test of a module not in its
    list runs in the foreground (_share), and importing the rest (Ray, gRPC, the serving
    stack: ~7 s of CPU a process on the 2-core box) only to deselect it took CPU from the
    shares that run, and left their long-lived objects for every full garbage collection to
    walk. The foreground collects everything (a listed module's Ray and timing tests are its)."""
    share = os.environ.get("HETERO_TEST_SHARE", "")
    listed = {"background": BACKGROUND, "background2": BACKGROUND_2}.get(share)
    if listed is None or collection_path.suffix != ".py":
        return None
    if not collection_path.name.startswith("test_"):
        return None
    module = collection_path.relative_to(config.rootpath).as_posix()
    return True if module not in listed else None


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    """What collection imported (torch, transformers, TVM, the test modules: ~270k objects)
    lives for the whole session: frozen out of the cyclic collector, each full collection
    walks only what the tests make (library code calls gc.collect() between measured
    backends and feedback rounds). And a full collection waits for 100 young-generation
    collections, not 10: the generation tests' captures are long-lived by design, and
    walking them every few tests cost 7% of a share's CPU (2026-12-06: 17.8 s of full
    collections in 305 s for background2 alone; 6.8 s of 50 s for the planning modules)."""
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, 100)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Frozen objects stay frozen to the end unless thawed: the interpreter's shutdown would
    then find nanobind's (Triton's) functions alive and print them as leaks."""
    gc.unfreeze()


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups into node ids
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """tools/test's share (above); then groups for `pytest -n 2 --dist loadgroup`: every
    test that starts Ray runs on one worker, so the 2-core machine never hosts two Ray
    clusters at once and the session cluster starts once; every other module stays whole on
    one worker, so its module fixtures (captured models, servers) are built once."""
    _select_share(config, items)
    if not config.pluginmanager.hasplugin("xdist"):  # its marker exists only with it
        return
    for item in items:
        if _uses_ray(item):
            group = "ray"
        else:
            group = item.nodeid.split("::", 1)[0]
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def tiny_gpt():
    from hetero.interfaces.models import TinyGPT

    torch.manual_seed(0)
    model = TinyGPT(vocab=128, dim=64, heads=4, layers=2, ctx=64).eval()
    return model, (torch.randint(0, 128, (2, 16)),)


@pytest.fixture(scope="session")
def mlp():
    torch.manual_seed(0)
    return TestMLP().eval(), (torch.randn(4, 32),)


@pytest.fixture(scope="session")
def gpt2():
    return gpt2_model(), (torch.randint(0, 128, (2, 16)),)


@pytest.fixture(scope="session")
def bert():
    return bert_model(), (torch.randint(0, 128, (2, 16)),)


@pytest.fixture(scope="session")
def tiny_llama():
    """(model, prompt [1, 11], transformers' greedy 32 new tokens for it)."""
    model = llama_lm()
    torch.manual_seed(1)
    prompt = torch.randint(0, 512, (1, 11))
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False)
    return model, prompt, out[:, prompt.shape[1] :]


@pytest.fixture(scope="session")
def tiny_llama_lm():
    """tiny_llama's model (llama_lm(), the same weights) captured for generation (batch 1, a
    64-position cache). Capturing costs seconds; the tests only read the graphs, so every
    module shares one: llm_models.captured_llama's, which other modules ask for directly."""
    return captured_llama(torch.float32)
