"""``dts receive`` against real DICOM senders (dcmtk storescu/echoscu, pynetdicom SCU)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from dts import receiver as receiver_mod
from dts.dicom import ae as dicom_ae
from dts.spool import Job, Queue, State
from dts.station import Station
from tests.helpers import (
    ECHOSCU,
    REPO,
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

RULES = REPO / "configuration" / "classifyRules.json"


@dataclass
class RunningReceiver:
    proc: subprocess.Popen[bytes]
    port: int
    config: Path
    spool: Path
    log: Path

    def jobs(self) -> list[Job]:
        folder = self.spool / "classify" / "new"
        return [Job(folder / n) for n in sorted(os.listdir(folder))] if folder.is_dir() else []

    def wait_jobs(self, n: int, timeout: float = 20) -> list[Job]:
        return wait_for(lambda: len(self.jobs()) >= n and self.jobs(), timeout,
                        what=f"{n} published job(s)")

    def events(self, event: str | None = None) -> list[dict[str, Any]]:
        out = []
        for f in sorted((self.spool / "log").glob("*.jsonl")):
            for line in f.read_text().splitlines():
                rec = json.loads(line)
                if event is None or rec["event"] == event:
                    out.append(rec)
        return out

    def storescu(self, *paths: Path, aet: str = "PACS", aec: str = "DTS",
                 extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
        return subprocess.run([STORESCU, "-aet", aet, "-aec", aec, *extra, "+sd", "+r",
                               "127.0.0.1", str(self.port), *map(str, paths)],
                              capture_output=True, text=True, timeout=60, check=False)


def write_station_config(tmp_path: Path, port: int, extra: str = "", station: str = "") -> Path:
    """A station of the test's own; ``station`` adds or overrides [station] keys."""
    return station_config(tmp_path, station={"ae_title": "DTS", "host": "127.0.0.1",
                                             "port": port, "stable_seconds": 1},
                          station_text=station, tail=extra)


@pytest.fixture
def start_receiver(tmp_path: Path) -> Iterator[Callable[..., RunningReceiver]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(station: str = "", extra: str = "", port: int | None = None) -> RunningReceiver:
        port = port or free_port()
        config = write_station_config(tmp_path, port, extra, station)
        log = tmp_path / f"receiver-{len(procs)}.log"
        proc = start_dts("receive", config=config, log=log)
        procs.append(proc)
        wait_for(lambda: proc.poll() is not None or _listening(port), 30,
                 what="receiver listening")
        assert proc.poll() is None, log.read_text()
        return RunningReceiver(proc, port, config, tmp_path / "spool", log)

    yield start
    for proc in procs:
        stop_process(proc)


def _listening(port: int) -> bool:
    try:
        wait_port(port, timeout=0.1)
        return True
    except AssertionError:
        return False


def _scu(port: int, aet: str = "PACS", aec: str = "DTS") -> Any:
    ae = AE(ae_title=aet)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title=aec)
    assert assoc.is_established
    assert dicom_ae.park_reactor(assoc)  # see its docstring: pynetdicom's own race
    return assoc


def _dataset_bytes(path: Path) -> bytes:
    """The data set of a DICOM file without preamble and file meta information."""
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM"
    assert raw[132:136] == b"\x02\x00\x00\x00"  # (0002,0000) group length
    group_len = int.from_bytes(raw[140:144], "little")
    return raw[144 + group_len:]


def _input_sops(job: Job) -> dict[str, set[str]]:
    return {d.name: {f.name[:-4] for f in d.iterdir()} for d in job.input_dir.iterdir()}


# ---------------------------------------------------------------------------------------

@pytest.mark.peers
def test_multi_series_study_becomes_one_job(start_receiver: Any, tmp_path: Path) -> None:
    rx = start_receiver()
    status = json.loads(run_dts("status", "--json", config=rx.config).stdout)
    assert status["receiver"]["running"] is True
    study = make_study(tmp_path / "exam", n_series=3, per_series=4, accession="ACC42",
                       patient_id="PID42")
    done = rx.storescu(study["folder"])
    assert done.returncode == 0, done.stderr
    (job,) = rx.wait_jobs(1)
    data = job.read()
    for key in ("id", "study_uid", "patient_id", "accession", "calling_ae", "called_ae", "peer",
                "received_at", "instances", "stream", "attempts", "error"):
        assert key in data, key
    assert data["id"] == job.id
    assert data["study_uid"] == study["study_uid"]
    assert (data["patient_id"], data["accession"]) == ("PID42", "ACC42")
    assert (data["calling_ae"], data["called_ae"], data["peer"]) == ("PACS", "DTS", "127.0.0.1")
    assert data["instances"] == 12
    assert (data["stream"], data["attempts"], data["error"]) == (None, 0, None)
    assert _input_sops(job) == {k: set(v) for k, v in study["series"].items()}
    # one `received` event per study, in the job and in the station journal, no names
    events = [e for e in job.events() if e["event"] == "received"]
    assert len(events) == 1 and events[0]["stage"] == "receive"
    assert len(rx.events("received")) == 1
    assert "Doe" not in (rx.spool / "log").joinpath(os.listdir(rx.spool / "log")[0]).read_text()
    assert not list((rx.spool / "incoming").iterdir())
    assert not [p for p in (rx.spool / "tmp").iterdir() if p.name != ".run"]
    assert stop_process(rx.proc) == 0
    status = json.loads(run_dts("status", "--json", config=rx.config).stdout)
    assert status["receiver"]["running"] is False


@pytest.mark.peers
def test_open_association_and_interleaved_studies(start_receiver: Any, tmp_path: Path) -> None:
    rx = start_receiver()
    a = make_study(tmp_path / "a", n_series=2, per_series=2)
    b = make_study(tmp_path / "b", n_series=1, per_series=3)
    held = make_instance(tmp_path / "held" / "x.dcm", study_uid=a["study_uid"],
                         series_uid=generate_uid(), instance_number=9)
    late = make_instance(tmp_path / "held" / "y.dcm", study_uid=a["study_uid"],
                         series_uid=pydicom.dcmread(held).SeriesInstanceUID, instance_number=10)
    assoc = _scu(rx.port)
    try:
        assert assoc.send_c_store(held).Status == 0
        # study a's first series and b interleaved on a second association, a's second
        # series on a third
        a1, a2 = list(a["series"])
        mixed = tmp_path / "mixed"
        mixed.mkdir()
        for i, f in enumerate(sorted((a["folder"] / a1).iterdir())):
            shutil.copy(f, mixed / f"{i}a.dcm")
        for i, f in enumerate(sorted(next((b["folder"]).iterdir()).iterdir())):
            shutil.copy(f, mixed / f"{i}b.dcm")
        assert rx.storescu(mixed).returncode == 0
        assert rx.storescu(a["folder"] / a2).returncode == 0
        quiet_from = time.monotonic()
        (job_b,) = rx.wait_jobs(1)
        assert job_b.read()["study_uid"] == b["study_uid"]
        # a is still carried by the open association: not published, however quiet.
        # (A deliberate negative check: three times stable_seconds of quiet.)
        wait_for(lambda: time.monotonic() - quiet_from > 3, 10, what="quiet time")
        assert len(rx.jobs()) == 1
        assert assoc.send_c_store(late).Status == 0
    finally:
        assoc.release()
    jobs = rx.wait_jobs(2)
    job_a = next(j for j in jobs if j.read()["study_uid"] == a["study_uid"])
    assert job_a.read()["instances"] == 6
    sops = _input_sops(job_a)
    assert sops[a1] == set(a["series"][a1]) and sops[a2] == set(a["series"][a2])
    assert len(sops) == 3
    assert len(rx.jobs()) == 2


@pytest.mark.parametrize("field,value", [
    ("StudyInstanceUID", "../../etc/x"),
    ("SeriesInstanceUID", "1.2;touch /tmp/p"),
    ("StudyInstanceUID", "1." + "2" * 70),
    ("SeriesInstanceUID", None),
])
def test_invalid_uids_are_refused(start_receiver: Any, tmp_path: Path, field: str,
                                  value: str | None) -> None:
    rx = start_receiver()
    path = make_instance(tmp_path / "bad.dcm", study_uid=generate_uid(), series_uid=generate_uid())
    ds = pydicom.dcmread(path)
    if value is None:
        delattr(ds, field)
    else:
        setattr(ds, field, value)
    assoc = _scu(rx.port)
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    assert 0xC000 <= status.Status <= 0xCFFF
    refused = wait_for(lambda: rx.events("instance-refused"), 5)
    assert refused[0]["dimse_status"].upper().startswith("0XC")
    assert refused[0]["calling_ae"] == "PACS" and refused[0]["peer"] == "127.0.0.1"
    assert not list((rx.spool / "incoming").iterdir())
    outside = {p.name for p in tmp_path.iterdir()}
    assert outside <= {"spool", "dts.toml", "bad.dcm", "receiver-0.log"}, outside
    assert not Path("/tmp/p").exists() or Path("/tmp/p").stat().st_mtime < rx.log.stat().st_ctime


@pytest.mark.peers
def test_invalid_uid_with_storescu(start_receiver: Any, tmp_path: Path) -> None:
    rx = start_receiver()
    path = make_instance(tmp_path / "data" / "bad.dcm", study_uid="../../etc/x",
                         series_uid=generate_uid())
    done = rx.storescu(path.parent, extra=("-v",))
    assert done.returncode != 0
    assert "Received Store Response (Error: CannotUnderstand)" in done.stdout + done.stderr
    assert rx.events("instance-refused")
    assert not list((rx.spool / "incoming").iterdir())


def test_low_disk_is_out_of_resources(start_receiver: Any, tmp_path: Path) -> None:
    rx = start_receiver(station="min_free_mb = 1000000000")
    path = make_instance(tmp_path / "x.dcm", study_uid=generate_uid(), series_uid=generate_uid())
    assoc = _scu(rx.port)
    try:
        status = assoc.send_c_store(path)
    finally:
        assoc.release()
    assert status.Status == 0xA700
    ev = wait_for(lambda: rx.events("instance-refused"), 5)
    assert ev[0]["status"] == "error" and "min_free_mb" in ev[0]["message"]
    assert not list((rx.spool / "incoming").iterdir())


def test_duplicate_instance_stored_once_later_wins(start_receiver: Any, tmp_path: Path) -> None:
    rx = start_receiver()
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    first = make_instance(tmp_path / "1.dcm", study_uid=study, series_uid=series, sop_uid=sop,
                          instance_number=1)
    second = make_instance(tmp_path / "2.dcm", study_uid=study, series_uid=series, sop_uid=sop,
                           instance_number=2)
    other = make_instance(tmp_path / "3.dcm", study_uid=study, series_uid=series,
                          instance_number=3)
    assoc = _scu(rx.port)
    try:
        for p in (first, other, second):
            assert assoc.send_c_store(p).Status == 0
    finally:
        assoc.release()
    (job,) = rx.wait_jobs(1)
    data = job.read()
    assert data["instances"] == 2 and data["duplicates"] == 1
    stored = job.input_dir / series / f"{sop}.dcm"
    assert pydicom.dcmread(stored).InstanceNumber == 2


STREAM = """
[[stream]]
name = "ai"
called_ae = "^AICORE1$"
command = ["true"]
"""


@pytest.mark.peers
def test_called_ae_and_allow_lists_refuse_with_event(start_receiver: Any) -> None:
    rx = start_receiver(station='check_called_ae = true\nallowed_calling_ae = ["PACS", "MOD"]',
                        extra=STREAM)

    def echo(aet: str, aec: str) -> tuple[int, str]:
        done = subprocess.run([ECHOSCU, "-aet", aet, "-aec", aec, "127.0.0.1", str(rx.port)],
                              capture_output=True, text=True, timeout=30, check=False)
        return done.returncode, done.stderr

    assert echo("PACS", "DTS")[0] == 0
    assert echo("MOD", "AICORE1")[0] == 0
    # The peer is told why (an A-ASSOCIATE-RJ, not a closed connection).
    code, err = echo("PACS", "WRONG")
    assert code != 0 and "Called AE Title Not Recognized" in err, err
    code, err = echo("STRANGER", "DTS")
    assert code != 0 and "Calling AE Title Not Recognized" in err, err
    refused = rx.events("association-refused")
    assert len(refused) == 2
    assert {(e["calling_ae"], e["called_ae"]) for e in refused} == {("PACS", "WRONG"),
                                                                   ("STRANGER", "DTS")}
    assert all(e["peer"] == "127.0.0.1" and e["stage"] == "receive" for e in refused)


@pytest.mark.peers
def test_allowed_hosts_refuses_other_addresses(start_receiver: Any) -> None:
    rx = start_receiver(station='allowed_hosts = ["10.0.0.0/8"]')
    done = subprocess.run([ECHOSCU, "-aec", "DTS", "127.0.0.1", str(rx.port)],
                          capture_output=True, timeout=30, check=False)
    assert done.returncode != 0
    (ev,) = rx.events("association-refused")
    assert ev["peer"] == "127.0.0.1" and "allowed_hosts" in ev["message"]


@pytest.mark.peers
def test_kill_9_mid_transfer_loses_nothing_acknowledged(start_receiver: Any,
                                                        tmp_path: Path) -> None:
    rx = start_receiver(station="stable_seconds = 2")
    study = make_study(tmp_path / "exam", n_series=1, per_series=150, rows=128, cols=128)
    sender = subprocess.Popen([STORESCU, "-v", "-aet", "PACS", "-aec", "DTS", "+sd", "+r",
                               "127.0.0.1", str(rx.port), str(study["folder"])],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    acked = threading.Event()

    def read() -> None:
        assert sender.stdout is not None
        for line in sender.stdout:
            lines.append(line)
            if sum("Received Store Response (Success)" in x for x in lines) >= 20:
                acked.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_for(acked.is_set, 30, what="20 acknowledged instances")
        rx.proc.send_signal(signal.SIGKILL)
        rx.proc.wait(10)
        sender.wait(30)
    finally:
        stop_process(sender)
    reader.join(10)
    acked_sops, current = set(), None
    for line in lines:
        m = re.search(r"Sending file: (\S+)", line)
        if m:
            current = Path(m.group(1)).stem
        elif "Received Store Response (Success)" in line and current:
            acked_sops.add(current)
    assert len(acked_sops) >= 20
    assert len(acked_sops) < 150, "the transfer ended before the kill"
    assert not rx.jobs()
    rx2 = start_receiver(station="stable_seconds = 2")
    (job,) = rx2.wait_jobs(1)
    received = set().union(*_input_sops(job).values())
    assert acked_sops <= received
    for f in job.input_dir.rglob("*.dcm"):  # whole files only
        assert pydicom.dcmread(f).SOPInstanceUID == f.stem


@pytest.mark.peers
def test_compressed_transfer_syntaxes_stored_unchanged(start_receiver: Any,
                                                       tmp_path: Path) -> None:
    rx = start_receiver()
    folder = tmp_path / "compressed"
    folder.mkdir()
    files = {"JPEG2000.dcm": "-xw", "SC_rgb_jpeg_dcmtk.dcm": "-xy", "MR_small_RLE.dcm": "-xr"}
    originals = {}
    for name, propose in files.items():
        src = Path(get_testdata_file(name))  # type: ignore[arg-type]
        shutil.copy(src, folder / name)
        ds = pydicom.dcmread(src, stop_before_pixels=True)
        originals[str(ds.SOPInstanceUID)] = (folder / name, str(ds.file_meta.TransferSyntaxUID))
        # storescu proposes the file's own (compressed) transfer syntax only when told
        done = rx.storescu(folder / name, extra=(propose,))
        assert done.returncode == 0, done.stdout + done.stderr
    jobs = rx.wait_jobs(3)  # three studies
    stored = {f.stem: f for j in jobs for f in j.input_dir.rglob("*.dcm")}
    assert set(stored) == set(originals)
    for sop, (src, ts) in originals.items():
        got = pydicom.dcmread(stored[sop])
        assert str(got.file_meta.TransferSyntaxUID) == ts
        # the compressed fragments exactly as sent (storescu may re-encode other elements)
        assert got.PixelData == pydicom.dcmread(src).PixelData
        assert _dataset_bytes(stored[sop]).endswith(got.PixelData) or \
            got.PixelData in _dataset_bytes(stored[sop])


# -- core: publication steps cut by a crash are completed, never duplicated --------------

def _station(tmp_path: Path) -> Station:
    return Station.open(write_station_config(tmp_path, 0), None)


def _incoming_study(station: Station, tmp_path: Path, n: int = 3) -> str:
    study = make_study(tmp_path / "src", n_series=1, per_series=n)
    dest = station.spool.incoming / study["study_uid"]
    shutil.copytree(study["folder"], dest)
    (dest / receiver_mod.STUDY_META).write_text(json.dumps(
        {"calling_ae": "PACS", "called_ae": "DTS", "peer": "10.1.2.3", "peer_port": 1234,
         "received_at": "2026-11-26T10:00:00.000000Z", "patient_id": "P", "accession": "A"}))
    return str(study["study_uid"])


@pytest.mark.parametrize("cut", ["after-marker", "after-move", "after-event"])
def test_restart_completes_interrupted_publication(tmp_path: Path, cut: str) -> None:
    station = _station(tmp_path)
    study = _incoming_study(station, tmp_path)
    job = station.spool.create_tmp_job()
    (job.path / receiver_mod.MARKER).write_text(json.dumps({"study_uid": study}))
    if cut != "after-marker":
        os.rename(station.spool.incoming / study, job.input_dir)
    if cut == "after-event":
        rx0 = receiver_mod.Receiver(station)
        station.journal.emit("receive", "received", "ok", "x", job=job, job_data={})
        assert rx0 is not None
    rx = receiver_mod.Receiver(station)
    published = rx.recover()
    assert published == [job.id]
    assert station.spool.list(Queue.CLASSIFY, State.NEW) == [job.id]
    final = Job(station.spool.dir(Queue.CLASSIFY, State.NEW) / job.id)
    data = final.read()
    assert data["instances"] == 3 and data["calling_ae"] == "PACS" and data["peer"] == "10.1.2.3"
    assert [e["event"] for e in final.events()].count("received") == 1
    assert not (final.path / receiver_mod.MARKER).exists()
    assert not list(station.spool.incoming.iterdir())
    assert receiver_mod.Receiver(station).recover() == []  # nothing left to do twice


def test_restart_adopts_incoming_and_publishes_when_stable(tmp_path: Path) -> None:
    station = _station(tmp_path)
    study = _incoming_study(station, tmp_path, n=2)
    (station.spool.incoming / "1.2.3").mkdir()  # created, nothing acknowledged in it
    rx = receiver_mod.Receiver(station)
    assert rx.recover() == []
    assert rx.pending() == [study]
    assert not (station.spool.incoming / "1.2.3").exists()
    assert rx.publish_stable(force=True)
    (job_id,) = station.spool.list(Queue.CLASSIFY, State.NEW)
    data = Job(station.spool.dir(Queue.CLASSIFY, State.NEW) / job_id).read()
    assert data["study_uid"] == study and data["instances"] == 2
    assert data["received_at"] == "2026-11-26T10:00:00.000000Z"



@pytest.mark.parametrize("meta_written", [False, True])
def test_a_study_folder_another_worker_just_made_is_joined(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, meta_written: bool) -> None:
    """Two receive workers get the first instance of one study at the same moment: the
    other one makes the folder just before this one does (its metadata written or not
    yet), and this one joins it (it refused the instance with 0xA700, "File exists")."""
    station = _station(tmp_path)
    rx = receiver_mod.Receiver(station)
    folder = station.spool.incoming / "1.2.3"
    real_mkdir = Path.mkdir

    def the_other_worker_first(self: Path, *args: Any, **kwargs: Any) -> None:
        if self == folder and not self.exists():
            real_mkdir(self)
            if meta_written:
                (folder / receiver_mod.STUDY_META).write_text(json.dumps(
                    {"calling_ae": "FIRST", "study_uid": "1.2.3",
                     "received_at": "2026-12-02T10:00:00Z"}))
        real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", the_other_worker_first)
    conn = receiver_mod.Connection("SECOND", "DTS", "127.0.0.1", 1000)
    st = rx._enter("1.2.3", 1, conn, {"patient_id": "P", "accession": "A"})
    kept = json.loads((folder / receiver_mod.STUDY_META).read_text())
    assert kept["study_uid"] == "1.2.3" and st.active == 1
    assert kept["calling_ae"] == ("FIRST" if meta_written else "SECOND")


def _no_space(*args: Any, **kwargs: Any) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("cut", ["marker", "job.json"])
def test_publication_that_a_full_disk_stopped_is_finished(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cut: str) -> None:
    """The disk fills up while a study is published: before its files moved (the marker)
    nothing is left in tmp/ and the study is published later; after they moved (job.json)
    the next round finishes it from tmp/ (it used to wait there for a restart)."""
    station = _station(tmp_path)
    study = _incoming_study(station, tmp_path)
    rx = receiver_mod.Receiver(station)
    rx.recover()
    with monkeypatch.context() as m:
        if cut == "marker":
            m.setattr(receiver_mod, "write_file_durably", _no_space)
        else:
            m.setattr(Job, "write", _no_space)
        assert rx.publish_stable(force=True) == []
    failed = [line for f in station.spool.log_dir.glob("*.jsonl")
              for line in f.read_text().splitlines() if '"publish-failed"' in line]
    assert len(failed) == 1
    left = [e.name for e in station.spool.tmp.iterdir() if not e.name.startswith(".")]
    assert len(left) == (0 if cut == "marker" else 1), left
    published = rx.poll() + rx.publish_stable(force=True)
    assert len(published) == 1, published
    (job_id,) = station.spool.list(Queue.CLASSIFY, State.NEW)
    data = Job(station.spool.dir(Queue.CLASSIFY, State.NEW) / job_id).read()
    assert data["study_uid"] == study and data["instances"] == 3
    assert not [e for e in station.spool.tmp.iterdir() if not e.name.startswith(".")]
    assert not list(station.spool.incoming.iterdir())


def test_a_restart_on_a_full_disk_serves_and_finishes_the_publication_later(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    station = _station(tmp_path)
    study = _incoming_study(station, tmp_path)
    job = station.spool.create_tmp_job()
    (job.path / receiver_mod.MARKER).write_text(json.dumps({"study_uid": study}))
    os.rename(station.spool.incoming / study, job.input_dir)
    rx = receiver_mod.Receiver(station)
    with monkeypatch.context() as m:
        m.setattr(Job, "write", _no_space)
        assert rx.recover() == []  # no exception: the receiver can start
    assert rx.poll() == [job.id]
    assert station.spool.list(Queue.CLASSIFY, State.NEW) == [job.id]

def test_tls_station_answers_tls_echo_only(start_receiver: Any, tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    rx = start_receiver(extra=f'[station.tls]\ncertificate = "{cert}"\nprivate_key = "{key}"\n')
    done = run_dts("echo", config=rx.config)  # the station's own TLS settings are used
    assert done.returncode == 0, done.stderr
    plain = subprocess.run([ECHOSCU, "-aec", "DTS", "127.0.0.1", str(rx.port)],
                           capture_output=True, timeout=30, check=False)
    assert plain.returncode != 0


def test_aborted_association_keeps_what_was_acknowledged(start_receiver: Any,
                                                          tmp_path: Path) -> None:
    rx = start_receiver()
    study = make_study(tmp_path / "exam", n_series=1, per_series=3)
    files = sorted(next(study["folder"].iterdir()).iterdir())
    assoc = _scu(rx.port)
    for f in files[:2]:
        assert assoc.send_c_store(f).Status == 0
    assoc.abort()
    (job,) = rx.wait_jobs(1)
    assert set().union(*_input_sops(job).values()) == {f.stem for f in files[:2]}


def _fill(folder: Path) -> Path:
    """Fill the filesystem of ``folder`` to the last block; the filler file."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as fh:
        chunk = b"\0" * (1 << 20)
        while chunk:
            try:
                fh.write(chunk)
            except OSError:
                chunk = chunk[:len(chunk) // 2]  # down to single bytes: every block taken
    return filler


def _store_statuses(output: str) -> list[str]:
    """Each ``Received Store Response (...)`` of ``storescu -v`` output, in order."""
    return re.findall(r"Received Store Response \(([^)]*)\)", output)


@contextlib.contextmanager
def _small_spool(tmp_path: Path) -> Iterator[Path]:
    """``tmp_path/spool`` on a tmpfs of 8 MB of its own (unmounted afterwards)."""
    spool = tmp_path / "spool"
    spool.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(spool)], check=True,
                   timeout=30)
    try:
        yield spool
    finally:
        subprocess.run(["umount", "-l", str(spool)], check=False, timeout=30)


def _instances(folder: Path, n: int, study: str) -> dict[Path, str]:
    """``n`` instances of 64x64 (3 pages of 4 KiB each on disk), one series each: path ->
    SOP Instance UID."""
    out = {}
    for i in range(n):
        sop = generate_uid()
        out[make_instance(folder / f"{i:03}.dcm", study_uid=study, series_uid=generate_uid(),
                          sop_uid=sop, rows=64, cols=64, instance_number=i + 1)] = sop
    return out


def _journal(rx: RunningReceiver, event: str) -> tuple[list[dict[str, Any]], int]:
    """The station journal's ``event`` lines, and how many lines were cut short (skipped,
    as ``dts log`` does)."""
    out, cut = [], 0
    for f in sorted((rx.spool / "log").glob("*.jsonl")):
        for line in f.read_text().splitlines():
            try:
                rec = json.loads(line) if line else None
            except ValueError:
                cut += 1
                continue
            if rec is not None and rec["event"] == event:
                out.append(rec)
    return out, cut


def _published(rx: RunningReceiver) -> set[str]:
    """SOP Instance UIDs in the published jobs (classify/new)."""
    return {p.name[:-4] for j in rx.jobs() for p in j.input_dir.rglob("*.dcm")}


@pytest.mark.peers
def test_full_disk_refuses_with_out_of_resources_and_keeps_what_it_acknowledged(
        start_receiver: Any, tmp_path: Path) -> None:
    """Issue 17: on a full spool filesystem every refusal is 0xA700 (retry later), even the
    ones whose journal line cannot be written; the lost lines are reported once there is
    room again, and nothing acknowledged is lost."""
    with _small_spool(tmp_path) as spool:
        # one receiver process: the full disk cuts at most one journal line short per
        # process writing it (with two workers, the refusing one and a publishing one may)
        rx = start_receiver(station="min_free_mb = 0\nreceive_workers = 1")
        try:
            study = generate_uid()
            sops = _instances(tmp_path / "exam", 34, study)
            files = list(sops)
            first = rx.storescu(*files[:4], extra=("-v",))
            assert _store_statuses(first.stdout + first.stderr) == ["Success"] * 4, first.stderr
            acknowledged = {sops[f] for f in files[:4]}
            filler = _fill(spool)
            # Room for one instance: the first C-STORE of an association is pynetdicom's
            # (see test_full_disk_on_an_association_s_first_instance), the rest are the
            # fast path's; their journal lines soon find no room either.
            with open(filler, "r+b") as fh:
                fh.truncate(os.path.getsize(filler) - 4 * 4096)
            full = rx.storescu(*files[4:28], extra=("-v", "--no-halt"))
            statuses = _store_statuses(full.stdout + full.stderr)
            assert len(statuses) == 24, full.stderr
            acknowledged |= {sops[f] for f, s in zip(files[4:28], statuses) if s == "Success"}
            refused = [s for s in statuses if s != "Success"]
            assert len(refused) >= 20, statuses
            assert set(refused) == {"Refused: OutOfResources"}, statuses
            # room again: the lost journal lines are reported, new instances are taken
            filler.unlink()
            lost = wait_for(lambda: _journal(rx, "journal-lost")[0], 20,
                            what="journal-lost event")
            assert len(lost) == 1 and lost[0]["status"] == "error", lost
            logged, cut = _journal(rx, "instance-refused")
            assert cut <= 1  # the one the full disk cut short (it is counted as lost)
            assert all(e["dimse_status"] == "0xA700" for e in logged), logged
            assert lost[0]["lost"] >= 1
            assert lost[0]["lost"] + len(logged) == len(refused), (lost, logged)
            assert lost[0]["lost_events"] == {"instance-refused": lost[0]["lost"]}
            again = rx.storescu(*files[28:], extra=("-v",))
            assert _store_statuses(again.stdout + again.stderr) == ["Success"] * 6, again.stderr
            acknowledged |= {sops[f] for f in files[28:]}
            # every one is published in the end (a publication that failed for the full
            # disk is finished, not left in tmp/)
            wait_for(lambda: acknowledged <= _published(rx), 30,
                     what="every acknowledged instance published")
            assert not list((rx.spool / "incoming").iterdir())
        finally:
            stop_process(rx.proc)  # before the unmount (the fixture's stop is then a no-op)


@pytest.mark.peers
def test_full_disk_on_an_association_s_first_instance(start_receiver: Any,
                                                      tmp_path: Path) -> None:
    with _small_spool(tmp_path) as spool:
        rx = start_receiver(station="min_free_mb = 0")
        try:
            (path,) = _instances(tmp_path / "exam", 1, generate_uid())
            _fill(spool)
            done = rx.storescu(path, extra=("-v",))
            assert _store_statuses(done.stdout + done.stderr) == ["Refused: OutOfResources"], done.stderr
        finally:
            stop_process(rx.proc)
