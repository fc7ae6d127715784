"""``dts results check DIR``: check a folder a model wrote, offline (docs/results.md)."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import JobFailed
from . import StationContext, pass_ctx


@click.group(name="results")
def command() -> None:
    """Structured results: check what a model writes (results.json)."""


@command.command(name="check")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--input", "input_dir", type=click.Path(exists=True, file_okay=False,
                                                      path_type=Path),
              help="The model's input (the series it was given): also build every object "
                   "into a scratch folder and check it as the station would.")
@pass_ctx
def check(ctx: StationContext, folder: Path, input_dir: Path | None) -> None:
    """Check FOLDER/results.json field by field and the files it names.

    Exit status: 0 ok, 1 a problem (printed: file, field, reason), 2 usage.

    \b
    Example:
      dts results check ./out
      dts results check ./out --input ./in
    """
    from ..builders import check_folder

    try:
        found = check_folder(folder, input_dir)
    except JobFailed as exc:
        click.echo(f"problem: {exc}", err=True)
        raise SystemExit(1) from None
    click.echo(f"ok: {found.measurements} measurement(s); builds "
               f"{', '.join(found.kinds) or 'nothing'}")
    for b in found.built:
        click.echo(f"  {b.kind}: SOP Class {b.sop_class}, series {b.series_number}")
