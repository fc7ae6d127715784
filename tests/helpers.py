"""Shared test helpers: free ports, deadlines, running the dts command, DICOM data."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import tomli_w

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

REPO = Path(__file__).resolve().parent.parent
DTS = [sys.executable, "-m", "dts"]

# dcmtk by full path: pynetdicom installs Python commands of the same names on PATH.
STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
ECHOSCU = "/usr/bin/echoscu"
ORTHANC = "/usr/sbin/Orthanc"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected loopback TCP sockets (client, server side): a peer made by hand."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    left = socket.create_connection(srv.getsockname())
    right, _ = srv.accept()
    srv.close()
    return left, right


def wait_for(condition: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05,
             what: str = "condition") -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def wait_port(port: int, timeout: float = 20.0) -> None:
    def up() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            return False
    wait_for(up, timeout, what=f"port {port}")


def run_dts(*args: str, config: Path | None = None, spool: Path | None = None,
            timeout: float = 120, check: bool = False,
            env: dict[str, str] | None = None,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = list(DTS)
    if config is not None:
        cmd += ["--config", str(config)]
    if spool is not None:
        cmd += ["--spool", str(spool)]
    cmd += list(args)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("DTS_")}
    full_env.update(env or {})
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env,
                          input=input, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\nstdout:{proc.stdout}\n"
                             f"stderr:{proc.stderr}")
    return proc


def start_dts(*args: str, config: Path | None = None, spool: Path | None = None,
              env: dict[str, str] | None = None, log: Path | None = None) -> subprocess.Popen[bytes]:
    cmd = list(DTS)
    if config is not None:
        cmd += ["--config", str(config)]
    if spool is not None:
        cmd += ["--spool", str(spool)]
    cmd += list(args)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("DTS_")}
    full_env.update(env or {})
    out = open(log, "wb") if log else subprocess.DEVNULL
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=REPO)


def stop_process(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM,
                 timeout: float = 20.0) -> int:
    """Stop a process the test started, by its PID; SIGKILL after ``timeout``."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


def make_instance(path: Path, *, study_uid: str, series_uid: str, sop_uid: str | None = None,
                  patient_id: str = "PAT001", patient_name: str = "Doe^Jane",
                  accession: str = "ACC001", modality: str = "CT", rows: int = 16,
                  cols: int = 16, series_number: int = 1, instance_number: int = 1,
                  sop_class: str = "1.2.840.10008.5.1.4.1.1.2", **attrs: Any) -> Path:
    """Write one small, valid image instance (uncompressed) and return its path."""
    import numpy as np

    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.AccessionNumber = accession
    ds.StudyDate = "20261126"
    ds.StudyTime = "101500"
    ds.StudyID = "1"
    ds.Modality = modality
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.PixelSpacing = [0.5, 0.5]
    ds.SliceThickness = 1.0
    ds.ImagePositionPatient = [0.0, 0.0, float(instance_number)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    for k, v in attrs.items():
        setattr(ds, k, v)
    rng = np.random.default_rng(instance_number)
    ds.PixelData = rng.integers(-1000, 1500, size=(rows, cols), dtype=np.int16).tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def make_study(folder: Path, *, n_series: int = 2, per_series: int = 3,
               study_uid: str | None = None, **kw: Any) -> dict[str, Any]:
    """A study of ``n_series`` series of ``per_series`` images under ``folder``."""
    study_uid = study_uid or generate_uid()
    series: dict[str, list[str]] = {}
    for s in range(n_series):
        series_uid = generate_uid()
        series[series_uid] = []
        for i in range(per_series):
            sop = generate_uid()
            make_instance(folder / series_uid / f"{sop}.dcm", study_uid=study_uid,
                          series_uid=series_uid, sop_uid=sop, series_number=s + 1,
                          instance_number=i + 1, **kw)
            series[series_uid].append(sop)
    return {"study_uid": study_uid, "series": series, "folder": folder}


RULES = REPO / "configuration" / "classifyRules.json"
# What every test station has unless the test says otherwise: its spool in the test's
# folder, the checkout's rule file, and no free-disk watermark (test disks may be small).
STATION_DEFAULTS: dict[str, Any] = {"min_free_mb": 0}


def _inline(value: Any) -> str:
    """A TOML value on one line (tables inline, so they stay inside their table)."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_inline(v)}" for k, v in value.items()) + " }"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_inline(v) for v in value) + "]"
    return tomli_w.dumps({"v": value})[4:].strip()


def _key(key: str) -> str:
    return tomli_w.dumps({key: 0}).rsplit(" = ", 1)[0]


def _table(values: dict[str, Any]) -> str:
    return "\n".join(f"{_key(k)} = {_inline(v)}" for k, v in values.items())


def station_config(folder: Path, *, station: dict[str, Any] | None = None,
                   station_text: str = "", destinations: Sequence[dict[str, Any]] = (),
                   streams: Sequence[dict[str, Any]] = (), stream_text: str = "",
                   tail: str = "", name: str = "dts.toml") -> Path:
    """The one builder of a test's dts.toml, written to ``folder / name``.

    ``station`` (values) and ``station_text`` (TOML lines) add or override [station] keys
    over the defaults; ``destinations`` and ``streams`` are tables given as dicts;
    ``stream_text`` adds TOML lines to the last stream; ``tail`` is TOML appended at the end
    (more tables). Everything is checked by parsing it back, so a broken fragment fails
    here, not as a confusing configuration error later."""
    given = tomllib.loads(station_text)
    keys: dict[str, Any] = {"spool": str(folder / "spool"), "classify_rules": str(RULES),
                            **STATION_DEFAULTS, **(station or {})}
    keys = {k: v for k, v in keys.items() if k not in given}
    parts = ["[station]", _table(keys), station_text.strip()]
    for dest in destinations:
        parts += ["", "[[destination]]", _table(dest)]
    for i, stream in enumerate(streams):
        parts += ["", "[[stream]]", _table(stream)]
        if i == len(streams) - 1:
            parts.append(stream_text.strip())
    parts += ["", tail.strip(), ""]
    text = "\n".join(parts)
    tomllib.loads(text)
    path = folder / name
    path.write_text(text)
    return path


def read_line(stream: Any, timeout: float = 20.0) -> str:
    """One line from a child's text pipe, failing after ``timeout`` instead of blocking."""
    import select

    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no line from the process within {timeout}s")
        ready, _, _ = select.select([stream], [], [], remaining)
        if ready:
            return str(stream.readline())
