"""What the page's tests share: a station with a delivered and a failed exam (made
through the CLI), users of each role, and logging in as a person's browser would."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from dts.station import Station
from dts.web.users import Role, UserFile
from tests.helpers import make_study, run_dts, station_config

PASSWORDS = {"vera": "viewer-pass-1", "otto": "operator-pass-1", "ada": "admin-pass-1"}
ROLES = {"vera": Role.VIEWER, "otto": Role.OPERATOR, "ada": Role.ADMIN}


def web_config(folder: Path, *, web: dict[str, Any] | None = None, **station: Any) -> Path:
    """Two streams: ``stats`` (the example module, to a folder) for accession OK1, and
    ``broken`` (a command that fails) for BAD1."""
    web_keys = {"host": "127.0.0.1", "port": 0, **(web or {})}
    tail = "[web]\n" + "\n".join(f"{k} = {_toml(v)}" for k, v in web_keys.items())
    return station_config(
        folder, station={"ae_title": "DTS", "host": "127.0.0.1", "port": 0,
                         "stable_seconds": 1, **station},
        destinations=[{"name": "reports", "folder": str(folder / "reports")},
                      {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 9}],
        streams=[{"name": "stats", "when": "AccessionNumber == 'OK1'",
                  "command": ["{python}", "-m", "dts.examples.series_statistics", "{input}",
                              "{output}"], "timeout": "2m", "destinations": ["reports"],
                  "parameters": {"threshold": "300"}},
                 {"name": "broken", "when": "AccessionNumber == 'BAD1'",
                  "command": ["{python}", "-c",
                              "import sys; print('model exploded'); sys.exit(3)"],
                  "timeout": "1m", "destinations": ["reports"]}],
        tail=tail)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def pipeline(config: Path, folder: Path) -> None:
    for args in (("import", "--calling-ae", "PACS", str(folder)), ("classify", "--once"),
                 ("run", "--once"), ("send", "--once")):
        done = run_dts(*args, config=config)
        assert done.returncode in (0, 1), (args, done.stderr)


def two_exams(folder: Path, config: Path) -> dict[str, dict[str, Any]]:
    ok = make_study(folder / "ok", n_series=1, per_series=2, accession="OK1",
                    patient_id="PATOK77")
    bad = make_study(folder / "bad", n_series=1, per_series=2, accession="BAD1",
                     patient_id="PATBAD88")
    pipeline(config, ok["folder"])
    pipeline(config, bad["folder"])
    return {"ok": ok, "bad": bad}


def add_users(station: Station) -> None:
    users = UserFile(station.config.web.users_file)
    for name, role in ROLES.items():
        users.add(name, role, PASSWORDS[name])


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    assert m, "no CSRF token in the page"
    return m.group(1)


def login(client: Any, name: str, password: str | None = None) -> str:
    """Log in through the form (pre-session token first); the session's CSRF token."""
    page = client.get("/login")
    done = client.post("/login", data={"name": name, "password": password or PASSWORDS[name],
                                       "csrf": csrf_of(page.text), "next": "/attention"},
                       follow_redirects=False)
    assert done.status_code == 303, done.text
    return str(client.get("/api/me").json()["csrf"])
