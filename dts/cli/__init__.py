"""The ``dts`` command: a thin click layer over the core, one module per command.

Exit status (every command): 0 ok (an empty queue is ok) · 1 some work failed
(moved to failed/) · 2 usage or configuration error · 75 temporary failure (a peer
or the container engine is down; cron's next run retries).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

import click

from ..errors import DtsError

if TYPE_CHECKING:
    from ..station import Station

EPILOG = """\b
Exit status: 0 ok · 1 some work failed (moved to failed/) · 2 usage or
configuration error · 75 temporary failure (peer or engine down; retry later).
"""

# command name -> module under dts.cli holding a click command called ``command``
COMMANDS = {
    "receive": "receive",
    "import": "import_",
    "echo": "echo",
    "classify": "classify",
    "run": "run",
    "send": "send",
    "watch": "watch",
    "status": "status",
    "show": "show",
    "log": "log",
    "requeue": "requeue",
    "clean": "clean",
    "config": "config",
    "results": "results",
    "web": "web",
    "review": "review",
    "replay": "replay",
    "compare": "compare",
    "notify": "notify",
}

# The line each command shows in `dts --help`, so that listing them imports none of them
# (pydicom and pynetdicom alone take half a second; tests/test_cli.py keeps these equal to
# the commands' own docstrings). A command missing here is imported to ask it.
SHORT_HELP = {
    "classify": "Classify received studies and queue one run job per matching stream.",
    "compare": "Compare two streams' results, per study both processed, differences marked.",
    "clean": "Remove finished jobs older than a duration, and stale tmp/ entries.",
    "config": "Check a configuration before a restart, or show the effective one.",
    "echo": "Check with a DICOM C-ECHO that a peer answers (exit 0) or not (exit 75).",
    "import": "Bring DICOM files or folders in as if received: one job per study.",
    "log": "Print the station journal, oldest first.",
    "notify": "Post webhooks for failed, delivered, stuck and review events ([[notify]]).",
    "receive": "Receive studies over DICOM into the spool until stopped.",
    "replay": "Run studies already processed (their input kept in done/) through a stream "
              "again.",
    "requeue": "Put finished, failed or unmatched jobs back into a queue for another try.",
    "review": "List, approve or reject results waiting in review/ for a person.",
    "results": "Structured results: check what a model writes (results.json).",
    "run": "Run each waiting job's processing (container or command), check its output, "
           "and move the job to send/ (valid results) or failed/ (with the reason).",
    "send": "Deliver results in send/new/ to their stream's destinations.",
    "show": "Print a job's job.json and history.",
    "status": "Show every queue's count and oldest age, and whether the receiver runs.",
    "watch": "Run the whole station: receive, classify, run and send, until stopped.",
    "web": "Serve the page: overview, exams, timelines, attention, log, configuration, and "
           "the JSON API (/api/...) and /metrics, until SIGTERM.",
}


class StationContext:
    """What the group hands every command: the station, built on first use."""

    def __init__(self, config_path: str | None, spool_path: str | None, verbose: int) -> None:
        self.config_path = config_path
        self.spool_path = spool_path
        self.verbose = verbose
        self._station: Station | None = None

    @property
    def station(self) -> Station:
        if self._station is None:
            from ..station import Station  # not for `dts --help` (see SHORT_HELP)

            self._station = Station.open(self.config_path, self.spool_path)
        return self._station


pass_ctx = click.make_pass_decorator(StationContext)


class DtsCommandError(click.ClickException):
    """A core ``DtsError`` shown as ``Error: ...`` with its documented exit status."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.code = exit_code

    @property  # type: ignore[override]
    def exit_code(self) -> int:  # type: ignore[override]
        return self.code


class DtsGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        module = COMMANDS.get(name)
        if module is None:
            return None
        cmd = importlib.import_module(f"{__name__}.{module}").command
        assert isinstance(cmd, click.Command)
        return cmd

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """click's listing, from SHORT_HELP instead of importing every command."""
        names = self.list_commands(ctx)
        if not names:
            return
        limit = formatter.width - 6 - max(len(n) for n in names)
        rows = []
        for name in names:
            text = SHORT_HELP.get(name)
            # a stand-in with the same help: click shortens it as it would the command's
            cmd = click.Command(name, help=text) if text is not None \
                else self.get_command(ctx, name)
            rows.append((name, cmd.get_short_help_str(limit) if cmd is not None else ""))
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DtsError as exc:
            raise DtsCommandError(str(exc), exc.exit_code) from None


@click.group(cls=DtsGroup, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", envvar="DTS_CONFIG", type=click.Path(dir_okay=False),
              help="dts.toml to use (default: $DTS_CONFIG, else the embedded configuration).")
@click.option("--spool", "spool_path", envvar="DTS_SPOOL", type=click.Path(file_okay=False),
              help="Spool folder (default: $DTS_SPOOL, else [station] spool of the configuration).")
@click.option("-v", "--verbose", count=True, help="More diagnostics on stderr (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors on stderr.")
@click.version_option(package_name="dts")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, spool_path: str | None, verbose: int,
        quiet: bool) -> None:
    """dts — a data transfer station for image AI.

    \b
    PACS --C-STORE--> receive -> classify -> run -> send --C-STORE--> PACS
    Each stage is a command working on the spool; `dts watch` runs them all.
    """
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s dts[%(process)d] %(levelname)s %(name)s: %(message)s")
    # dts reports a peer's failure itself, once (message, event, exit status); pynetdicom's
    # own trail of the same failure shows only with -v.
    if verbose == 0:
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    elif level > logging.DEBUG:
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    ctx.obj = StationContext(config_path, spool_path, verbose)


def main() -> None:
    cli(prog_name="dts")


def wants_json(flag: bool) -> bool:
    return flag


def is_terminal() -> bool:
    return sys.stdout.isatty() and os.environ.get("TERM") != "dumb"
