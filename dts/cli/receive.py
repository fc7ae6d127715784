"""Placeholder until this command lands (see the open issue)."""

import click

from ..errors import UsageError


@click.command(name="receive")
def command() -> None:
    """Not available yet."""
    raise UsageError("this command is not available yet")
