"""Which CPU kernel multiplies a decode token by a layer's weights fastest on this host: the
weight bytes per second of `x @ W.T` (batch 1) for each dtype the CPU's rows may be kept in,
through torch's default product (`torch.mm`), and through oneDNN with the weight reordered
once into its blocked layout (`mkldnn._linear_pointwise`, what Inductor's freezing emits),
and as a float32 reduction compiled by Inductor.
With CUDA, each is measured again while the link copies pinned memory to the GPU, as in a
decode step that streams other layers' weights.

    python benchmarks/cpu_gemv_kernels.py [--threads N] [--seconds S] [--json out.json]

The matrices are the LLaMA-7B layer's shapes (4096x4096, 11008x4096, 4096x11008), enough of
them in turn (`--total-mib`) that the host's L3 cannot hold them: decode reads its weights
from DRAM once per token.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from hetero.backends import cpu_gemv

SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))


def _packed(w: torch.Tensor, batch: int) -> torch.Tensor | None:
    try:
        return torch.ops.mkldnn._reorder_linear_weight(w, batch)
    except RuntimeError:  # no oneDNN path for this dtype on this CPU
        return None


def _kernels(dtype: torch.dtype):
    def mm(x, w):
        return torch.mm(x, w.t())

    def onednn(x, w):
        return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")

    yield "torch.mm", mm, lambda w, b: w
    if dtype != torch.float32:
        yield "onednn packed", onednn, _packed
        if cpu_gemv.available():  # hetero's own (backends/cpu_gemv.py)
            yield "hetero gemv", cpu_gemv.gemv, lambda w, b: w
        # the product as a float32 reduction over the rows, which Inductor's C++ code
        # vectorises itself (its own conversions, its own loop over rows per thread); last:
        # its compile took most of run 44's 70 s
        yield "inductor reduction", torch.compile(_reduction, dynamic=False), lambda w, b: w


def _reduction(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x.float().unsqueeze(1) * w.float()).sum(-1).to(x.dtype)


def _rate(fn, x, weights, nbytes: int, seconds: float, until=None) -> float:
    fn(x, weights[0])
    n, t0 = 0, time.perf_counter()
    while True:
        fn(x, weights[n % len(weights)])
        n += 1
        el = time.perf_counter() - t0
        if (until is not None and until()) or (until is None and el >= seconds):
            return n * nbytes / el


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--total-mib", type=int, default=1024)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    cuda = torch.cuda.is_available()
    if cuda:
        from hetero.calibration.split import COPY_BYTES, copy_sources, queue_copies

        sources = copy_sources(a.total_mib << 20)
    rows = []
    # the host's plain read rate, the bound the products are judged against: a sum over
    # float16 weights-sized buffers, as llm_generate_gpu.py's probe reads
    flat = [torch.ones((a.total_mib << 20) // 4, dtype=torch.float16) for _ in range(2)]
    read = {"kernel": "read (t.sum())", "alone_gbs": _rate(
        lambda x, t: t.sum(), None, flat, flat[0].numel() * 2, a.seconds) / 1e9}  # fmt: skip
    print(json.dumps(read), flush=True)
    rows.append(read)
    del flat
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for rows_, cols in SHAPES:
            one = rows_ * cols * torch.tensor([], dtype=dtype).element_size()
            count = max(2, (a.total_mib << 20) // one)
            base = [torch.randn(rows_, cols).to(dtype) for _ in range(count)]
            x = torch.randn(1, cols).to(dtype)
            ref = torch.mm(x.float(), base[0].float().t())
            for name, fn, prep in _kernels(dtype):
                ws = [prep(w, 1) for w in base]
                if any(w is None for w in ws):
                    rows.append({"dtype": str(dtype), "shape": [rows_, cols], "kernel": name,
                                 "error": "unsupported on this CPU"})  # fmt: skip
                    continue
                err = (fn(x, ws[0]).float() - ref).abs().max().item() / ref.abs().max().item()
                alone = _rate(fn, x, ws, one, a.seconds)
                row = {"dtype": str(dtype), "shape": [rows_, cols], "kernel": name,
                       "alone_gbs": alone / 1e9, "rel_err": err}  # fmt: skip
                if cuda:
                    dev = torch.device("cuda")
                    n = max(4, int(55e9 * a.seconds / COPY_BYTES))
                    start, end, nbytes = queue_copies(dev, n, sources)
                    row["shared_gbs"] = _rate(fn, x, ws, one, a.seconds, until=end.query) / 1e9
                    end.synchronize()
                    row["link_gbs"] = nbytes / (start.elapsed_time(end) / 1e3) / 1e9
                rows.append(row)
                print(json.dumps(row), flush=True)
            del base
    out = {"threads": torch.get_num_threads(), "torch": torch.__version__,
           "cpu": platform.processor() or platform.machine(), "rows": rows}  # fmt: skip
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
