"""CLI commands: each module here defines `register(app: typer.Typer)`."""
