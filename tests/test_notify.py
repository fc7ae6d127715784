"""Webhooks (``[[notify]]``, dts.notify, ``dts notify``) against a local HTTP server:
signature and timestamp checked, a 500 retried, a 404 given up, stuck queues, the
outbox in ``dts status``."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from dts.journal import Event, Stage, Status
from dts.notify import Notifier
from dts.spool import Queue, State, new_job_id, utcnow
from dts.station import Station
from tests.helpers import free_port, run_dts, start_dts, station_config, stop_process, wait_for

SECRET = b"hook-secret-42"


class _Hook(BaseHTTPRequestHandler):
    script: ClassVar[dict[str, list[int]]] = {}
    seen: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        type(self).seen.append({"path": self.path, "headers": dict(self.headers),
                                "body": body})
        codes = type(self).script.get(self.path, [200])
        code = codes.pop(0) if len(codes) > 1 else codes[0]
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def hook_server() -> Iterator[tuple[str, type[_Hook]]]:
    handler = type("Hook", (_Hook,), {"script": {}, "seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()


def _station(tmp_path: Path, base: str, hooks: str = "") -> tuple[Path, Station]:
    (tmp_path / "secret").write_bytes(SECRET + b"\n")
    tail = hooks or f"""
[web]
enabled = true
port = 8181
[[notify]]
url = "{base}/ok"
events = ["failed", "delivered"]
secret_file = "{tmp_path / 'secret'}"
[[notify]]
url = "{base}/flaky"
events = ["failed"]
[[notify]]
url = "{base}/gone"
events = ["delivered"]
"""
    cfg = station_config(tmp_path, tail=tail)
    station = Station.open(cfg, None)
    station.spool.ensure()
    return cfg, station


def _emit(station: Station, event: Event, study: str = "1.2.3.4") -> None:
    station.journal.emit(Stage.SEND, event, Status.OK if event == Event.SENT else Status.ERROR,
                         f"{event.value} for the test", study_uid=study, accession="ACC9",
                         stream="seg")


def _verify(seen: dict[str, Any]) -> dict[str, Any]:
    ts = seen["headers"]["X-DTS-Timestamp"]
    assert abs(time.time() - int(ts)) < 60
    want = "sha256=" + hmac.new(SECRET, ts.encode() + b"." + seen["body"],
                                hashlib.sha256).hexdigest()
    assert hmac.compare_digest(seen["headers"]["X-DTS-Signature"], want)
    return dict(json.loads(seen["body"]))


def test_webhooks_signed_retried_and_given_up(tmp_path: Path,
                                             hook_server: tuple[str, type[_Hook]]) -> None:
    base, handler = hook_server
    cfg, station = _station(tmp_path, base)
    handler.script = {"/flaky": [500, 200], "/gone": [404]}
    _emit(station, Event.SEND_FAILED)  # before the first run: history, not delivered
    first = run_dts("notify", "--once", "--json", config=cfg)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["queued"] == 0 and handler.seen == []
    _emit(station, Event.SEND_FAILED, study="1.2.3.5")
    _emit(station, Event.SENT, study="1.2.3.6")
    _emit(station, Event.STORED, study="1.2.3.7")  # no class asks for it
    done = run_dts("notify", "--once", "--json", config=cfg)
    assert done.returncode == 75, done.stderr  # the 500: tried again later
    result = json.loads(done.stdout)
    assert (result["queued"], result["delivered"], result["failed"], result["gave_up"]) == \
        (4, 2, 1, 1)
    by_path: dict[str, list[dict[str, Any]]] = {}
    for s in handler.seen:
        by_path.setdefault(s["path"], []).append(s)
    ok = [_verify(s) for s in by_path["/ok"]]
    assert [(b["event"], b["journal_event"], b["study_uid"]) for b in ok] == \
        [("failed", "send-failed", "1.2.3.5"), ("delivered", "sent", "1.2.3.6")]
    assert ok[0]["accession"] == "ACC9" and ok[0]["stream"] == "seg"
    assert ok[0]["links"]["exam"].endswith(":8181/exams/1.2.3.5")
    assert by_path["/ok"][0]["headers"]["X-DTS-Event"] == "failed"
    assert "X-DTS-Signature" not in by_path["/flaky"][0]["headers"]  # no secret_file
    # the outbox: the 500 waits with its backoff; the 404 is given up and kept
    status = json.loads(run_dts("status", "--json", config=cfg).stdout)
    assert status["notify"]["pending"] == 1 and status["notify"]["gave_up"] == 1
    assert status["notify"]["oldest_seconds"] is not None
    check = run_dts("status", "--check", "--json", config=cfg)
    assert check.returncode == 1
    assert any("given up" in r for r in json.loads(check.stdout)["attention"])
    (pending,) = [p for p in (station.spool.root / "notify").glob("*.json")
                  if p.name != "cursor.json"]
    entry = json.loads(pending.read_text())
    assert entry["attempts"] == 1 and "HTTP 500" in entry["last_error"]
    gave_up = list((station.spool.root / "notify" / "gave-up").glob("*.json"))
    assert len(gave_up) == 1 and "HTTP 404" in json.loads(gave_up[0].read_text())["last_error"]
    again = run_dts("notify", "--once", "--json", config=cfg)  # not due yet: nothing sent
    assert json.loads(again.stdout)["delivered"] == 0
    now = run_dts("notify", "--once", "--now", "--json", config=cfg)
    assert now.returncode == 0, now.stderr
    assert json.loads(now.stdout)["delivered"] == 1
    assert len(by_path["/gone"]) == 1  # a 4xx is never tried again
    flaky = [s for s in handler.seen if s["path"] == "/flaky"]
    assert len(flaky) == 2 and flaky[0]["headers"]["X-DTS-Delivery"] == \
        flaky[1]["headers"]["X-DTS-Delivery"]
    assert json.loads(run_dts("status", "--json", config=cfg).stdout)["notify"]["pending"] == 0
    names = [json.loads(line)["event"] for f in station.spool.log_dir.glob("*.jsonl")
             for line in f.read_text().splitlines()]
    assert names.count("notify-failed") == 1 and names.count("notify-gave-up") == 1
    assert names.count("notify-delivered") == 1
    # the notifier's own events are never delivered
    assert run_dts("notify", "--once", "--json", config=cfg).returncode == 0
    assert len(handler.seen) == 5  # /ok 2, /flaky 2 (500, then 200), /gone 1


def test_a_stuck_queue_is_told_once(tmp_path: Path, hook_server: tuple[str, type[_Hook]]) -> None:
    base, handler = hook_server
    _cfg, station = _station(tmp_path, base, hooks=f"""
[[notify]]
url = "{base}/stuck"
events = ["stuck"]
stuck_after = "1h"
""")
    notifier = Notifier(station)
    notifier.run_once()  # the cursor starts here
    old = new_job_id(utcnow() - timedelta(hours=2))
    (station.spool.dir(Queue.RUN, State.NEW) / old).mkdir(parents=True)
    assert notifier.run_once().delivered == 1
    assert notifier.run_once().delivered == 0  # still stuck: not said again
    (body,) = [json.loads(s["body"]) for s in handler.seen]
    assert body["event"] == "stuck" and body["queue"] == "run"
    assert body["oldest_seconds"] >= 7000 and "links" in body


def test_bad_notify_configuration_is_refused(tmp_path: Path) -> None:
    for table, needle in [('url = "http://h/x"\nevents = ["exploded"]', "notify[0].events"),
                          ('events = ["failed"]', "notify[0].url"),
                          ('url = "mailto:x@y"', "notify[0].url"),
                          ('url = "http://h/x"\nsecret_file = "/nonexistent"',
                           "notify[0].secret_file"),
                          ('url = "http://h/x"\ncolour = "red"', "notify[0].colour")]:
        cfg = station_config(tmp_path, tail=f"[[notify]]\n{table}\n")
        done = run_dts("config", "check", config=cfg)
        assert done.returncode == 2 and needle in done.stderr, (table, done.stderr)
    cfg = station_config(tmp_path)
    done = run_dts("notify", "--once", config=cfg)
    assert done.returncode == 2 and "[[notify]]" in done.stderr


def test_dts_watch_delivers_webhooks(tmp_path: Path,
                                     hook_server: tuple[str, type[_Hook]]) -> None:
    base, handler = hook_server
    port = free_port()
    cfg = station_config(tmp_path, station={"port": port}, tail=f"""
[[notify]]
url = "{base}/watch"
events = ["failed"]
""")
    station = Station.open(cfg, None)
    proc = start_dts("watch", config=cfg, log=tmp_path / "watch.log")
    try:
        cursor = station.spool.root / "notify" / "cursor.json"
        wait_for(cursor.exists, 30, what="the notifier's first round")
        _emit(station, Event.FAILED, study="1.2.3.8")
        wait_for(lambda: handler.seen, 30, what="the webhook")
        assert json.loads(handler.seen[0]["body"])["study_uid"] == "1.2.3.8"
    finally:
        assert stop_process(proc) == 0, (tmp_path / "watch.log").read_text()
