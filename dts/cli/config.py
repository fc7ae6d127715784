"""``dts config check|show``: is a configuration usable, and what does it amount to."""

from __future__ import annotations

import json
import sys

import click
import tomli_w

from .. import config as config_mod
from .. import legacy
from . import StationContext, pass_ctx
from .common import json_option, print_json


@click.group(name="config")
def command() -> None:
    """Check a configuration before a restart, or show the effective one.

    \b
    Example:
      dts config check /etc/dts/dts.toml.new && systemctl restart dts-watch
      dts config show --json | jq .station.spool
      dts config import-legacy /opt/dts-old/configuration --out /etc/dts
    """


@command.command(name="check")
@click.argument("file", required=False, type=click.Path(dir_okay=False))
@pass_ctx
def check(ctx: StationContext, file: str | None) -> None:
    """Load FILE (default: --config, $DTS_CONFIG, else the embedded one) as a start would.

    Exit 0 when it is usable, 2 with the file, the key and the reason when not. Nothing is
    created (the spool neither).

    \b
    Example:
      dts config check /etc/dts/dts.toml
    """
    cfg = config_mod.load(file or ctx.config_path, ctx.spool_path)
    click.echo(f"{cfg.path}: ok ({len(cfg.streams)} stream(s), {len(cfg.destinations)} "
               f"destination(s), rules {cfg.station.classify_rules}, spool {cfg.station.spool})")


@command.command(name="show")
@json_option
@pass_ctx
def show(ctx: StationContext, as_json: bool) -> None:
    """Print the effective configuration: every key after defaults, paths made absolute,
    secrets masked (passwords in URLs, keys named like a password or token).

    The TOML printed loads again as a dts.toml (secrets aside).

    \b
    Example:
      dts config show
      dts --config /etc/dts/dts.toml config show --json | jq '.stream[].name'
    """
    cfg = config_mod.load(ctx.config_path, ctx.spool_path)
    data = config_mod.effective(cfg)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"# the effective configuration of {cfg.path}")
    click.echo(tomli_w.dumps(data), nl=False)


@command.command(name="import-legacy")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--out", "out_dir", default=".", show_default=True, type=click.Path(file_okay=False),
              help="Folder to write dts.toml and classifyRules.json into.")
@click.option("--force", is_flag=True, help="Replace dts.toml/classifyRules.json if they exist.")
@json_option
def import_legacy(folder: str, out_dir: str, force: bool, as_json: bool) -> None:
    """Translate the data transfer station's config.json, select_statements.json and
    classifyRules.json in FOLDER into a dts.toml (the rule file is copied unchanged).

    Prints, for every legacy key, the dts key it became or why it was not carried over.
    Exit 0 when everything translated, 1 when a person must decide something (listed
    last; such a stream is written disabled), 2 for unreadable input (file, line, key).

    \b
    Example:
      dts config import-legacy /opt/dts-old/configuration --out /etc/dts
      dts config check /etc/dts/dts.toml
    """
    translation = legacy.translate(folder)
    written = legacy.write(translation, out_dir, force=force)
    if as_json:
        print_json({**translation.as_dict(), "written": [str(p) for p in written]})
    else:
        _print_report(translation.entries)
        for p in written:
            click.echo(f"wrote {p}", err=True)
        for e in translation.decisions:
            click.echo(f"to decide: {e.legacy}: {e.note}", err=True)
    click.get_current_context().exit(translation.exit_code)


def _print_report(entries: list[legacy.Entry]) -> None:
    """A table on a terminal; otherwise two lines per key (legacy -> dts, then the note)."""
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(title="legacy configuration -> dts", title_justify="left")
        for col in ("legacy", "dts", "note"):
            table.add_column(col, overflow="fold")
        for e in entries:
            table.add_row(e.legacy, e.dts or "-", ("[bold]DECIDE:[/] " if e.decide else "")
                          + e.note.replace("[", "\\["))
        Console().print(table)
        return
    for e in entries:
        click.echo(f"{e.legacy}  ->  {e.dts or '(not carried over)'}")
        if e.note:
            click.echo(f"    {'DECIDE: ' if e.decide else ''}{e.note}")
