"""Plan.draw(path): the partitioned group graph as PNG or SVG, one colour per device,
transfers as labelled edges between partitions."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import networkx as nx

from hetero.errors import ConfigError

if TYPE_CHECKING:
    from hetero.partitioner.plan import Plan

_PALETTE = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3")


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def plan_graph(plan: Plan) -> nx.DiGraph:
    """Partitions as nodes (plus the caller), transfers as edges with bytes and ms."""
    g = nx.DiGraph()
    for p in plan.partitions:
        g.add_node(p.index, partition=p)
    for i, (a, b) in enumerate(zip(plan.partitions, plan.partitions[1:], strict=False)):
        g.add_edge(a.index, b.index, order=i)  # execution order, drawn faint
    for t in plan.transfers:
        src = t.src if t.src >= 0 else "in"
        dst = t.dst if t.dst >= 0 else "out"
        g.add_edge(src, dst, transfer=t)
    return g


def draw(plan: Plan, path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() not in (".png", ".svg"):
        raise ConfigError(f"{path}: draw() writes .png or .svg, not {path.suffix or 'no suffix'}")
    import matplotlib  # optional (hetero[draw]): only drawing needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional (hetero[draw]): only drawing needs it

    g = plan_graph(plan)
    devices = list(dict.fromkeys(p.device for p in plan.partitions))
    colour = {d: _PALETTE[i % len(_PALETTE)] for i, d in enumerate(devices)}
    order = ["in", *[p.index for p in plan.partitions], "out"]
    pos = {n: (i, 0.0 if i % 2 == 0 else 0.6) for i, n in enumerate(order) if n in g}
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(order)), 4.2))
    labels = {}
    colours = []
    nodes = [n for n in order if n in g]
    for n in nodes:
        if n in ("in", "out"):
            labels[n] = "inputs" if n == "in" else "outputs"
            colours.append("#BBBBBB")
        else:
            p = g.nodes[n]["partition"]
            labels[n] = (
                f"p{p.index}\n{p.device.split('/')[-1]}\n{p.backend}\n{p.predicted_ms:.2f} ms"
            )
            colours.append(colour[p.device])
    nx.draw_networkx_nodes(g, pos, nodelist=nodes, node_color=colours, node_size=2600, ax=ax)
    nx.draw_networkx_labels(g, pos, labels=labels, font_size=7, font_color="white", ax=ax)
    moves = [(u, v) for u, v, d in g.edges(data=True) if "transfer" in d]
    stays = [(u, v) for u, v, d in g.edges(data=True) if "transfer" not in d]
    nx.draw_networkx_edges(g, pos, edgelist=stays, style="dotted", alpha=0.4, ax=ax, node_size=2600)
    nx.draw_networkx_edges(
        g,
        pos,
        edgelist=moves,
        width=1.6,
        ax=ax,
        node_size=2600,
        connectionstyle="arc3,rad=0.15",
        arrows=True,
    )
    edge_labels = {
        (u, v): f"{_bytes(d['transfer'].bytes)}\n{d['transfer'].predicted_ms:.3f} ms"
        for u, v, d in g.edges(data=True)
        if "transfer" in d
    }
    nx.draw_networkx_edge_labels(g, pos, edge_labels=edge_labels, font_size=6, ax=ax)
    for d in devices:
        ax.scatter([], [], color=colour[d], label=d)
    ax.legend(
        loc="upper center",
        bbox_to_anchor=(0.5, -0.02),
        ncol=max(1, len(devices)),
        fontsize=7,
        frameon=False,
    )
    ax.margins(x=0.12, y=0.3)
    ax.set_title(
        f"{plan.model} on {plan.cluster} ({plan.objective}): {plan.predicted_ms:.3f} ms", fontsize=9
    )
    ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
