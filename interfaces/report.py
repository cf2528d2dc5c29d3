"""Tables a person reads: the captured graph's summary per module."""

from __future__ import annotations

from rich.table import Table

from hetero.partitioner.graph import OpGraph


def human(n: float, unit: str = "") -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {prefix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def graph_table(graph: OpGraph, depth: int = 1) -> Table:
    t = Table(title=f"{graph.model_name}: {len(graph)} core-ATen nodes, inputs " + ", ".join(
        f"{k}: {v}" for k, v in graph.inputs.items()
    ))  # fmt: skip
    for col, justify in (("module", "left"), ("type", "left"), ("ops", "right"), ("FLOPs", "right"),
                         ("bytes moved", "right"), ("params", "right")):  # fmt: skip
        t.add_column(col, justify=justify)
    rows = graph.module_summary(depth)
    for r in rows:
        t.add_row(r["module"], r["type"], str(r["ops"]), human(r["flops"]), human(r["bytes"], "B"),
                  human(r["param_bytes"], "B"))  # fmt: skip
    t.add_section()
    t.add_row("total", "", str(sum(r["ops"] for r in rows)), human(graph.total_flops),
              human(sum(r["bytes"] for r in rows), "B"), human(graph.param_bytes, "B"))  # fmt: skip
    return t
