"""dts web without a browser: the pages and /api/ through Starlette's TestClient, on a
station whose exams were made through the CLI (one delivered, one failed); users, roles,
sessions, CSRF, throttling, masking, bad input, audit events, and the dts web commands."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from dts.journal import EventFilter, read_events
from dts.station import Station
from dts.web import app as web_app
from dts.web.app import create_app
from dts.web.security import SESSION_COOKIE
from dts.web.users import UserFile, check_password
from tests.helpers import make_study, run_dts
from tests.webhelpers import PASSWORDS, add_users, csrf_of, login, pipeline, two_exams, web_config


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A station with a delivered (OK1) and a failed (BAD1) exam, and a user of each role."""
    folder = tmp_path_factory.mktemp("web")
    config = web_config(folder)
    exams = two_exams(folder, config)
    station = Station.open(config)
    add_users(station)
    return {"config": config, "station": station, **exams}


@pytest.fixture
def client(made: dict[str, Any]) -> Iterator[TestClient]:
    with TestClient(create_app(made["station"])) as c:
        yield c


def _events(station: Station, event: str) -> list[dict[str, Any]]:
    return list(read_events(station.spool, EventFilter(event=event)))


def test_without_a_session_pages_ask_for_a_login_and_the_api_answers_401(
        client: TestClient) -> None:
    page = client.get("/exams?status=failed", follow_redirects=False)
    assert page.status_code == 303
    assert page.headers["location"] == "/login?next=%2Fexams%3Fstatus%3Dfailed"
    assert client.get("/api/exams").status_code == 401
    assert client.get("/api/exams").json()["error"] == "log in first"
    assert client.get("/login").status_code == 200


def test_a_login_sets_a_strict_httponly_cookie_and_is_audited(
        client: TestClient, made: dict[str, Any]) -> None:
    page = client.get("/login")
    done = client.post("/login", data={"name": "otto", "password": PASSWORDS["otto"],
                                       "csrf": csrf_of(page.text), "next": "/exams"},
                       follow_redirects=False)
    assert done.status_code == 303 and done.headers["location"] == "/exams"
    cookie = next(h for h in done.headers.get_list("set-cookie")
                  if h.startswith(SESSION_COOKIE + "="))
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Secure" not in cookie
    me = client.get("/api/me").json()
    assert me["user"] == "otto" and me["role"] == "operator" and me["csrf"]
    last = _events(made["station"], "login")[-1]
    assert last["stage"] == "web" and last["user"] == "otto" and last["remote"]
    # logging out ends this session for good, even if the cookie were kept
    kept = client.cookies.get(SESSION_COOKIE)
    out = client.post("/logout", data={"csrf": me["csrf"]}, follow_redirects=False)
    assert out.status_code == 303
    assert _events(made["station"], "logout")[-1]["user"] == "otto"
    client.cookies.set(SESSION_COOKIE, kept or "")
    assert client.get("/api/me").status_code == 401


def test_the_login_form_needs_its_csrf_token(client: TestClient) -> None:
    client.get("/login")
    done = client.post("/login", data={"name": "otto", "password": PASSWORDS["otto"]})
    assert done.status_code == 403


def test_a_body_without_a_length_is_refused_before_it_is_read(client: TestClient) -> None:
    """A chunked body could be gigabytes (anyone may POST /api/login): 411, unread."""
    def chunks():  # type: ignore[no-untyped-def]
        yield b'{"name": "otto", '
        yield b'"password": "x"}'

    done = client.post("/api/login", content=chunks(),
                       headers={"content-type": "application/json"})
    assert done.status_code == 411


def test_five_wrong_passwords_throttle_the_name_even_with_the_right_one(
        client: TestClient, made: dict[str, Any]) -> None:
    for _ in range(5):
        page = client.get("/login")
        bad = client.post("/login", data={"name": "ada", "password": "wrong-password",
                                          "csrf": csrf_of(page.text)})
        assert bad.status_code == 401 and "wrong name or password" in bad.text
    page = client.get("/login")
    right = client.post("/login", data={"name": "ada", "password": PASSWORDS["ada"],
                                        "csrf": csrf_of(page.text)})
    assert right.status_code == 429 and "too many failed logins" in right.text
    assert client.get("/api/me").status_code == 401
    failed = _events(made["station"], "login-failed")
    assert len([e for e in failed if e["user"] == "ada"]) >= 6
    assert failed[-1]["throttled"] is True
    # the address is throttled too: another name from it waits as well
    api = client.post("/api/login", json={"name": "otto", "password": PASSWORDS["otto"]})
    assert api.status_code == 429


def test_a_viewer_sees_masked_patient_ids_no_button_and_a_forged_post_is_403(
        client: TestClient, made: dict[str, Any]) -> None:
    csrf = login(client, "vera")
    rows = client.get("/api/exams").json()["rows"]
    assert {r["accession"] for r in rows} == {"OK1", "BAD1"}
    assert {r["patient_id"] for r in rows} == {"***"}
    html = client.get("/exams").text
    assert "PATOK77" not in html and "PATBAD88" not in html and "***" in html
    timeline = client.get(f"/api/exams/{made['bad']['study_uid']}").json()
    assert "PATBAD88" not in json.dumps(timeline)
    attention = client.get("/attention").text
    assert "BAD1" in attention and 'class="requeue"' not in attention
    job = client.get("/api/attention").json()["jobs"][0]["job"]
    forged = client.post("/attention/requeue", data={"csrf": csrf, "job": job, "to": "run"})
    assert forged.status_code == 403 and "operator" in forged.text
    assert client.post("/api/echo", json={"destination": "pacs"},
                       headers={"X-CSRF-Token": csrf}).status_code == 403
    assert "PATBAD88" not in client.get(f"/api/jobs/{job}").text
    assert "effective" not in client.get("/api/config").json()
    # nor finds an exam by a patient ID it may not see
    assert client.get("/api/exams", params={"q": "PATBAD88"}).json()["rows"] == []
    assert len(client.get("/api/exams", params={"q": "BAD1"}).json()["rows"]) == 1


def test_an_operator_sees_patient_ids_and_a_post_without_csrf_is_403(
        client: TestClient, made: dict[str, Any]) -> None:
    csrf = login(client, "otto")
    rows = client.get("/api/exams", params={"q": "BAD1"}).json()["rows"]
    assert [r["patient_id"] for r in rows] == ["PATBAD88"]
    assert len(client.get("/api/exams", params={"q": "PATBAD88"}).json()["rows"]) == 1
    assert 'class="requeue"' in client.get("/attention").text
    job = client.get("/api/attention").json()["jobs"][0]["job"]
    assert client.post("/attention/requeue", data={"job": job, "to": "run"}).status_code == 403
    assert client.post("/attention/requeue", data={"job": job, "to": "run",
                                                   "csrf": "forged"}).status_code == 403
    assert client.post("/api/requeue", json={"job": job, "to": "run"}).status_code == 403
    assert csrf  # with it, see test_requeue_from_the_page_and_409_when_it_moved
    assert "effective" not in client.get("/api/config").json()


def test_an_admin_sees_the_effective_configuration_secrets_masked(client: TestClient) -> None:
    login(client, "ada")
    data = client.get("/api/config").json()
    assert data["validation"]["valid"] is True
    assert data["effective"]["web"]["port"] == 0
    assert {d["name"] for d in data["destinations"]} == {"reports", "pacs"}
    assert data["rules"]["types"]
    assert "[station]" in client.get("/config").text


def test_timeline_shows_every_stage_and_the_view_is_audited(
        client: TestClient, made: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    login(client, "otto")
    uid = made["ok"]["study_uid"]
    page = client.get(f"/exams/{uid}")
    assert page.status_code == 200
    for stage in ("receive", "classify", "run", "send"):
        assert f"stage-{stage}" in page.text
    assert "valid: 1 DICOM object(s)" in page.text and "reports" in page.text
    assert "PATOK77" in page.text
    viewed = _events(made["station"], "timeline-viewed")[-1]
    assert viewed["study_uid"] == uid and viewed["user"] == "otto" and viewed["remote"]
    bad = client.get(f"/exams/{made['bad']['study_uid']}").text
    assert "exit-code: the processing exited with code 3" in bad
    assert "model exploded" in bad  # the log tail
    job = client.get("/api/attention").json()["jobs"][0]["job"]
    logs = client.get(f"/api/jobs/{job}").json()
    assert logs["location"] == "failed" and logs["job"]["failure"]["reason"] == "exit-code"
    assert "model exploded" in client.get(f"/jobs/{job}/logs/run-stdout.log").text
    monkeypatch.setattr(web_app, "MAX_LOG_BYTES", 9)  # a huge log: only its end is read
    tail = client.get(f"/jobs/{job}/logs/run-stdout.log").text
    assert tail.startswith("[the first ") and tail.endswith("exploded\n")
    explained = client.get(f"/api/jobs/{job.rsplit('.', 1)[0]}/explain").json()
    assert explained["outcome"] == "run: broken"


@pytest.mark.parametrize("url, status, says", [
    ("/exams/1.2.3.4.5", 404, "no study"),
    ("/exams/..%2F..%2Fetc", 404, ""),
    ("/api/exams/not-a-uid", 404, "not a UID"),
    ("/api/jobs/20261126T000000.000000Z-00000000", 404, "no job"),
    ("/api/jobs/.lock", 404, ""),
    ("/jobs/20261126T000000.000000Z-00000000/logs/..", 404, ""),
    ("/api/exams?status=bogus", 400, "status"),
    ("/api/exams?since=yesterday-ish", 400, "since"),
    ("/api/exams?page=0", 400, "page"),
    ("/api/log?stage=nowhere", 400, "stage"),
    ("/api/log?until=soon", 400, "until"),
    ("/api/log?limit=x", 400, "limit"),
    ("/exams?status=bogus", 400, "status"),
])
def test_bad_input_gets_a_clear_answer(client: TestClient, url: str, status: int,
                                       says: str) -> None:
    login(client, "vera")
    done = client.get(url)
    assert done.status_code == status, done.text
    assert says in done.text


def test_requeue_from_the_page_and_409_when_it_moved(tmp_path: Path) -> None:
    config = web_config(tmp_path)
    bad = make_study(tmp_path / "bad", n_series=1, per_series=1, accession="BAD1")
    pipeline(config, bad["folder"])
    station = Station.open(config)
    add_users(station)
    with TestClient(create_app(station)) as client:
        csrf = login(client, "otto")
        (row,) = client.get("/api/attention").json()["jobs"]
        assert row["queue"] == "failed" and row["reason"]
        form = {"csrf": csrf, "job": row["job"], "to": "run", "from": "failed"}
        done = client.post("/attention/requeue", data=form, follow_redirects=False)
        assert done.status_code == 303, done.text
        assert (station.spool.root / "run" / "new" / row["job"]).is_dir()
        again = client.post("/attention/requeue", data=form)
        assert again.status_code == 409 and "run/new" in again.text
        api = client.post("/api/requeue", json={**form, "csrf": None},
                          headers={"X-CSRF-Token": csrf})
        assert api.status_code == 409 and api.json()["location"] == "run/new"
        assert client.post("/api/requeue", json={"job": "2026-nope", "to": "run"},
                           headers={"X-CSRF-Token": csrf}).status_code == 404
        assert client.post("/api/requeue", json={"job": row["job"], "to": "done"},
                           headers={"X-CSRF-Token": csrf}).status_code == 400
    (requeued,) = _events(station, "requeued")
    assert requeued["by"] == "web:otto"
    asked = _events(station, "requeue")
    assert asked[0]["user"] == "otto" and asked[0]["stage"] == "web"
    # and the run stage takes it again
    assert run_dts("run", "--once", config=config).returncode == 1
    assert (station.spool.root / "failed" / row["job"]).is_dir()


def test_echo_and_rule_tester_for_an_operator(client: TestClient, made: dict[str, Any],
                                             tmp_path: Path) -> None:
    csrf = login(client, "otto")
    echo = client.post("/api/echo", json={"destination": "pacs"},
                       headers={"X-CSRF-Token": csrf}).json()
    assert echo["reachable"] is False and echo["reason"]
    assert _events(made["station"], "echo")[-1]["destination"] == "pacs"
    assert client.post("/api/echo", json={"destination": "reports"},
                       headers={"X-CSRF-Token": csrf}).status_code == 400
    assert client.post("/api/echo", json={"destination": "nope"},
                       headers={"X-CSRF-Token": csrf}).status_code == 404
    # a received job
    jobs = client.get("/api/exams", params={"q": "OK1"}).json()["rows"][0]["jobs"]
    tested = client.post("/api/rule-test", json={"job": min(jobs, key=len)},
                         headers={"X-CSRF-Token": csrf}).json()
    assert tested["outcome"] == "run: stats"
    # uploaded files: one study, nothing queued
    before = sorted(p.name for p in made["station"].spool.root.glob("*/new/*"))
    files = sorted(made["ok"]["folder"].rglob("*.dcm"))
    up = client.post("/config/rule-test", data={"csrf": csrf, "calling_ae": "PACS"},
                     files=[("files", (f.name, f.read_bytes(), "application/dicom"))
                            for f in files])
    assert up.status_code == 200, up.text
    assert "run: stats" in up.text and "2 uploaded file(s)" in up.text
    assert sorted(p.name for p in made["station"].spool.root.glob("*/new/*")) == before
    assert not list(made["station"].spool.tmp.glob(".ruletest-*"))
    junk = client.post("/config/rule-test", data={"csrf": csrf},
                       files=[("files", ("notes.txt", b"hello, not DICOM", "text/plain"))])
    assert junk.status_code == 400 and "notes.txt" in junk.text and "not a DICOM" in junk.text
    assert _events(made["station"], "rule-test")[-1]["user"] == "otto"


def test_an_upload_over_max_upload_mb_is_refused(tmp_path: Path) -> None:
    config = web_config(tmp_path, web={"max_upload_mb": 1})
    station = Station.open(config)
    add_users(station)
    with TestClient(create_app(station)) as client:
        csrf = login(client, "otto")
        big = client.post("/config/rule-test", data={"csrf": csrf},
                          files=[("files", ("big.dcm", b"\0" * (1024 * 1024 + 10),
                                            "application/dicom"))])
        assert big.status_code == 413 and "max_upload_mb" in big.text


def test_log_filters_and_exports(client: TestClient, made: dict[str, Any]) -> None:
    login(client, "vera")
    events = client.get("/api/log", params={"stage": "run", "status": "error"}).json()["events"]
    assert events and all(e["stage"] == "run" and e["status"] == "error" for e in events)
    times = [e["time"] for e in client.get("/api/log").json()["events"]]
    assert times == sorted(times, reverse=True)
    csv_text = client.get("/log/export.csv", params={"accession": "OK1"}).text
    lines = csv_text.strip().splitlines()
    assert lines[0].startswith("time,stage,event,status,job")
    assert len(lines) > 3 and all("BAD1" not in line for line in lines[1:])
    jsonl = client.get("/log/export.jsonl", params={"accession": "OK1"})
    assert jsonl.headers["content-type"].startswith("application/x-ndjson")
    assert all(json.loads(line)["accession"] == "OK1" for line in jsonl.text.splitlines())
    newest = times[0]
    assert client.get("/api/log", params={"after": newest}).json()["events"] == []


def test_metrics_in_prometheus_text(client: TestClient) -> None:
    done = client.get("/metrics")
    assert done.status_code == 200 and done.headers["content-type"].startswith("text/plain")
    assert "dts_studies_received_total" in done.text and "dts_jobs{" in done.text


def test_without_users_the_page_is_read_only_and_masked(tmp_path: Path) -> None:
    config = web_config(tmp_path)
    make = make_study(tmp_path / "s", n_series=1, per_series=1, accession="OK1",
                      patient_id="PATRO1")
    pipeline(config, make["folder"])
    station = Station.open(config)
    with TestClient(create_app(station)) as client:
        assert client.get("/api/me").json() == {"user": None, "role": "viewer", "csrf": None,
                                                "read_only": True}
        assert "read-only" in client.get("/").text
        rows = client.get("/api/exams").json()["rows"]
        assert [r["patient_id"] for r in rows] == ["***"]
        assert client.post("/api/echo", json={"destination": "pacs"}).status_code == 403
        assert "no users file" in client.get("/login").text


def test_security_headers_and_no_patient_name_anywhere(client: TestClient,
                                                       made: dict[str, Any]) -> None:
    login(client, "ada")
    for url in ("/", "/exams", f"/exams/{made['ok']['study_uid']}", "/log", "/config",
                "/api/exams", f"/api/exams/{made['ok']['study_uid']}", "/log/export.jsonl"):
        done = client.get(url)
        assert done.status_code == 200, url
        assert "Doe^Jane" not in done.text and "Doe" not in done.text, url
        assert "default-src 'self'" in done.headers["content-security-policy"]


def test_users_cli_add_passwd_list_remove(tmp_path: Path) -> None:
    config = web_config(tmp_path)
    add = run_dts("web", "user", "add", "alice", "--role", "operator", "--password-stdin",
                  config=config, input="a-long-password\n")
    assert add.returncode == 0, add.stderr
    station = Station.open(config)
    path = station.config.web.users_file
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    stored = json.loads(path.read_text())["users"]["alice"]
    assert stored["role"] == "operator" and stored["password"].startswith("scrypt$")
    assert "a-long-password" not in path.read_text()
    assert check_password("a-long-password", stored["password"])
    again = run_dts("web", "user", "add", "alice", "--role", "viewer", "--password-stdin",
                    config=config, input="another-password\n")
    assert again.returncode == 2 and "exists already" in again.stderr
    short = run_dts("web", "user", "add", "bob", "--role", "viewer", "--password-stdin",
                    config=config, input="short\n")
    assert short.returncode == 2 and "at least 8" in short.stderr
    notty = run_dts("web", "user", "add", "bob", "--role", "viewer", config=config, input="")
    assert notty.returncode == 2 and "--password-stdin" in notty.stderr
    pw = run_dts("web", "user", "passwd", "alice", "--role", "admin", "--password-stdin",
                 config=config, input="a-new-password\n")
    assert pw.returncode == 0, pw.stderr
    listed = json.loads(run_dts("web", "user", "list", "--json", config=config,
                                check=True).stdout)
    assert [(u["name"], u["role"]) for u in listed] == [("alice", "admin")]
    assert UserFile(path).authenticate("alice", "a-new-password") is not None
    assert run_dts("web", "user", "remove", "alice", config=config).returncode == 0
    assert run_dts("web", "user", "remove", "alice", config=config).returncode == 2
    changes = [(e["user"], e["action"]) for e in _events(station, "user-changed")]
    assert changes == [("alice", "add"), ("alice", "passwd"), ("alice", "remove")]


def test_dts_web_refuses_a_public_address_without_users(tmp_path: Path) -> None:
    config = web_config(tmp_path)
    done = run_dts("web", "--host", "0.0.0.0", config=config, timeout=30)
    assert done.returncode == 2
    assert "no users" in done.stderr and "127.0.0.1" in done.stderr


@pytest.mark.parametrize("keys, says", [
    ({"port": 70000}, "web.port"),
    ({"host": "example.org"}, "web.host"),
    ({"certificate": "/nonexistent.crt"}, "web"),
    ({"max_upload_mb": 0}, "web.max_upload_mb"),
    ({"session_hours": -1}, "web.session_hours"),
    ({"colour": "blue"}, "web.colour"),
])
def test_bad_web_keys_are_refused_naming_them(tmp_path: Path, keys: dict[str, Any],
                                              says: str) -> None:
    config = web_config(tmp_path, web=keys)
    done = run_dts("config", "check", config=config)
    assert done.returncode == 2 and says in done.stderr, done.stderr


def _web_pid(spool: Path) -> int | None:
    from dts.spool import Spool
    from dts.status import service_state

    state = service_state(Spool(spool), "web")
    return int(state["pid"]) if state.get("running") else None


def test_dts_watch_restarts_a_dead_page_and_stops_it_at_shutdown(tmp_path: Path) -> None:
    import signal

    from tests.helpers import free_port, start_dts, stop_process, wait_for, wait_port

    port = free_port()
    config = web_config(tmp_path, web={"enabled": True, "port": port})
    watch = start_dts("watch", config=config, log=tmp_path / "watch.log")
    try:
        wait_port(port, 30)
        first = wait_for(lambda: _web_pid(tmp_path / "spool"), 30, what="dts web's lock")
        os.kill(first, signal.SIGKILL)  # the page dies; dts watch must bring it back
        second = wait_for(lambda: (p := _web_pid(tmp_path / "spool")) and p != first and p,
                          30, what="a new dts web")
        wait_port(port, 30)
    finally:
        assert stop_process(watch) == 0, (tmp_path / "watch.log").read_text()[-2000:]
    assert not Path(f"/proc/{second}").exists() or \
        "zombie" in Path(f"/proc/{second}/status").read_text().lower()
    station = Station.open(config)
    (exited,) = _events(station, "web-exited")
    assert exited["stage"] == "watch" and exited["exit_code"] == -9
    assert [e["event"] for e in _events(station, "web-stopped")] == ["web-stopped"]


def test_https_with_certificate_and_private_key_and_secure_cookies(tmp_path: Path) -> None:
    """A real dts web over TLS (openssl's self-signed certificate for 127.0.0.1)."""
    import http.cookiejar
    import ssl
    import subprocess
    import urllib.request

    from tests.helpers import free_port, start_dts, stop_process, wait_port

    key, cert = tmp_path / "web.key", tmp_path / "web.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    port = free_port()
    config = web_config(tmp_path, web={"port": port, "certificate": str(cert),
                                       "private_key": str(key)})
    add_users(Station.open(config))
    proc = start_dts("web", config=config, log=tmp_path / "web.log")
    try:
        wait_port(port, 30)
        ctx = ssl.create_default_context(cafile=str(cert))
        jar = http.cookiejar.CookieJar()
        opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx),
                                             urllib.request.HTTPCookieProcessor(jar))
        base = f"https://127.0.0.1:{port}"
        with opener.open(f"{base}/login", timeout=20) as page:
            assert page.status == 200
            assert "Secure" in page.headers["set-cookie"]
        req = urllib.request.Request(f"{base}/api/login", method="POST",
                                     data=json.dumps({"name": "vera", "password":
                                                      PASSWORDS["vera"]}).encode(),
                                     headers={"Content-Type": "application/json"})
        with opener.open(req, timeout=20) as done:
            cookie = done.headers["set-cookie"]
            assert json.loads(done.read())["role"] == "viewer"
        assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
        with opener.open(f"{base}/api/me", timeout=20) as me:
            assert json.loads(me.read())["user"] == "vera"
    finally:
        assert stop_process(proc) == 0, (tmp_path / "web.log").read_text()[-2000:]


def test_the_embedded_configuration_serves_the_page_on_loopback_8080() -> None:
    """`make run` (dts watch on configuration/dts.toml) shows the page at once."""
    from dts import config as config_mod

    web = config_mod.load(config_mod.CHECKOUT_CONFIG).web
    assert (web.enabled, web.host, web.port, web.loopback) == (True, "127.0.0.1", 8080, True)
    assert "http://127.0.0.1:8080/" in (Path(config_mod.PACKAGE_ROOT) / "Makefile").read_text()


def test_dts_web_stopped_as_soon_as_it_listens_exits_cleanly(tmp_path: Path) -> None:
    """dts watch may stop a page that has only just bound its port (uvicorn installs its
    signal handlers later): SIGTERM then still ends dts web with 0 and web-stopped."""
    import signal

    from tests.helpers import free_port, start_dts, wait_port

    port = free_port()
    config = web_config(tmp_path, web={"port": port})
    for _ in range(3):
        web = start_dts("web", config=config, log=tmp_path / "web.log")
        try:
            wait_port(port, 30)
            web.send_signal(signal.SIGTERM)
            code = web.wait(20)
        finally:
            if web.poll() is None:
                web.kill()
                web.wait(5)
        assert code == 0, (tmp_path / "web.log").read_text()[-2000:]
    station = Station.open(config)
    assert len(_events(station, "web-stopped")) == 3
