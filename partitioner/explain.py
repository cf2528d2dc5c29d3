"""Plan.explain(): the plan as tables a person reads at a glance (a dry-run report)."""

from __future__ import annotations

import io
from collections import defaultdict
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from hetero.partitioner.phases import Phase

if TYPE_CHECKING:
    from hetero.partitioner.generation_plan import GenerationPlan
    from hetero.partitioner.plan import Plan

_MAX_NAMES = 6  # op names shown per rejection row before "+N more"


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def explain(plan: Plan, width: int = 120) -> str:
    buf = io.StringIO()
    console = Console(file=buf, width=width, force_terminal=False, color_system=None)
    measured = dict(plan.measured_ms)
    title = (
        f"{plan.model} on {plan.cluster}: {plan.objective} plan ({plan.algorithm}), "
        f"predicted {plan.predicted_ms:.3f} ms"
        + (" per microbatch" if plan.objective.pipelined else "")
    )
    if plan.method:
        title += f"\nmethod: {plan.method}; " + (
            "proven optimal" if plan.optimal else "best found, not proven optimal"
        )
    t = Table(title=title, title_justify="left")
    for col, just in (
        ("part", "right"),
        ("device", "left"),
        ("backend", "left"),
        ("weights", "left"),
        ("ops", "right"),
        ("groups", "left"),
        ("predicted ms", "right"),
        ("measured ms", "right"),
        ("memory", "right"),
        ("receives", "left"),
    ):
        t.add_column(col, justify=just)
    incoming: dict[int, list[str]] = defaultdict(list)
    for tr in plan.transfers:
        src = "input" if tr.src < 0 else f"p{tr.src}"
        incoming[tr.dst].append(f"{src}: {_bytes(tr.bytes)} {tr.predicted_ms:.3f} ms")
    for p in plan.partitions:
        groups = ", ".join(p.groups[:3]) + (f" +{len(p.groups) - 3}" if len(p.groups) > 3 else "")
        device = p.device + (" (emulated)" if p.emulated else "")
        weights = p.weights
        if p.weights == "streamed":
            weights += f" ({p.weight_stream_ms:.3f} ms)"
        t.add_row(
            f"p{p.index}",
            device,
            p.backend,
            weights,
            str(len(p.nodes)),
            groups,
            f"{p.predicted_ms:.3f}",
            f"{measured[p.index]:.3f}" if p.index in measured else "-",
            _bytes(p.memory_bytes),
            "; ".join(incoming.get(p.index, [])) or "-",
        )
    outs = [tr for tr in plan.transfers if tr.dst < 0]
    for tr in outs:
        t.add_row(
            "out",
            tr.dst_device,
            "",
            "",
            "",
            "",
            f"{tr.predicted_ms:.3f}",
            "",
            "",
            f"p{tr.src}: {_bytes(tr.bytes)}",
        )
    console.print(t)
    for line in choice_lines(plan):
        console.print(line, highlight=False, soft_wrap=True, markup=False)

    if plan.transfers:
        tt = Table(title="transfers", title_justify="left")
        for col in ("from", "to", "values", "bytes", "link", "ms"):
            tt.add_column(col)
        for tr in plan.transfers:
            vals = ", ".join(tr.values[:4]) + (
                f" +{len(tr.values) - 4}" if len(tr.values) > 4 else ""
            )
            tt.add_row(
                f"{'input' if tr.src < 0 else f'p{tr.src}'} ({tr.src_device})",
                f"{'output' if tr.dst < 0 else f'p{tr.dst}'} ({tr.dst_device})",
                vals,
                _bytes(tr.bytes),
                " > ".join(tr.links),
                f"{tr.predicted_ms:.3f}",
            )
        console.print(tt)

    if plan.memory:
        console.print(
            "memory: " + ", ".join(f"{dev} {_bytes(b)}" for dev, b in plan.memory), highlight=False
        )

    if plan.rejections:
        rt = Table(title="kept off a device", title_justify="left")
        for col in ("device", "reason", "ops / groups"):
            rt.add_column(col)
        grouped: dict[tuple[str, str], list[str]] = defaultdict(list)
        for r in plan.rejections:
            grouped[(r.device, _reason_key(r.reason))].append(r.node)
        for (device, reason), nodes in grouped.items():
            shown = ", ".join(nodes[:_MAX_NAMES]) + (
                f" +{len(nodes) - _MAX_NAMES} more" if len(nodes) > _MAX_NAMES else ""
            )
            rt.add_row(device, reason, shown)
        console.print(rt)

    for note in plan.notes:
        console.print(f"note: {note}", highlight=False)
    return buf.getvalue()


def choice_lines(plan: Plan) -> list[str]:
    """One line per partition whose backend was chosen by measurement, e.g.
    "p0 (local/gpu0): triton 5.88 ms, chosen over inductor 6.10 ms (predicted 5.20 ms
    for triton)"."""
    lines = []
    for p in plan.partitions:
        if not p.choice:
            continue
        chosen, *others = p.choice
        timed = [t for t in others if t.ms is not None]
        text = f"{chosen.backend} {_ms(chosen.ms)}"
        if timed:
            text += ", chosen over " + ", ".join(f"{t.backend} {_ms(t.ms)}" for t in timed)
        failed = [t for t in others if t.ms is None]
        if chosen.ms is None:
            text += f" ({chosen.note}; kept as planned)"
        if failed:
            text += "; " + "; ".join(f"{t.backend}: {t.note}" for t in failed)
        planned = next((t.backend for t in p.choice if t.planned), "")
        if planned:
            text += f" (predicted {p.predicted_ms:.3f} ms for {planned})"
        if p.choice_cached:
            text += " [cached]"
        lines.append(f"backend choice p{p.index} ({p.device}): {text}")
    return lines


def _ms(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.3f} ms" if ms < 10 else f"{ms:.2f} ms"


def _reason_key(reason: str) -> str:
    """Rows with the same cause merge: 'aten.x unsupported by tvm on npu: why' -> 'tvm on npu: why'."""
    if " unsupported by " in reason:
        return "unsupported by " + reason.split(" unsupported by ", 1)[1]
    return reason


def explain_generation(gplan: GenerationPlan, width: int = 140) -> str:
    """Both phases of a generation plan side by side: per group, where prefill and decode
    run it, the predicted time, and every other placement's time (why it sits there)."""
    buf = io.StringIO()
    console = Console(file=buf, width=width, force_terminal=False, color_system=None)
    pre, dec = gplan.prefill, gplan.decode
    title = (
        f"{dec.model} on {dec.cluster}, generation (batch {gplan.batch}, cache "
        f"{gplan.max_len}): time to first token {gplan.predicted_ttft_ms:.2f} ms "
        f"predicted, {gplan.predicted_decode_ms:.2f} ms per token"
    )
    t = Table(title=title, title_justify="left")
    for col, just in (
        ("group", "left"),
        ("prefill", "left"),
        ("ms", "right"),
        ("decode", "left"),
        ("ms", "right"),
        ("why (decode: other placements, ms)", "left"),
    ):
        t.add_column(col, justify=just)
    prefill = {c.group: c for c in gplan.choice(Phase.PREFILL)}
    for c in gplan.choice(Phase.DECODE):
        p = prefill.get(c.group)
        others = ", ".join(f"{a} {ms:.3f}" for a, ms in c.alternatives[:4])
        t.add_row(
            c.group,
            p.chosen if p else "-",
            f"{p.predicted_ms:.3f}" if p else "",
            c.chosen,
            f"{c.predicted_ms:.3f}",
            (c.reason + ("; " if c.reason and others else "") + others) or "-",
        )
    console.print(t)
    for move in gplan.moves:
        console.print(
            f"cache move after prefill: {len(move.state)} buffer(s), {_bytes(move.bytes)} "
            f"{move.src} -> {move.dst}, {move.predicted_ms:.3f} ms",
            highlight=False,
        )
    mem = dict(dec.memory)
    for dev, b in pre.memory:
        mem[dev] = max(mem.get(dev, 0), b)
    console.print(
        "memory (the larger phase): " + ", ".join(f"{d} {_bytes(b)}" for d, b in mem.items()),
        highlight=False,
    )
    for note in gplan.notes:
        console.print(f"note: {note}", highlight=False)
    return buf.getvalue()
