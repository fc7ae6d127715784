"""``dts import PATH...``: DICOM files or folders from disk enter as if received."""

from __future__ import annotations

from pathlib import Path

import click

from ..config import valid_ae_title
from ..errors import EXIT_FAILED, UsageError
from . import StationContext, pass_ctx
from .common import json_option, print_json


def _ae(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not valid_ae_title(value):
        raise click.BadParameter(f"not a valid AE title: {value!r}")
    return value


@click.command(name="import")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--calling-ae", callback=_ae, help="Calling AE title to record (as if it sent).")
@click.option("--called-ae", callback=_ae, help="Called AE title to record (default: ours).")
@json_option
@pass_ctx
def command(ctx: StationContext, paths: tuple[Path, ...], calling_ae: str | None,
            called_ae: str | None, as_json: bool) -> None:
    """Bring DICOM files or folders in as if received: one job per study.

    Prints one line per job (job id, Study Instance UID, instances). Files that
    are not DICOM are skipped with a warning; files whose UIDs cannot be
    stored are refused (exit 1, the other studies are still imported).

    \b
    Example:
      dts import --calling-ae PACS /media/cdrom/DICOM
    """
    from ..importer import import_paths

    result = import_paths(ctx.station, list(paths), calling_ae=calling_ae, called_ae=called_ae)
    for skip in result.skipped:
        kind = "refused" if skip.refused else "skipped"
        click.echo(f"warning: {kind} {skip.path}: {skip.reason}", err=True)
    if as_json:
        print_json({"jobs": [vars(j) for j in result.jobs],
                    "skipped": [{"path": str(s.path), "reason": s.reason, "refused": s.refused}
                                for s in result.skipped]})
    else:
        for job in result.jobs:
            click.echo(f"{job.job_id}\t{job.study_uid}\t{job.instances}")
    if not result.jobs and not result.skipped:
        raise UsageError("no files found under " + " ".join(map(str, paths)))
    if result.refused:
        click.get_current_context().exit(EXIT_FAILED)
