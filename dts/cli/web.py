"""``dts web``: serve the tracking and configuration page; ``dts web user ...``: its users."""

from __future__ import annotations

import sys

import click

from ..errors import UsageError
from ..requeue import who
from ..web.users import Role, UserFile, check_name, manage
from . import StationContext, pass_ctx
from .common import json_option, print_json

ROLES = click.Choice([r.value for r in Role])


@click.group(name="web", invoke_without_command=True)
@click.option("--host", help="Address to listen on (default: [web] host, 127.0.0.1).")
@click.option("--port", type=click.IntRange(0, 65535), help="Port (default: [web] port, 8080).")
@click.pass_context
def command(click_ctx: click.Context, host: str | None, port: int | None) -> None:
    """Serve the page: overview, exams, timelines, attention, log, configuration, and
    the JSON API (/api/...) and /metrics, until SIGTERM.

    Without users (dts web user add) the page is read-only, patient IDs masked, and
    only a loopback address is allowed. `dts watch` starts it itself when
    [web] enabled = true.

    \b
    Example:
      dts web --port 8080
      dts web user add alice --role operator
      printf '%s\\n' "$PW" | dts web user add robot --role viewer --password-stdin
    """
    from ..web import server

    if click_ctx.invoked_subcommand is not None:
        return
    ctx = click_ctx.find_object(StationContext)
    assert ctx is not None
    server.serve(ctx.station, host=host, port=port,
                 on_ready=lambda url: click.echo(f"dts web: serving {url}", err=True))


@command.group(name="user")
def user() -> None:
    """Manage the page's users ([web] users_file).

    \b
    Roles: viewer (reads; patient IDs masked) · operator (also patient IDs, requeue,
    C-ECHO, rule tester) · admin (also the configuration's details).
    Example:
      dts web user add alice --role admin
      dts web user list
    """


def _password(from_stdin: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        if not line:
            raise UsageError("--password-stdin: nothing on standard input")
        return line.rstrip("\n")
    if not sys.stdin.isatty():
        raise UsageError("no terminal to ask for the password: use --password-stdin")
    return str(click.prompt("Password", hide_input=True, confirmation_prompt=True))


password_option = click.option("--password-stdin", is_flag=True,
                               help="Read the password from the first line of standard input.")


@user.command(name="add")
@click.argument("name")
@click.option("--role", required=True, type=ROLES, help="What the user may do.")
@password_option
@pass_ctx
def add(ctx: StationContext, name: str, role: str, password_stdin: bool) -> None:
    """Add user NAME with a role; the password is asked for (or read with --password-stdin).

    \b
    Example:
      dts web user add alice --role operator
    """
    check_name(name)
    manage(ctx.station, "add", name, role=Role(role), password=_password(password_stdin),
           by=who())
    click.echo(f"{name}\t{role}\tadded")


@user.command(name="passwd")
@click.argument("name")
@click.option("--role", type=ROLES, help="Change the role too.")
@password_option
@pass_ctx
def passwd(ctx: StationContext, name: str, role: str | None, password_stdin: bool) -> None:
    """Set a new password for NAME (its sessions end).

    \b
    Example:
      dts web user passwd alice
    """
    u = manage(ctx.station, "passwd", name, role=Role(role) if role else None,
               password=_password(password_stdin), by=who())
    click.echo(f"{name}\t{u.role.value if u else ''}\tpassword changed")


@user.command(name="remove")
@click.argument("name")
@pass_ctx
def remove(ctx: StationContext, name: str) -> None:
    """Remove user NAME (its sessions end).

    \b
    Example:
      dts web user remove alice
    """
    manage(ctx.station, "remove", name, by=who())
    click.echo(f"{name}\tremoved")


@user.command(name="list")
@json_option
@pass_ctx
def list_users(ctx: StationContext, as_json: bool) -> None:
    """The users and their roles (never their password hashes).

    \b
    Example:
      dts web user list --json | jq -r '.[].name'
    """
    users = UserFile(ctx.station.config.web.users_file).users()
    rows = [{"name": u.name, "role": u.role.value, "changed_at": u.changed_at}
            for u in sorted(users.values(), key=lambda u: u.name)]
    if as_json:
        print_json(rows)
        return
    for r in rows:
        click.echo(f"{r['name']}\t{r['role']}\t{r['changed_at']}")
