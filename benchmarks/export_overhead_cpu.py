"""Does hetero's captured program do more work than the module it came from? (issue 15:
ConvNeXt-T's exported program ran 5.29 ms in eager on an H200 against the module's 4.04.)

    python benchmarks/export_overhead_cpu.py                  # ConvNeXt-T, batch 8, fp32
    python benchmarks/export_overhead_cpu.py --batch 2 --rounds 3

The program is the one the eager and cudagraphs backends run: the model captured as hetero
captures it (`partitioner.graph.capture`: torch.export, then core ATen), one partition,
re-exported by `backends.export.export_unit`, called through `ExportedProgram.module()`.
Three answers, on the CPU:

1. the ATen ops each side calls from Python (the module: what torch.export records before
   decomposing; the program: its graph's nodes), and how many of those are pure views;
2. the compute ops each side dispatches (torch.profiler: copies, matmuls, convolutions,
   norms, elementwise) with their input shapes, in order: equal means the program does the
   module's device work and no more;
3. milliseconds per call: at the real width (compute-bound) and at width 8 on a 64x64 image
   (the same graph with tiny tensors: host-bound, what a GPU's eager run pays per op),
   each the fastest of `--rounds`, taken in turns.

The model is torchvision's convnext_tiny (random weights) where torchvision imports, else a
replica of it below (the same modules and forward).
"""

from __future__ import annotations

import argparse
import collections
import time

import torch
from torch import nn
from torch.nn import functional as F
from torch.profiler import ProfilerActivity, profile

from hetero.backends.base import CompileUnit
from hetero.backends.export import export_unit
from hetero.partitioner.graph import capture
from hetero.partitioner.split import flatten_inputs, param_values, split

COMPUTE = (
    "aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy", "aten::addmm", "aten::mm",
    "aten::bmm", "aten::mkldnn_convolution", "aten::cudnn_convolution", "aten::native_layer_norm",
    "aten::gelu", "aten::add", "aten::mul", "aten::mean",
)  # fmt: skip
VIEWS = ("permute", "view", "t", "transpose", "expand", "as_strided", "flatten", "getitem")


# ---- torchvision's convnext_tiny, for machines where torchvision does not import ----------------
class _LayerNorm2d(nn.LayerNorm):
    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class _Permute(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return torch.permute(x, self.dims)


class _CNBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim),
            _Permute([0, 2, 3, 1]),
            nn.LayerNorm(dim, eps=1e-6),
            nn.Linear(dim, 4 * dim),
            nn.GELU(),
            nn.Linear(4 * dim, dim),
            _Permute([0, 3, 1, 2]),
        )
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), 1e-6))

    def forward(self, x):
        return self.layer_scale * self.block(x) + x  # stochastic depth is the identity in eval


class _ConvNeXt(nn.Module):
    def __init__(self, width: int = 96) -> None:
        super().__init__()
        dims, depths = [width * k for k in (1, 2, 4, 8)], (3, 3, 9, 3)
        layers: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), _LayerNorm2d(dims[0], eps=1e-6))
        ]
        for i, (d, n) in enumerate(zip(dims, depths, strict=True)):
            layers.append(nn.Sequential(*[_CNBlock(d) for _ in range(n)]))
            if i < 3:
                layers.append(
                    nn.Sequential(_LayerNorm2d(d, eps=1e-6), nn.Conv2d(d, dims[i + 1], 2, 2))
                )
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            _LayerNorm2d(dims[3], eps=1e-6), nn.Flatten(1), nn.Linear(dims[3], 1000)
        )

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)))


def convnext_tiny(width: int = 96) -> tuple[nn.Module, str]:
    if width == 96:
        try:
            from torchvision.models import convnext_tiny as tv

            return tv(weights=None), "torchvision"
        except Exception:  # absent, or built for another torch
            pass
    return _ConvNeXt(width), "replica"


# ---- the comparison --------------------------------------------------------------------------
def hetero_program(model: nn.Module, x: torch.Tensor) -> torch.export.ExportedProgram:
    graph = capture(model, (x,))
    (part,) = split(graph, {n: 0 for n in graph.order})
    unit = CompileUnit.from_partition(part, flatten_inputs(graph, (x,)), param_values(graph))
    return export_unit(unit)


def python_ops(ep: torch.export.ExportedProgram) -> collections.Counter:
    return collections.Counter(
        getattr(n.target, "__name__", str(n.target)).split(".")[0]
        for n in ep.graph.nodes
        if n.op == "call_function"
    )


def compute_ops(fn, x) -> list[tuple[str, tuple]]:
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn(x)
    return [(e.name, tuple(map(tuple, e.input_shapes))) for e in prof.events() if e.name in COMPUTE]


def per_call_ms(fns: dict, x: torch.Tensor, rounds: int, calls: int) -> dict[str, float]:
    best = dict.fromkeys(fns, float("inf"))
    with torch.no_grad():
        for f in fns.values():
            f(x)
        for _ in range(rounds):  # in turns: a burst of load falls on both
            for name, f in fns.items():
                t0 = time.perf_counter()
                for _ in range(calls):
                    f(x)
                best[name] = min(best[name], 1e3 * (time.perf_counter() - t0) / calls)
    return best


def compare(width: int, batch: int, hw: int, rounds: int, calls: int) -> dict:
    torch.manual_seed(0)
    model, source = convnext_tiny(width)
    model.eval()
    x = torch.randn(batch, 3, hw, hw)
    with torch.no_grad():
        before = torch.export.export(model, (x,), strict=False)
    ep = hetero_program(model, x)
    program = ep.module()
    a, b = compute_ops(model, x), compute_ops(program, x)
    ms = per_call_ms({"module": model, "program": program}, x, rounds, calls)
    return {
        "source": source,
        "module_python_ops": python_ops(before),
        "program_python_ops": python_ops(ep),
        "module_compute": collections.Counter(n for n, _ in a),
        "program_compute": collections.Counter(n for n, _ in b),
        "same_compute": a == b,
        "ms": ms,
    }


def _views(c: collections.Counter) -> int:
    return sum(v for k, v in c.items() if k in VIEWS)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for label, width, batch, hw, calls in (
        (f"ConvNeXt-T {args.batch}x3x224x224 fp32", 96, args.batch, 224, 1),
        ("the same graph at width 8, 1x3x64x64 (host-bound)", 8, 1, 64, 20),
    ):
        r = compare(width, batch, hw, args.rounds, calls)
        mp, pp = r["module_python_ops"], r["program_python_ops"]
        print(f"== {label} ({r['source']}, {torch.get_num_threads()} threads)")
        print(f"  ops called from Python: module {sum(mp.values())} ({_views(mp)} views), "
              f"program {sum(pp.values())} ({_views(pp)} views)")  # fmt: skip
        print(f"    module:  {dict(mp.most_common())}")
        print(f"    program: {dict(pp.most_common())}")
        print(
            f"  compute ops dispatched, same ops and shapes in the same order: {r['same_compute']}"
        )
        print(f"    module:  {dict(r['module_compute'].most_common())}")
        if not r["same_compute"]:
            print(f"    program: {dict(r['program_compute'].most_common())}")
        ms = r["ms"]
        print(f"  ms per call (fastest of {args.rounds}): module {ms['module']:.3f}, "
              f"program {ms['program']:.3f} ({ms['program'] / ms['module']:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
