"""Pytest fixtures: real DICOM peers (Orthanc and dcmtk storescp) on free loopback ports.

Both fixtures are *factories*: a test calls them as often as it needs peers, each call starts
one more program, and the fixture's finalizer stops every one of them by its PID (SIGTERM,
then SIGKILL after a deadline). Every wait has a deadline; nothing sleeps a fixed time.

``orthanc_factory(**options) -> Orthanc`` starts ``/usr/sbin/Orthanc`` (a PACS) with a
configuration JSON written into its own folder under ``tmp_path`` (own storage and index,
HTTP and DICOM on free 127.0.0.1 ports, remote access and authentication off, no plugins)
and returns when its REST API answers. Options:

- ``aet="ORTHANC"``: its DICOM AE title (``DicomAet``).
- ``modalities={"DTS": ("DTS", "127.0.0.1", 11112)}``: ``DicomModalities`` it knows.
- ``check_called_aet=False``: ``DicomCheckCalledAet``.
- ``only_known_modalities=False``: ``DicomAlwaysAllowStore`` false plus
  ``DicomCheckModalityHost``, i.e. refuse C-STORE from AE titles not in ``modalities``.
- ``config={...}``: further keys merged into the configuration as is.
- ``dicom_port=None``: a fixed DICOM port (e.g. one a destination was configured with
  while the peer was still down); a free one otherwise.

An ``Orthanc`` has ``aet``, ``host`` (127.0.0.1), ``port`` (DICOM), ``http_port``, ``url``,
``folder``, ``log`` (its stdout/stderr file), ``proc``, and methods ``get(path)`` (REST GET,
parsed JSON), ``post(path, body)``, ``instance_count()``, ``sop_uids()`` (set of the SOP
Instance UIDs it stores, via ``/tools/find``), ``instances()`` (``{SOPInstanceUID:
{"SOPClassUID":..., "StudyInstanceUID":..., ...}}`` from ``simplified-tags``),
``wait_for_instances(n, timeout=30)`` and ``stop()``.

``storescp_factory(**options) -> StoreSCP`` starts dcmtk's ``/usr/bin/storescp`` (never the
Python script of the same name) writing every object it receives as a file into its own
output folder, and returns when its port accepts connections. Options:

- ``aet="STORESCP"``, ``port=None`` (a free one unless given, e.g. to bring back a peer on the
  port a destination points at).
- ``sop_classes=None``: a list of SOP Class UIDs; when given, a ``-xf`` association
  configuration is written that accepts ONLY these classes (plus Verification), so every
  other class is refused at association negotiation (no accepted presentation context).
- ``transfer_syntaxes=None``: with ``sop_classes``, the transfer syntaxes it accepts for
  them (dcmtk names such as ``"LittleEndianImplicit"``, ``"LocalEndianExplicit"``,
  ``"JPEGLossless:Non-hierarchical-1stOrderPrediction"``; default: the uncompressed ones).
- ``args=()``: more storescp options, e.g. ``["--abort-after"]``, ``["--refuse"]``,
  ``["+xi"]`` (implicit VR only), ``["--sleep-after", "1"]``.
- ``nodelay=True``: run with ``TCP_NODELAY=1`` in its environment (dcmtk leaves Nagle on
  otherwise; see docs/performance.md).
- ``out_dir=None``: where files go (a fresh folder under ``tmp_path`` by default).

A ``StoreSCP`` has ``aet``, ``host``, ``port``, ``out_dir``, ``log``, ``proc``, and methods
``files()`` (received files, sorted), ``sop_uids()`` (their SOP Instance UIDs, read from the
file meta), ``wait_for_files(n, timeout=30)``, ``stop()``, ``kill()`` (SIGKILL, e.g. to drop
an association halfway) and ``restart(out_dir=None, args=None)`` (same port; same options
unless new extra ``args`` are given).

``orthanc`` and ``storescp`` are one ready-made peer each, for tests that need only one.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ORTHANC, STORESCP, free_port, stop_process, wait_for

HOST = "127.0.0.1"


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def _stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM to every process first (Orthanc takes seconds to stop), then wait for each
    (SIGKILL after a deadline)."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        stop_process(proc)


def _fail_if_exited(proc: subprocess.Popen[bytes], log: Path, what: str) -> None:
    if proc.poll() is not None:
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        raise AssertionError(f"{what} exited with {proc.returncode} while starting:\n{tail}")


# -- Orthanc -----------------------------------------------------------------------------

@dataclass
class Orthanc:
    aet: str
    port: int
    http_port: int
    folder: Path
    log: Path
    proc: subprocess.Popen[bytes]
    host: str = HOST

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def _request(self, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data,
                                     method="GET" if body is None else "POST")
        with urllib.request.urlopen(req, timeout=10) as rsp:
            return json.loads(rsp.read() or b"null")

    def get(self, path: str) -> Any:
        return self._request(path)

    def post(self, path: str, body: Any) -> Any:
        return self._request(path, body)

    def alive(self) -> bool:
        try:
            return bool(self.get("/system"))
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def instance_count(self) -> int:
        return len(self.get("/instances"))

    def sop_uids(self) -> set[str]:
        found = self.post("/tools/find", {"Level": "Instance", "Query": {}, "Expand": True})
        return {item["MainDicomTags"]["SOPInstanceUID"] for item in found}

    def instances(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for oid in self.get("/instances"):
            tags = self.get(f"/instances/{oid}/simplified-tags")
            out[tags["SOPInstanceUID"]] = tags
        return out

    def wait_for_instances(self, n: int, timeout: float = 30.0) -> set[str]:
        wait_for(lambda: self.instance_count() >= n, timeout, interval=0.1,
                 what=f"{n} instances in Orthanc {self.aet}")
        return self.sop_uids()

    def stop(self) -> None:
        stop_process(self.proc)


def _orthanc_config(folder: Path, aet: str, port: int, http_port: int,
                    modalities: dict[str, tuple[str, str, int]], check_called_aet: bool,
                    only_known: bool, extra: dict[str, Any]) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "Name": f"test-{aet}",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "StorageCompression": False,
        "DicomAet": aet,
        "DicomPort": port,
        "HttpPort": http_port,
        "HttpServerEnabled": True,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "SslEnabled": False,
        "Plugins": [],
        "DicomServerEnabled": True,
        "DicomCheckCalledAet": check_called_aet,
        "DicomModalities": {k: list(v) for k, v in modalities.items()},
        "DicomAlwaysAllowStore": not only_known,
        "DicomAlwaysAllowEcho": True,
        "DicomCheckModalityHost": only_known,
        "SaveJobs": False,
        "StableAge": 1,
        "UnknownSopClassAccepted": False,
        "ExecuteLuaEnabled": False,
    }
    cfg.update(extra)
    return cfg


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator[Callable[..., Orthanc]]:
    started: list[Orthanc] = []

    def start(aet: str = "ORTHANC", *, modalities: dict[str, tuple[str, str, int]] | None = None,
              check_called_aet: bool = False, only_known_modalities: bool = False,
              config: dict[str, Any] | None = None, dicom_port: int | None = None,
              timeout: float = 30.0) -> Orthanc:
        folder = tmp_path / f"orthanc-{len(started)}-{aet}"
        folder.mkdir(parents=True)
        port, http_port = dicom_port or free_port(), free_port()
        cfg = _orthanc_config(folder, aet, port, http_port, modalities or {},
                              check_called_aet, only_known_modalities, config or {})
        cfg_file = folder / "orthanc.json"
        cfg_file.write_text(json.dumps(cfg, indent=2))
        log = folder / "orthanc.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([ORTHANC, str(cfg_file)], stdout=out,
                                    stderr=subprocess.STDOUT, cwd=folder)
        peer = Orthanc(aet=aet, port=port, http_port=http_port, folder=folder, log=log,
                       proc=proc)
        started.append(peer)

        def up() -> bool:
            _fail_if_exited(proc, log, "Orthanc")
            return peer.alive() and _port_open(port)
        wait_for(up, timeout, interval=0.05, what=f"Orthanc {aet} on ports {port}/{http_port}")
        return peer

    yield start
    _stop_all([peer.proc for peer in started])


@pytest.fixture
def orthanc(orthanc_factory: Callable[..., Orthanc]) -> Orthanc:
    return orthanc_factory()


# -- dcmtk storescp ------------------------------------------------------------------------

@dataclass
class StoreSCP:
    aet: str
    port: int
    out_dir: Path
    log: Path
    argv: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes]
    fixed: int = 0  # argv[:fixed]: program, AE title, output folder, association config
    host: str = HOST
    history: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def files(self) -> list[Path]:
        return sorted(p for p in self.out_dir.rglob("*") if p.is_file())

    def sop_uids(self) -> set[str]:
        from pydicom.filereader import read_file_meta_info

        uids = set()
        for f in self.files():
            try:
                uids.add(str(read_file_meta_info(f).MediaStorageSOPInstanceUID))
            except Exception:
                continue  # a file cut short by kill(): not received
        return uids

    def wait_for_files(self, n: int, timeout: float = 30.0) -> list[Path]:
        wait_for(lambda: len(self.files()) >= n, timeout, interval=0.05,
                 what=f"{n} files from storescp {self.aet}")
        return self.files()

    def stop(self) -> None:
        stop_process(self.proc)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def restart(self, out_dir: Path | None = None, args: list[str] | None = None,
                timeout: float = 20.0) -> StoreSCP:
        """Start again on the same port (after stop() or kill()), with the same options
        unless ``out_dir`` or ``args`` (the extra storescp options) are given."""
        self.stop()
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            self.out_dir = out_dir
            self.argv[self.argv.index("-od") + 1] = str(out_dir)
        if args is not None:
            self.argv = self.argv[:self.fixed] + list(args) + [str(self.port)]
        self.history.append(self.proc)
        self.proc = _spawn_storescp(self.argv, self.env, self.log)
        _wait_storescp(self, timeout)
        return self


def _spawn_storescp(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)


def _wait_storescp(peer: StoreSCP, timeout: float) -> None:
    def up() -> bool:
        _fail_if_exited(peer.proc, peer.log, "storescp")
        return _port_open(peer.port)
    wait_for(up, timeout, interval=0.02, what=f"storescp on port {peer.port}")


_DEFAULT_SYNTAXES = ("LocalEndianExplicit", "LittleEndianImplicit")


def storescp_association_config(path: Path, sop_classes: list[str],
                                transfer_syntaxes: list[str] | tuple[str, ...] = _DEFAULT_SYNTAXES
                                ) -> Path:
    """Write a storescp ``-xf`` file accepting only ``sop_classes`` (profile ``Only``)."""
    lines = ["[[TransferSyntaxes]]", "[Syntaxes]"]
    lines += [f"TransferSyntax{i} = {ts}" for i, ts in enumerate(transfer_syntaxes, 1)]
    lines += ["[Uncompressed]", "TransferSyntax1 = LocalEndianExplicit",
              "TransferSyntax2 = LittleEndianImplicit"]
    lines += ["[[PresentationContexts]]", "[Accepted]",
              "PresentationContext1 = 1.2.840.10008.1.1\\Uncompressed"]
    lines += [f"PresentationContext{i} = {uid}\\Syntaxes"
              for i, uid in enumerate(sop_classes, 2)]
    lines += ["[[Profiles]]", "[Only]", "PresentationContexts = Accepted", ""]
    path.write_text("\n".join(lines))
    return path


@pytest.fixture
def storescp_factory(tmp_path: Path) -> Iterator[Callable[..., StoreSCP]]:
    started: list[StoreSCP] = []

    def start(aet: str = "STORESCP", *, port: int | None = None,
              sop_classes: list[str] | None = None,
              transfer_syntaxes: list[str] | None = None, args: list[str] | tuple[str, ...] = (),
              nodelay: bool = True, out_dir: Path | None = None,
              timeout: float = 20.0) -> StoreSCP:
        folder = tmp_path / f"storescp-{len(started)}-{aet}"
        folder.mkdir(parents=True)
        out = out_dir or folder / "received"
        out.mkdir(parents=True, exist_ok=True)
        port = port or free_port()
        argv = [STORESCP, "-aet", aet, "-od", str(out), "-dhl"]
        if sop_classes is not None:
            cfg = storescp_association_config(folder / "association.cfg", sop_classes,
                                              transfer_syntaxes or _DEFAULT_SYNTAXES)
            argv += ["-xf", str(cfg), "Only"]
        fixed = len(argv)
        argv += list(args) + [str(port)]
        env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
        if nodelay:
            env["TCP_NODELAY"] = "1"
        log = folder / "storescp.log"
        peer = StoreSCP(aet=aet, port=port, out_dir=out, log=log, argv=argv, env=env,
                        proc=_spawn_storescp(argv, env, log), fixed=fixed)
        started.append(peer)
        _wait_storescp(peer, timeout)
        return peer

    yield start
    _stop_all([proc for peer in started for proc in [*peer.history, peer.proc]])


@pytest.fixture
def storescp(storescp_factory: Callable[..., StoreSCP]) -> StoreSCP:
    return storescp_factory()
