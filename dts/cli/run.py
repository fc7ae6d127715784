"""``dts run``: run the streams' processing on the jobs in run/new/."""

from __future__ import annotations

import click

from . import StationContext, pass_ctx
from .common import finish, job_ids_argument, json_option, once_option, stop_on_signals


@click.command(name="run")
@once_option
@json_option
@job_ids_argument
@pass_ctx
def command(ctx: StationContext, once: bool, as_json: bool, job_ids: tuple[str, ...]) -> None:
    """Run each waiting job's processing (container or command), check its output,
    and move the job to send/ (valid results) or failed/ (with the reason).

    Without --once it keeps serving run/new/, up to [station] max_parallel_runs at a
    time, until SIGTERM/SIGINT (running processing is then stopped and its job put
    back; exit 0). A container engine that cannot be reached exits 75 and leaves the job in
    run/new/ with its attempt counted. Container jobs use the engine at DOCKER_HOST.

    Streams with executor = "slurm" are submitted with sbatch and wait in run/slurm/
    while they run on the cluster (up to [slurm] max_submitted); dts run follows them
    (squeue) and collects each when it ends. --once collects what has ended and submits
    what waits; given job ids are submitted and followed until they end. An unreachable
    slurmctld exits 75 (docs/slurm.md).

    \b
    Example:
      dts run --once
      SLURM_CONF=/etc/slurm/slurm.conf dts run --once    # cron on a login node
      DOCKER_HOST=unix:///run/podman/podman.sock dts run 20261126T105700.123456Z-3f9a1c2e.vibe
    """
    from .. import runner

    station = ctx.station
    with stop_on_signals() as stop:
        tally = runner.serve(station, once=once, job_ids=list(job_ids), stop=stop)
    try:
        finish(tally, as_json)
    except click.exceptions.Exit:
        if not once and not job_ids:
            raise click.exceptions.Exit(0) from None  # a service stopped on request: ok
        raise
