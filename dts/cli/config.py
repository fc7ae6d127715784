"""``dts config check|show``: is a configuration usable, and what does it amount to."""

from __future__ import annotations

import json

import click
import tomli_w

from .. import config as config_mod
from . import StationContext, pass_ctx
from .common import json_option


@click.group(name="config")
def command() -> None:
    """Check a configuration before a restart, or show the effective one.

    \b
    Example:
      dts config check /etc/dts/dts.toml.new && systemctl restart dts-watch
      dts config show --json | jq .station.spool
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
