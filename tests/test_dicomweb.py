"""DICOMweb both ways: STOW-RS destinations (Orthanc's DICOMweb plugin, dts web itself,
a local HTTP server for the faults Orthanc cannot produce) and STOW-RS into dts web
(Orthanc's DICOMweb client and dicomweb-client as senders; every bad input)."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import generate_uid

from dts import carriers, receiver
from dts.spool import Job, Queue, Spool, State
from dts.station import Station
from dts.stow import Stow
from dts.web import actions
from dts.web.users import Role, UserFile
from tests.helpers import (
    STORESCU,
    free_port,
    make_instance,
    make_study,
    run_dts,
    start_dts,
    station_config,
    stop_process,
    wait_for,
    wait_port,
)
from tests.plugins.peers import Orthanc
from tests.test_send import events, job_data, queue_send_job, where

DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
CT = "1.2.840.10008.5.1.4.1.1.2"
TOKEN = "stow-token-0123456789"
BOUNDARY = "dts-test-boundary"
MULTIPART = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


def _orthanc_web(orthanc_factory: Callable[..., Orthanc], tmp_path: Path,
                 servers: dict[str, Any] | None = None) -> Orthanc:
    lua = tmp_path / "refuse.lua"
    # Orthanc refuses (for any origin, STOW-RS included) instances described REFUSE
    lua.write_text('function ReceivedInstanceFilter(dicom, origin, info)\n'
                   '  return dicom.SeriesDescription ~= "REFUSE"\nend\n')
    web: dict[str, Any] = {"Enable": True, "Root": "/dicom-web/"}
    if servers:
        web["Servers"] = servers
    return orthanc_factory(config={"Plugins": [DICOMWEB_PLUGIN], "DicomWeb": web,
                                   "LuaScripts": [str(lua)]})


def _send_config(tmp_path: Path, dest: str, *, retries: int = 2) -> Path:
    return station_config(
        tmp_path, station={"send_retries": retries, "send_backoff": "60s"},
        tail=f"""{dest}
[[stream]]
name = "seg"
command = ["true"]
destinations = ["web"]
""")


def _url_destination(url: str, extra: str = "") -> str:
    return f'[[destination]]\nname = "web"\nurl = "{url}"\ntimeout = "10s"\n{extra}\n'


# -- a local HTTP server for faults (5xx, 4xx, 409 with a body) ------------------------------

class _Fault(BaseHTTPRequestHandler):
    answers: ClassVar[list[tuple[int, bytes]]] = []
    seen: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if not length and self.headers.get("Transfer-Encoding") == "chunked":
            while True:
                size = int(self.rfile.readline().strip(), 16)
                body += self.rfile.read(size + 2)[:size]
                if size == 0:
                    break
        type(self).seen.append({"path": self.path, "headers": dict(self.headers),
                                "body": body})
        status, payload = type(self).answers.pop(0) if type(self).answers else (200, b"")
        self.send_response(status)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def fault_server() -> Iterator[tuple[str, type[_Fault]]]:
    handler = type("Fault", (_Fault,), {"answers": [], "seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/dicom-web", handler
    server.shutdown()
    server.server_close()


# -- STOW-RS destination -------------------------------------------------------------------

def test_results_reach_orthanc_by_stow_and_its_echo_is_qido(
        tmp_path: Path, orthanc_factory: Callable[..., Orthanc]) -> None:
    orthanc = _orthanc_web(orthanc_factory, tmp_path)
    cfg = _send_config(tmp_path, _url_destination(f"{orthanc.url}/dicom-web"))
    spool = Spool(tmp_path / "spool")
    job_id, uids, _ = queue_send_job(spool, n=3)
    done = run_dts("send", "--once", config=cfg)
    assert done.returncode == 0, done.stderr
    assert where(spool, job_id) == "done"
    assert orthanc.sop_uids() == set(uids)
    study = job_data(spool, job_id)["study_uid"]
    found = requests.get(f"{orthanc.url}/dicom-web/studies/{study}/instances",
                         headers={"Accept": "application/dicom+json"}, timeout=10).json()
    assert {i["00080018"]["Value"][0] for i in found} == set(uids)  # visible by QIDO-RS
    state = job_data(spool, job_id)["destinations"]["web"]
    assert state["status"] == "done" and sorted(state["sent"]) == sorted(uids)
    stored = [e for e in events(spool, job_id) if e["event"] == "stored"]
    assert "STOW-RS" in stored[0]["message"]
    echo = run_dts("echo", "web", "--json", config=cfg)
    assert echo.returncode == 0, echo.stderr
    assert json.loads(echo.stdout)["reachable"] is True
    page = actions.echo_destination(Station.open(cfg, None), "web")  # the page's button
    assert page["reachable"] is True and page["url"] == f"{orthanc.url}/dicom-web"


def test_a_part_the_stow_server_refuses_fails_exactly_that_instance(
        tmp_path: Path, web_station: WebStation) -> None:
    """dts web as the STOW-RS server (a token, then a user and password): one result
    with an invalid Study Instance UID is refused, the others are stored."""
    # Orthanc 1.10's plugin answers success for an instance its own filter dropped, so
    # the refusing server here is dts web itself (a real STOW-RS server as well)
    (tmp_path / "token").write_text(TOKEN + "\n")
    (tmp_path / "password").write_text("operator-password\n")
    for n, auth in enumerate([f'auth = {{ bearer_token_file = "{tmp_path / "token"}" }}',
                              (f'auth = {{ username = "op", password_file = '
                               f'"{tmp_path / "password"}" }}')]):
        folder = tmp_path / f"sender{n}"
        folder.mkdir()
        cfg = _send_config(folder, _url_destination(web_station.url, auth))
        spool = Spool(folder / "spool")
        job_id, uids, _ = queue_send_job(spool, n=3)
        refused = uids[1]
        job = Job(spool.find(job_id)[1])
        path = next(job.output_dir.rglob(f"{refused}.dcm"))
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = "1.2.3.x"
        ds.save_as(path)
        done = run_dts("send", "--once", config=cfg)
        assert done.returncode == 1, done.stderr
        assert where(spool, job_id) == "failed"
        state = job_data(spool, job_id)["destinations"]["web"]
        assert state["failed"] == {refused: "FailureReason 0xC000 (cannot understand)"}
        assert sorted(state["sent"]) == sorted(set(uids) - {refused})
        failed = [e for e in events(spool, job_id) if e["event"] == "store-failed"]
        assert len(failed) == 1 and failed[0]["sop_uid"] == refused
        (received,) = web_station.jobs(n + 1)[n:]
        assert {p.stem for p in received.input_dir.rglob("*.dcm")} == set(uids) - {refused}
    echo = run_dts("echo", "web", config=cfg)  # dts web serves no QIDO-RS: named, 75
    assert echo.returncode == 75 and "HTTP 405" in echo.stderr, echo.stderr


def test_5xx_and_no_connection_are_temporary_4xx_is_named_and_final(
        tmp_path: Path, fault_server: tuple[str, type[_Fault]]) -> None:
    url, handler = fault_server
    spool = Spool(tmp_path / "spool")
    cfg = _send_config(tmp_path, _url_destination(url))
    job_id, uids, _ = queue_send_job(spool, n=2)
    handler.answers = [(503, b"")]
    done = run_dts("send", "--once", job_id, config=cfg)
    assert done.returncode == 75, done.stderr
    assert where(spool, job_id) == "send/new"
    state = job_data(spool, job_id)["destinations"]["web"]
    assert state["status"] == "retry" and "HTTP 503" in state["error"]
    assert state["sent"] == [] and state["failed"] == {}
    seen = handler.seen[0]
    assert seen["path"].endswith("/studies/" + job_data(spool, job_id)["study_uid"])
    assert seen["headers"]["Content-Type"].startswith("multipart/related")
    handler.answers = [(403, b"")]
    done = run_dts("send", "--once", job_id, config=cfg)
    assert done.returncode == 1, done.stderr
    data = job_data(spool, job_id)
    assert where(spool, job_id) == "failed"
    assert "HTTP 403" in data["error"] and set(data["destinations"]["web"]["failed"]) == set(uids)
    # nothing listening: temporary
    (tmp_path / "x").mkdir()
    cfg2 = _send_config(tmp_path / "x", _url_destination(f"http://127.0.0.1:{free_port()}/dw"))
    spool2 = Spool(tmp_path / "x" / "spool")
    job2, _, _ = queue_send_job(spool2, n=1)
    assert run_dts("send", "--once", config=cfg2).returncode == 75
    assert "unreachable" in job_data(spool2, job2)["destinations"]["web"]["error"]
    assert run_dts("echo", "web", config=cfg2).returncode == 75


def test_409_fails_the_instances_its_body_names(
        tmp_path: Path, fault_server: tuple[str, type[_Fault]]) -> None:
    url, handler = fault_server
    spool = Spool(tmp_path / "spool")
    cfg = _send_config(tmp_path, _url_destination(url))
    job_id, uids, _ = queue_send_job(spool, n=2)
    body = {"00081198": {"vr": "SQ", "Value": [
        {"00081150": {"vr": "UI", "Value": [CT]}, "00081155": {"vr": "UI", "Value": [u]},
         "00081197": {"vr": "US", "Value": [0xA700]}} for u in uids]}}
    handler.answers = [(409, json.dumps(body).encode())]
    done = run_dts("send", "--once", config=cfg)
    assert done.returncode == 1, done.stderr
    failed = job_data(spool, job_id)["destinations"]["web"]["failed"]
    assert failed == {u: "FailureReason 0xA700 (out of resources)" for u in uids}


def test_config_refuses_mixed_and_incomplete_url_destinations(tmp_path: Path) -> None:
    for dest, needle in [
        ('url = "ftp://x/y"', "destination.web.url"),
        ('url = "https://a/dw"\nae_title = "X"\nhost = "h"\nport = 104', "destination.web"),
        ('url = "https://a/dw"\nauth = { username = "u" }', "destination.web.auth"),
        ('url = "https://a/dw"\nauth = { bearer_token_file = "/nonexistent" }',
         "destination.web.auth.bearer_token_file"),
        ('ae_title = "X"\nhost = "h"\nport = 104\ntimeout = 5', "destination.web.timeout"),
        ('url = "https://user:pw@a/dw"', "destination.web.url"),
    ]:
        cfg = station_config(tmp_path, tail=f'[[destination]]\nname = "web"\n{dest}\n')
        done = run_dts("config", "check", config=cfg)
        assert done.returncode == 2, (dest, done.stdout, done.stderr)
        assert needle in done.stderr, (dest, done.stderr)


# -- STOW-RS into dts web --------------------------------------------------------------------

class WebStation:
    def __init__(self, tmp_path: Path, *, stable: float = 0.5, max_mb: int = 50,
                 name: str = "st") -> None:
        self.folder = tmp_path / name
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "token").write_text(TOKEN + "\n")
        self.port = free_port()
        self.config = station_config(
            self.folder, station={"ae_title": "DTS", "stable_seconds": stable},
            tail=f"""[web]
port = {self.port}
[stow]
enabled = true
token_file = "{self.folder / 'token'}"
source = "STOWSRC"
max_upload_mb = {max_mb}
""")
        self.station = Station.open(self.config, None)
        self.spool = self.station.spool
        users = UserFile(self.station.config.web.users_file)
        users.add("op", Role.OPERATOR, "operator-password")
        users.add("vi", Role.VIEWER, "viewer-password")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/dicom-web"

    def start(self) -> None:
        self.proc = start_dts("web", config=self.config, log=self.folder / "web.log")

        def up() -> bool:
            assert self.proc is not None and self.proc.poll() is None, \
                (self.folder / "web.log").read_text()
            try:
                return requests.get(f"http://127.0.0.1:{self.port}/api/me", timeout=1) \
                    .status_code in (200, 401)
            except requests.RequestException:
                return False
        wait_for(up, 30, what="dts web")

    def jobs(self, n: int) -> list[Job]:
        wait_for(lambda: len(self.spool.list(Queue.CLASSIFY, State.NEW)) >= n, 30,
                 what=f"{n} jobs in classify/new")
        return [Job(self.spool.dir(Queue.CLASSIFY, State.NEW) / j)
                for j in self.spool.list(Queue.CLASSIFY, State.NEW)]

    def post(self, body: bytes, *, path: str = "/studies", content_type: str = MULTIPART,
             auth: str | None = f"Bearer {TOKEN}", **kw: Any) -> requests.Response:
        headers = {"Content-Type": content_type, **kw.pop("headers", {})}
        if auth:
            headers["Authorization"] = auth
        return requests.post(self.url + path, data=body, headers=headers, timeout=30, **kw)


@pytest.fixture
def web_station(tmp_path: Path) -> Iterator[WebStation]:
    started: list[WebStation] = []
    ws = WebStation(tmp_path)
    started.append(ws)
    ws.start()
    yield ws
    for w in started:
        if w.proc is not None:
            stop_process(w.proc)


def multipart(parts: list[bytes], part_type: str = "application/dicom") -> bytes:
    out = b""
    for p in parts:
        out += (f"--{BOUNDARY}\r\nContent-Type: {part_type}\r\n\r\n").encode() + p + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


def _files(study: dict[str, Any]) -> list[Path]:
    return sorted(study["folder"].rglob("*.dcm"))


def _response_uids(rsp: requests.Response, tag: str) -> dict[str, Any]:
    items = rsp.json().get(tag, {}).get("Value", [])
    return {(i.get("00081155") or {}).get("Value", [None])[0]:
            (i.get("00081197") or {}).get("Value", [None])[0] for i in items}


def test_orthanc_sends_a_study_into_dts_by_stow(tmp_path: Path, web_station: WebStation,
                                                orthanc_factory: Callable[..., Orthanc]) -> None:
    orthanc = _orthanc_web(orthanc_factory, tmp_path, servers={
        "dts": {"Url": web_station.url + "/", "Username": "op",
                "Password": "operator-password"}})
    study = make_study(tmp_path / "exam", n_series=2, per_series=3, accession="ACCW1")
    for f in _files(study):
        req = requests.post(f"{orthanc.url}/instances", data=f.read_bytes(), timeout=10)
        assert req.status_code == 200, req.text
    (oid,) = orthanc.get("/studies")
    out = requests.post(f"{orthanc.url}/dicom-web/servers/dts/stow",
                        json={"Resources": [oid]}, timeout=60)
    assert out.status_code == 200, out.text
    (job,) = web_station.jobs(1)
    data = job.read()
    assert data["study_uid"] == study["study_uid"] and data["instances"] == 6
    assert (data["calling_ae"], data["called_ae"], data["peer"]) == ("STOWSRC", "DTS",
                                                                     "127.0.0.1")
    assert data["source"] == "stow" and data["accession"] == "ACCW1"
    got = {p.stem for p in job.input_dir.rglob("*.dcm")}
    assert got == {f.stem for f in _files(study)}
    received = [e for e in job.events() if e["event"] == "received"]
    assert len(received) == 1
    assert not list(web_station.spool.incoming.iterdir())
    assert not [p for p in web_station.spool.tmp.iterdir() if p.name != ".run"]


def test_dicomweb_client_stores_into_dts(tmp_path: Path, web_station: WebStation) -> None:
    study = make_study(tmp_path / "exam", n_series=1, per_series=4)
    client = DICOMwebClient(web_station.url, headers={"Authorization": f"Bearer {TOKEN}"})
    result = client.store_instances([pydicom.dcmread(f) for f in _files(study)])
    referenced = {str(i.ReferencedSOPInstanceUID) for i in result.ReferencedSOPSequence}
    assert referenced == {f.stem for f in _files(study)}
    assert {str(i.ReferencedSOPClassUID) for i in result.ReferencedSOPSequence} == {CT}
    (job,) = web_station.jobs(1)
    assert job.read()["instances"] == 4
    # the same again (a sender that retries): a new job, and the copy counted as such
    client.store_instances([pydicom.dcmread(f) for f in _files(study)][:2])
    assert len(web_station.jobs(2)) == 2


def test_bad_stow_requests_get_their_status_and_leave_nothing(
        tmp_path: Path, web_station: WebStation) -> None:
    ws = web_station
    study = make_study(tmp_path / "exam", n_series=1, per_series=2)
    good = [f.read_bytes() for f in _files(study)]
    body = multipart(good)
    # login: none, wrong token, wrong password, a viewer, a session cookie only
    assert ws.post(body, auth=None).status_code == 401
    rsp = ws.post(body, auth="Bearer wrong")
    assert rsp.status_code == 401 and "Basic" in rsp.headers["WWW-Authenticate"]
    bad_basic = base64.b64encode(b"op:wrong-password").decode()
    assert ws.post(body, auth=f"Basic {bad_basic}").status_code == 401
    viewer = base64.b64encode(b"vi:viewer-password").decode()
    assert ws.post(body, auth=f"Basic {viewer}").status_code == 403
    login = requests.post(f"http://127.0.0.1:{ws.port}/api/login",
                          json={"name": "op", "password": "operator-password"}, timeout=10)
    assert login.status_code == 200, login.text
    assert ws.post(body, auth=None, cookies=login.cookies).status_code == 401
    # the content type
    assert ws.post(body, content_type="application/dicom").status_code == 415
    assert ws.post(body, content_type=f'multipart/related; type="application/dicom+json"; '
                                      f'boundary={BOUNDARY}').status_code == 415
    assert ws.post(body, content_type="multipart/related; type=\"application/dicom\"") \
        .status_code == 400
    # malformed: cut short, no closing boundary, no parts
    assert ws.post(body[:len(body) // 2]).status_code == 400
    assert ws.post(f"--{BOUNDARY}--\r\n".encode()).status_code == 400
    # a study UID in the path that is no UID
    assert ws.post(body, path="/studies/1.2.abc").status_code == 404
    # every part refused: 409, the failure reason per part
    not_dicom = b"\0" * 200 + b"this is not DICOM"
    bad_uid = tmp_path / "bad.dcm"
    make_instance(bad_uid, study_uid="1.2.3.x", series_uid=generate_uid())
    rsp = ws.post(multipart([not_dicom, bad_uid.read_bytes()]))
    assert rsp.status_code == 409, rsp.text
    failed = rsp.json()["00081198"]["Value"]
    assert [f["00081197"]["Value"][0] for f in failed] == [0xC000, 0xC000]
    # a part that is not application/dicom, beside a good one: 202
    rsp = ws.post(multipart([good[0]]) .replace(f"--{BOUNDARY}--".encode(),
                  f"--{BOUNDARY}\r\nContent-Type: text/plain\r\n\r\nhello\r\n--{BOUNDARY}--"
                  .encode()))
    assert rsp.status_code == 202, rsp.text
    assert list(_response_uids(rsp, "00081199")) == [_files(study)[0].stem]
    # the study in the path is not the parts' study: 0xA900
    other = generate_uid()
    rsp = ws.post(multipart([good[1]]), path=f"/studies/{other}")
    assert rsp.status_code == 409
    assert list(_response_uids(rsp, "00081198").values()) == [0xA900]
    refusals = [json.loads(line) for f in ws.spool.log_dir.glob("*.jsonl")
                for line in f.read_text().splitlines()]
    assert sum(1 for e in refusals if e["event"] == "stow-refused") >= 10
    assert sum(1 for e in refusals if e["event"] == "instance-refused") >= 3
    # only the one good part of the 202 request was kept
    (job,) = ws.jobs(1)
    assert {p.stem for p in job.input_dir.rglob("*.dcm")} == {_files(study)[0].stem}
    wait_for(lambda: not list(ws.spool.incoming.iterdir()), 10, what="incoming/ empty")
    assert not [p for p in ws.spool.tmp.iterdir() if p.name != ".run"]


def test_a_body_over_max_upload_mb_is_413_and_nothing_is_kept(tmp_path: Path) -> None:
    ws = WebStation(tmp_path, max_mb=1)
    ws.start()
    try:
        big = tmp_path / "big.dcm"
        make_instance(big, study_uid=generate_uid(), series_uid=generate_uid(), rows=1024,
                      cols=600)
        study = make_study(tmp_path / "exam", n_series=1, per_series=1)
        body = multipart([_files(study)[0].read_bytes(), big.read_bytes()])
        assert len(body) > 1 << 20
        assert ws.post(body).status_code == 413
        # chunked (no Content-Length): counted as it streams
        rsp = ws.post(iter([body[i:i + 65536] for i in range(0, len(body), 65536)]))
        assert rsp.status_code == 413
        assert not list(ws.spool.incoming.iterdir())
        assert not [p for p in ws.spool.tmp.iterdir() if p.name != ".run"]
    finally:
        assert ws.proc is not None
        stop_process(ws.proc)


@pytest.mark.slow
def test_a_study_dts_web_was_killed_holding_is_published_once_after_restart(
        tmp_path: Path) -> None:
    ws = WebStation(tmp_path, stable=3.0)
    ws.start()
    study = make_study(tmp_path / "exam", n_series=1, per_series=3)
    assert ws.post(multipart([f.read_bytes() for f in _files(study)])).status_code == 200
    assert ws.proc is not None
    ws.proc.send_signal(signal.SIGKILL)
    ws.proc.wait(10)
    assert [p.name for p in ws.spool.incoming.iterdir()] == [study["study_uid"]]
    ws.start()
    try:
        (job,) = ws.jobs(1)
        assert job.read()["instances"] == 3
        assert not list(ws.spool.incoming.iterdir())
    finally:
        stop_process(ws.proc)
    assert len(ws.spool.list(Queue.CLASSIFY, State.NEW)) == 1


# -- the gate: exactly once, never while carried, across processes and kill -9 -------------

CARRIER = """
import sys, time
from dts import carriers
from dts.spool import Spool
c = carriers.carry(Spool(sys.argv[1]), sys.argv[2])
print("carrying", flush=True)
time.sleep(120)
"""


def test_a_carried_study_waits_and_is_published_once_by_either_publisher(
        tmp_path: Path) -> None:
    cfg = station_config(tmp_path, station={"stable_seconds": 0},
                         tail=f'[stow]\nenabled = true\ntoken_file = "{tmp_path}/t"\n')
    (tmp_path / "t").write_text("x")
    station = Station.open(cfg, None)
    spool = station.spool.ensure()
    study = make_study(tmp_path / "src", n_series=1, per_series=2)
    uid = study["study_uid"]
    dest = spool.incoming / uid
    os.rename(study["folder"], dest)
    (dest / receiver.STUDY_META).write_text(json.dumps({"source": "stow", "peer": "1.2.3.4",
                                                        "calling_ae": "STOW"}))
    proc = subprocess.Popen([sys.executable, "-c", CARRIER, str(spool.root), uid],
                            stdout=subprocess.PIPE, cwd=Path(__file__).resolve().parent.parent)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"carrying"
        rx = receiver.Receiver(station)
        rx.recover()  # adopts it
        stow = Stow(station)
        stow.recover()  # adopts it too
        assert rx.pending() == [uid] and stow.pending() == [uid]
        assert rx.publish_stable(force=True) == []
        assert stow.publish_quiet(force=True) == []
        assert receiver.publish_study(station, uid, stable_seconds=0, force=True) \
            == receiver.BUSY
        assert dest.is_dir()
    finally:
        proc.send_signal(signal.SIGKILL)  # the kernel lets go of its lock
        proc.wait(10)
    published = stow.publish_quiet(force=True) + rx.publish_stable(force=True)
    assert len(published) == 1
    assert spool.list(Queue.CLASSIFY, State.NEW) == published
    assert not dest.exists() and not carriers.gate_path(spool, uid).exists()
    assert stow.pending() == [] and rx.pending() == []


@pytest.mark.slow
def test_a_study_sent_by_c_store_and_by_stow_at_once_is_one_job(tmp_path: Path) -> None:
    """dts receive and dts web, two processes, one study: one series by storescu, one by
    STOW-RS, while both are in flight; one job holds both, published once."""
    ws = WebStation(tmp_path, stable=4.0)
    rx_port = free_port()
    text = ws.config.read_text().replace("[station]\n", f"[station]\nport = {rx_port}\n", 1)
    ws.config.write_text(text)
    ws.start()
    receive = start_dts("receive", config=ws.config, log=tmp_path / "receive.log")
    try:
        wait_port(rx_port, 30)
        study = make_study(tmp_path / "exam", n_series=2, per_series=3)
        by_dicom, by_stow = sorted(study["folder"].iterdir())
        sent = subprocess.run([STORESCU, "-aet", "PACS", "-aec", "DTS", "+sd", "+r",
                               "127.0.0.1", str(rx_port), str(by_dicom)],
                              capture_output=True, timeout=60, check=False)
        assert sent.returncode == 0, sent.stderr
        rsp = ws.post(multipart([f.read_bytes() for f in sorted(by_stow.iterdir())]))
        assert rsp.status_code == 200, rsp.text
        (job,) = ws.jobs(1)
        data = job.read()
        assert data["instances"] == 6 and len(data["series"]) == 2
        assert {s["calling_ae"] for s in data["sources"]} == {"PACS", "STOWSRC"}
        wait_for(lambda: not list(ws.spool.incoming.iterdir()), 10, what="incoming/ empty")
    finally:
        stop_process(receive)
        assert ws.proc is not None
        stop_process(ws.proc)
    assert len(ws.spool.list(Queue.CLASSIFY, State.NEW)) == 1

