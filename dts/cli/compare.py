"""``dts compare``: two streams' results on the studies both processed, side by side."""

from __future__ import annotations

from typing import Any

import click

from ..errors import UsageError
from ..journal import parse_since
from . import StationContext, is_terminal, pass_ctx
from .common import json_option, print_json


def _value(v: Any, unit: Any) -> str:
    if v is None:
        return "-"
    text = f"{v:g}" if isinstance(v, float) else str(v)
    return f"{text} {unit}" if unit and unit != "1" else text


def _produced(counts: dict[str, int]) -> str:
    """``1 sr, 2 seg, 1 other file(s)``"""
    return ", ".join(f"{n} other file(s)" if kind == "files" else f"{n} {kind}"
                     for kind, n in counts.items()) or "nothing"


@click.command(name="compare")
@click.argument("stream_a", metavar="STREAM_A")
@click.argument("stream_b", metavar="STREAM_B")
@click.option("--since", default=None, metavar="WHEN",
              help="Only runs that finished since then (a duration like 7d, or ISO-8601).")
@click.option("--all", "show_all", is_flag=True,
              help="On a terminal: every result, not only those that differ.")
@json_option
@pass_ctx
def command(ctx: StationContext, stream_a: str, stream_b: str, since: str | None,
            show_all: bool, as_json: bool) -> None:
    """Compare two streams' results, per study both processed, differences marked.

    For every study with a finished job (in done/) of each stream, the latest of
    each: the values the models reported (job.json `results`, paired by name and
    series) and what each produced (object kinds and counts). A shadow stream beside
    the live one, or `dts replay` of a new version, gives the pairs.

    \b
    Example:
      dts compare vibe vibe-v2 --since 30d
      dts compare vibe vibe-v2 --json | jq '.rows[] | select(.differs) | .accession'
    """
    from ..compare import compare

    when = None
    if since is not None:
        try:
            when = parse_since(since)
        except ValueError as exc:
            raise UsageError(f"--since: {exc}") from None
    result = compare(ctx.station, stream_a, stream_b, when)
    if as_json:
        print_json(result.as_dict())
        return
    rows = result.as_dict()
    if is_terminal():
        _rich(rows, show_all)
    else:
        _plain(rows)


def _lines(row: dict[str, Any], show_all: bool) -> list[tuple[str, str, str, str]]:
    out = [("produced", _produced(row["a"]["produced"]), _produced(row["b"]["produced"]),
            "" if all(p["same"] for p in row["produced"]) else "≠")]
    for r in row["results"]:
        if show_all or not r["same"]:
            out.append((r["key"], _value(r["a"], r["unit"]), _value(r["b"], r["unit"]),
                        "" if r["same"] else "≠"))
    return out


def _plain(data: dict[str, Any]) -> None:
    click.echo("\t".join(["study", "accession", "what", data["stream_a"], data["stream_b"],
                          "differs"]))
    for row in data["rows"]:
        for what, a, b, mark in _lines(row, True):
            click.echo("\t".join([row["study_uid"], row["accession"] or "-", what, a, b,
                                  "yes" if mark else "no"]))


def _rich(data: dict[str, Any], show_all: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"{data['stream_a']} vs {data['stream_b']}: {data['studies']} "
                        f"studies, {data['differing']} differ", title_justify="left")
    for col in ("study", "what", data["stream_a"], data["stream_b"], ""):
        table.add_column(col)
    for row in data["rows"]:
        first = True
        for what, a, b, mark in _lines(row, show_all):
            style = "bold red" if mark else None
            table.add_row((row["accession"] or row["study_uid"]) if first else "", what, a, b,
                          mark, style=style)
            first = False
        table.add_section()
    console.print(table)
    for key, name in (("only_a", data["stream_a"]), ("only_b", data["stream_b"])):
        if data[key]:
            console.print(f"only {name}: {len(data[key])} study(ies)", style="dim")
