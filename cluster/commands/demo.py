"""`hetero demo`: the main job on the embedded default (configs/demo.yaml)."""

from __future__ import annotations

from pathlib import Path

import typer
import yaml
from rich.console import Console

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def demo(
    config: Path = typer.Argument(
        DEFAULT_CONFIG, help="deploy config (default: configs/demo.yaml)"
    ),
) -> None:
    """Capture the demo model and show its graph, per module."""
    from hetero.cluster.modelref import load_factory
    from hetero.cluster.report import graph_table
    from hetero.partitioner import capture

    console = Console()
    doc = yaml.safe_load(Path(config).read_text())
    model, inputs = load_factory(doc["model"], where=f"{config}: model")
    with console.status("capturing with torch.export"):
        graph = capture(model, inputs)
    console.print(graph_table(graph, depth=1))


def register(app: typer.Typer) -> None:
    app.command()(demo)
