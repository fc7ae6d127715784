"""``dts send``: deliver results from send/new/, or send any DICOM files with ``--to``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from ..errors import EXIT_FAILED, EXIT_OK, EXIT_TEMPFAIL
from . import StationContext, pass_ctx
from .common import finish, json_option, once_option, print_json, stop_on_signals


@click.command(name="send")
@once_option
@click.option("--to", "target", metavar="DEST",
              help="Send the PATHs to this destination name or HOST:PORT instead.")
@click.option("--ae-title", help="With --to: the called AE title (default: the destination's, "
              "or ANY-SCP for HOST:PORT).")
@click.option("--calling-ae", help="With --to: our AE title (default: [station] ae_title).")
@json_option
@click.argument("args", nargs=-1, metavar="[JOB]... | --to DEST PATH...")
@pass_ctx
def command(ctx: StationContext, once: bool, target: str | None, ae_title: str | None,
            calling_ae: str | None, as_json: bool, args: tuple[str, ...]) -> None:
    """Deliver results in send/new/ to their stream's destinations.

    With JOB ids: send exactly these now, whatever their backoff. With --once:
    send the jobs that are due, then exit. Otherwise keep serving the queue.
    A job waiting for a retry stays in send/new/ with next_attempt_at.

    --to DEST PATH...: send DICOM files and folders to a destination (a name
    from dts.toml or HOST:PORT), like storescu; exit 0 all stored, 1 some
    refused, 75 peer unreachable or the transfer broke off.

    \b
    Examples:
      dts send --once
      dts send 20261126T105700.123456Z-3f9a1c2e.vibe
      dts send --to pacs /data/study/
      dts send --to 10.0.0.5:104 --ae-title PACS report.dcm
    """
    from .. import sender

    if target is None:
        if ae_title or calling_ae:
            raise click.UsageError("--ae-title and --calling-ae go with --to")
        with stop_on_signals(not once and not args) as stop:
            finish(sender.serve(ctx.station, once=once, job_ids=list(args), stop=stop), as_json)
        return
    if not args:
        raise click.UsageError("--to needs at least one PATH")
    result = _send_to(ctx, target, [Path(a) for a in args], ae_title, calling_ae, as_json)
    click.get_current_context().exit(result)


def _send_to(ctx: StationContext, target: str, paths: list[Path], ae_title: str | None,
             calling_ae: str | None, as_json: bool) -> int:
    from .. import sender

    progress: Any = None
    task: Any = None
    hooks: dict[str, Any] = {}
    if sys.stderr.isatty() and not as_json:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        progress = Progress("[progress.description]{task.description}", BarColumn(),
                            MofNCompleteColumn(), TimeRemainingColumn(),
                            console=Console(stderr=True), transient=True)

        def on_start(total: int) -> None:
            nonlocal task
            progress.start()
            task = progress.add_task(f"to {target}", total=total)

        hooks = {"on_start": on_start,
                 "on_result": lambda _item, _outcome, _code: progress.advance(task)}
    try:
        res = sender.send_paths(ctx.station, target, paths, ae_title=ae_title,
                                calling_ae=calling_ae, **hooks)
    finally:
        if progress is not None:
            progress.stop()
    d = res.delivery
    missing = res.total - len(d.sent) - len(d.failed)
    code = EXIT_TEMPFAIL if d.temporary else EXIT_FAILED if (d.failed or d.refused) else EXIT_OK
    rate = len(d.sent) / res.seconds if res.seconds > 0 else 0.0
    if as_json:
        print_json({"destination": target, "total": res.total, "sent": len(d.sent),
                    "warnings": {u: f"0x{c:04X}" for u, c in d.warnings.items()},
                    "failed": d.failed, "missing": missing, "skipped": [str(p) for p in
                                                                         res.skipped],
                    "seconds": round(res.seconds, 3), "images_per_second": round(rate, 1),
                    "error": d.temporary or d.refused, "folder": res.folder})
    else:
        click.echo(f"{len(d.sent)} of {res.total} sent to {target} in {res.seconds:.1f}s "
                   f"({rate:.0f}/s); {len(d.failed)} failed, {missing} not sent")
    for path in res.skipped:
        click.echo(f"skipped (not DICOM): {path}", err=True)
    for why in d.reasons.values():
        click.echo(f"failed: {why}", err=True)
    if d.temporary or d.refused:
        click.echo(f"Error: {d.temporary or d.refused}", err=True)
    return code
