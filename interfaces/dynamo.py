"""`torch.compile(model, backend="hetero")`: each graph dynamo captures is planned and
compiled for this machine's cluster by hetero.compile.

Registered through torch's `torch_dynamo_backends` entry point (see pyproject.toml), so
the name works without importing hetero first. Graphs hetero cannot take (symbolic
sizes passed as inputs, or a capture/plan failure) run as dynamo captured them, with
the reason logged once per graph: torch.compile must never make a model fail.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import is_fake, unset_fake_temporarily

from hetero.cluster.spec import ClusterSpec
from hetero.interfaces.api import compile as hetero_compile

log = logging.getLogger(__name__)


def _real(x: Any) -> Any:
    """Dynamo may hand fake tensors; planning needs values it can run."""

    if isinstance(x, torch.Tensor) and is_fake(x):
        return torch.zeros(x.shape, dtype=x.dtype, device="cpu")
    return x


def hetero_backend(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], **options: Any
) -> Callable[..., Any]:
    """A dynamo backend: plan and compile `gm` with hetero for the local cluster.

    `options` (torch.compile(..., options={...})) go to hetero.compile: objective,
    backends, cache_dir, executor, cluster.
    """
    if not all(isinstance(x, torch.Tensor) for x in example_inputs):
        log.info("hetero: graph takes symbolic sizes as inputs; running it as captured")
        return gm.forward
    options = dict(options.get("options", options))
    cluster = options.pop("cluster", None) or ClusterSpec.local()
    inputs = tuple(_real(x) for x in example_inputs)
    # Backends may size their thread pools while compiling; dynamo checks that torch's
    # global thread count is unchanged across a frame's compile, so put it back.
    threads = torch.get_num_threads()
    try:
        # Capture must see plain tensors, not the fake mode dynamo may still have active.
        fake_mode = detect_fake_mode(example_inputs)
        if fake_mode is not None:
            with unset_fake_temporarily():
                cm = hetero_compile(gm, inputs, cluster=cluster, **options)
        else:
            cm = hetero_compile(gm, inputs, cluster=cluster, **options)
    except Exception as e:  # never fail the user's torch.compile: fall back to the graph as is
        log.warning("hetero: could not compile a captured graph (%s); running it as captured", e)
        return gm.forward
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)

    def run(*args: Any) -> Any:
        return cm(*args)

    run.compiled_model = cm  # for tests and introspection
    return run
