"""``dts classify``: study.json, classification rules, streams, fan-out into run jobs."""

from __future__ import annotations

import click

from ..errors import UsageError
from . import StationContext, pass_ctx
from .common import (
    finish,
    job_ids_argument,
    json_option,
    once_option,
    print_json_lines,
    stop_on_signals,
)


@click.command(name="classify")
@once_option
@click.option("--explain", is_flag=True,
              help="Say for every stream whether it matches JOB and why; moves nothing.")
@json_option
@job_ids_argument
@pass_ctx
def command(ctx: StationContext, once: bool, explain: bool, as_json: bool,
            job_ids: tuple[str, ...]) -> None:
    """Classify received studies and queue one run job per matching stream.

    Without JOB: serve classify/new (forever, or until empty with --once). With JOB
    ids: classify exactly these, also from unmatched/, done/ or failed/ after a rule
    change (new run jobs get a suffix, e.g. JOB.stream.2).

    \b
    Example:
      dts classify --once
      dts classify --explain 20261126T105700.123456Z-3f9a1c2e
      dts classify --explain --json JOB | jq '.streams[] | {stream, matched, reasons}'
    """
    from .. import classifier

    station = ctx.station
    if explain:
        if not job_ids:
            raise UsageError("--explain needs at least one JOB")
        results = [classifier.explain(station, j) for j in job_ids]
        if as_json:
            print_json_lines(results)
        else:
            click.echo("\n\n".join(classifier.render_explanation(r) for r in results))
        click.get_current_context().exit(1 if any(r["error"] for r in results) else 0)
    with stop_on_signals(not once and not job_ids) as stop:
        finish(classifier.serve(station, once=once, job_ids=list(job_ids), stop=stop), as_json)
