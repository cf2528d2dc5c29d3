"""Where a traced decode step's link and host CPU wait: from a torch.profiler Chrome trace
(llm_generate_gpu.py --trace), the time the host->GPU copies ran, the time the host's
products ran, both at once, and the link's idle gaps between its bursts with the stage that
was running when each gap ended (what freed the link: a streamed stage's slot, usually).

    python benchmarks/trace_timeline.py TRACE.json [--gap-ms 1.0]
"""

from __future__ import annotations

import argparse
import itertools
import json


def _union(spans: list[tuple[float, float]]) -> float:
    total, end = 0.0, None
    start = None
    for s, e in sorted(spans):
        if end is None or s > end:
            if end is not None:
                total += end - start
            start, end = s, e
        else:
            end = max(end, e)
    return total + (end - start if end is not None else 0.0)


def timeline(path: str, gap_ms: float = 1.0) -> dict:
    """The summary of the trace at `path` (times in ms; see the module's note)."""
    with open(path) as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    if not events:
        return {}
    t0 = min(e["ts"] for e in events)
    end = max(e["ts"] + e["dur"] for e in events)
    # The link is the host->device copy engine; device->host copies (a GPU stage's output
    # for the CPU) run on another engine, beside it, and would read as the link's work.
    copies = sorted(
        (e["ts"], e["ts"] + e["dur"], e.get("args", {}).get("bytes", 0))
        for e in events
        if e.get("cat") == "gpu_memcpy" and "DtoH" not in e.get("name", "")
    )
    products = [
        (e["ts"], e["ts"] + e["dur"])
        for e in events
        if e.get("cat") == "cpu_op" and e["name"] in ("aten::mm", "aten::addmm", "hetero::gemv")
    ]
    stages = sorted(
        (e["ts"], e["ts"] + e["dur"], e["name"])
        for e in events
        if e.get("cat") == "user_annotation" and e["name"].startswith("stage ")
    )
    link = [(s, e) for s, e, _ in copies]
    gaps = []
    # a gap runs from the end of everything copied so far: a short copy that starts and ends
    # inside a long one does not end the link's busy time
    busy_until = itertools.accumulate((e for _, e, _ in copies), max)
    for prev_end, (start, _, _) in zip(busy_until, copies[1:], strict=False):
        if start - prev_end >= gap_ms * 1e3:
            ending = next((n for s, e, n in stages if s <= start <= e + 50), "")
            gaps.append(
                {
                    "at_ms": round((prev_end - t0) / 1e3, 2),
                    "idle_ms": round((start - prev_end) / 1e3, 2),
                    "until": ending,
                }
            )
    span = (end - t0) / 1e3
    return {
        "span_ms": round(span, 2),
        "link_busy_ms": round(_union(link) / 1e3, 2),
        "link_bytes": sum(b for _, _, b in copies),
        "cpu_products_ms": round(_union(products) / 1e3, 2),
        "both_busy_ms": round((_union(link) + _union(products) - _union(link + products)) / 1e3, 2),
        "link_idle_gaps": gaps,
        "link_idle_ms": round(sum(g["idle_ms"] for g in gaps), 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace")
    ap.add_argument("--gap-ms", type=float, default=1.0, help="report link gaps this long")
    a = ap.parse_args()
    print(json.dumps(timeline(a.trace, a.gap_ms), indent=1))


if __name__ == "__main__":
    main()
