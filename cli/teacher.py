"""`loca-pipe` commands of this group (filled in by its owner)."""

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
