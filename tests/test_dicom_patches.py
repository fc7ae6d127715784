"""Guards dts's changes to pynetdicom (dts.dicom.patches): the installed version is in the
supported range, every internal they rely on is there and is the code reviewed, and the
changes work on a live association (socket options, short polling, large reads, files in
a folder).

When pynetdicom changes: read the difference of each function a test names (``git diff``
of pynetdicom's tag, or ``patches.source_of(name)`` of both versions), check that every
change in patches.py still holds, then widen ``patches.SUPPORTED`` and pyproject.toml
together and record the new digests in ``patches.REVIEWED``.
"""

from __future__ import annotations

import inspect
import socket
import subprocess
import sys
import textwrap
import threading
import tomllib
from pathlib import Path
from typing import Any

import pydicom
import pynetdicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import association, dimse, dimse_messages, dul, evt, service_class, transport
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from dts.dicom import ae as dicom_ae
from dts.dicom import patches
from tests.helpers import free_port, make_instance, tcp_pair, wait_for


def _original(fn: Any) -> Any:
    while hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
    return fn


def test_installed_pynetdicom_still_has_what_tune_changes() -> None:
    assert patches.in_range(pynetdicom.__version__)
    assert patches.version_ok()
    reactor = inspect.getsource(association.Association._run_reactor)
    assert "time.sleep(0.001)" in reactor, "Association._run_reactor polls differently now"
    dul_init = inspect.getsource(_original(dul.DULServiceProvider.__init__))
    assert "self._run_loop_delay = 0.001" in dul_init
    assert "time.sleep(self._run_loop_delay)" in inspect.getsource(dul.DULServiceProvider.run_reactor)
    assert "self.socket.recv(6)" in inspect.getsource(dul.DULServiceProvider._read_pdu_data)
    sock_init = inspect.getsource(_original(transport.AssociationSocket.__init__))
    assert "self.socket = client_socket" in sock_init
    assert "self._create_socket(" in sock_init
    decode = inspect.getsource(dimse_messages.DIMSEMessage.decode_msg)
    assert "NamedTemporaryFile(delete=False" in decode
    assert "_config.STORE_RECV_CHUNKED_DATASET" in decode
    store = inspect.getsource(service_class.StorageServiceClass.SCP)
    assert "os.unlink(req._dataset_file.name)" in store
    # what the fast C-STORE path (dts.dicom.scp) relies on
    serve = inspect.getsource(_original_of(association.Association, "_serve_request"))
    assert "def _serve_request(self, msg" in serve
    reactor = inspect.getsource(association.Association._run_reactor)
    assert "self._serve_request(msg, cast(int, context_id))" in reactor
    transport_event = inspect.getsource(_original_of(dul.DULServiceProvider,
                                                     "_is_transport_event"))
    assert "self.socket.ready" in transport_event and "self._read_pdu_data()" in transport_event
    receive = inspect.getsource(dimse.DIMSEServiceProvider.receive_primitive)
    assert "self.message = None" in receive and "self.msg_queue.put(" in receive


def _original_of(cls: Any, name: str) -> Any:
    """A pynetdicom method as pynetdicom wrote it, even after dts.dicom.patches.tune()."""
    return patches.resolve(f"{cls.__module__.removeprefix('pynetdicom.')}.{cls.__name__}.{name}")


def test_tune_is_idempotent() -> None:
    assert patches.tune()
    assert patches.tune()
    assert isinstance(dul.DULServiceProvider.__dict__["_run_loop_delay"], property)
    sinit = transport.AssociationSocket.__init__
    assert not getattr(sinit.__wrapped__, "_dts_tuned", False), "wrapped twice"
    assert transport.AssociationSocket.recv is patches._recv
    assert isinstance(association.time, patches._ShortSleepTime)
    assert association.Association._serve_request is patches._serve_request
    locked = dul.DULServiceProvider._is_transport_event
    assert getattr(locked, "_dts_locked", False)
    # installed once, not wrapped twice
    assert not getattr(locked.__wrapped__, "_dts_locked", False)  # type: ignore[attr-defined]
    original = patches.resolve("association.Association._serve_request")
    assert original is not patches._serve_request


# -- the supported range ---------------------------------------------------------------------

def test_the_supported_range_is_what_pyproject_asks_for() -> None:
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    wanted = [d for d in project["project"]["dependencies"] if d.startswith("pynetdicom")]
    assert wanted == [patches.SUPPORTED_TEXT]
    low, high = patches.SUPPORTED
    assert patches.SUPPORTED_TEXT == (f"pynetdicom>={'.'.join(map(str, low))},"
                                      f"<{high[0]}.{high[1]}") and high[2] == 0


@pytest.mark.parametrize("version, ok", [
    ("3.0.0", True), ("3.0.1", True), ("3.0.4", True), ("3.0.5", True), ("3.0.10", True),
    ("3.0.5.dev1", True), ("2.1.1", False), ("3.1.0", False), ("3.1", False),
    ("3.1.0rc1", False), ("4.0.0", False), ("", False), ("unknown", False),
])
def test_version_range(version: str, ok: bool) -> None:
    assert patches.in_range(version) is ok


def test_every_internal_the_changes_rely_on_is_there() -> None:
    assert patches.problems() == []


def test_the_code_relied_on_is_the_code_reviewed() -> None:
    """If this fails, pynetdicom changed a function dts patches or relies on: see the
    module docstring for what to do."""
    got = patches.fingerprints()
    changed = {name: got.get(name) for name in patches.REVIEWED
               if got.get(name) != patches.REVIEWED[name]}
    assert not changed, f"changed since reviewed: {sorted(changed)}"
    assert set(got) == set(patches.REVIEWED)


def test_problems_names_what_does_not_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(patches, "INTERNALS", (
        patches.Internal("association.Association._run_reactor", "a test",
                         source=("time.sleep(0.001)", "no such line")),
        patches.Internal("transport.AssociationSocket.recv", "a test",
                         params=("self", "nr_bytes", "flags")),
        patches.Internal("dul.DULServiceProvider.no_such_method", "a test"),
    ))
    found = patches.problems()
    assert len(found) == 3
    assert "_run_reactor changed" in found[0] and "'no such line'" in found[0]
    assert "time.sleep" not in found[0]
    assert "AssociationSocket.recv takes ('self', 'nr_bytes')" in found[1]
    assert "no_such_method is gone" in found[2]


def test_outside_the_range_nothing_is_changed_and_a_warning_says_so() -> None:
    """In a fresh process (tune() applies once per process): dts runs untuned."""
    code = textwrap.dedent("""
        import logging, pynetdicom
        logging.basicConfig(level=logging.WARNING)
        pynetdicom.__version__ = "3.1.0"
        from pynetdicom import association, dul, transport
        from dts.dicom import ae, patches
        recv = transport.AssociationSocket.recv
        assert not patches.tune() and not patches.is_tuned()
        assert transport.AssociationSocket.recv is recv
        assert not getattr(dul.DULServiceProvider._is_transport_event, "_dts_locked", False)
        assert isinstance(association.time, type(logging))
        ae.make_ae("X")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr
    assert "pynetdicom 3.1.0 is installed, dts is tuned for pynetdicom>=3.0.0,<3.1" in proc.stderr
    assert "running without its network tuning" in proc.stderr


def _opts(sock: socket.socket) -> dict[str, int]:
    return {"nodelay": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)}


@pytest.fixture
def scp(tmp_path: Path) -> Any:
    """A tuned pynetdicom SCP recording what it sees on the accepted socket."""
    seen: dict[str, Any] = {"stored": []}
    rx = tmp_path / "rx"
    rx.mkdir()

    def on_echo(event: Any) -> int:
        seen["acceptor"] = _opts(event.assoc.dul.socket.socket)
        seen["acceptor_delay"] = event.assoc.dul._run_loop_delay
        return 0

    def on_store(event: Any) -> int:
        path = Path(event.dataset_path)
        seen["stored"].append((path.parent, path.read_bytes()))
        return 0

    ae = dicom_ae.make_ae("TESTSCP")
    dicom_ae.add_scp_contexts(ae)
    patches.set_receive_directory(rx)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_ECHO, on_echo), (evt.EVT_C_STORE, on_store)])
    yield port, seen, rx
    server.shutdown()
    patches.set_receive_directory(None)


def test_live_association_is_tuned_on_both_ends(scp: Any, tmp_path: Path) -> None:
    port, seen, rx = scp
    ae = dicom_ae.make_ae("TESTSCU")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="TESTSCP")
    assert assoc.is_established
    try:
        assert _opts(assoc.dul.socket.socket)["nodelay"] == 1
        assert assoc.dul._run_loop_delay == patches.FAST_DELAY
        assert assoc.send_c_echo().Status == 0
        # a 2 MiB image: many large reads through the replaced recv()
        path = make_instance(tmp_path / "big.dcm", study_uid=generate_uid(),
                             series_uid=generate_uid(), rows=1024, cols=1024)
        status = assoc.send_c_store(path)
        assert status.Status == 0
    finally:
        assoc.release()
    assert seen["acceptor"]["nodelay"] == 1
    assert seen["acceptor_delay"] == patches.FAST_DELAY  # busy: short polls
    folder, data = seen["stored"][0]
    assert folder == rx, "received data set was not written into the receive folder"
    got = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
    sent = pydicom.dcmread(path)
    assert got.PixelData == sent.PixelData
    assert got.SOPInstanceUID == sent.SOPInstanceUID


@pytest.mark.skipif(not hasattr(socket, "TCP_QUICKACK"), reason="TCP_QUICKACK is Linux-only")
def test_quickack_is_rearmed_before_reads() -> None:
    calls: list[tuple[int, int]] = []

    class Recorder:
        def __init__(self, sock: socket.socket) -> None:
            self.sock = sock

        def setsockopt(self, level: int, opt: int, value: int) -> None:
            calls.append((level, opt))
            self.sock.setsockopt(level, opt, value)

        def recv_into(self, *args: Any) -> int:
            return self.sock.recv_into(*args)

    left, right = tcp_pair()
    try:
        holder = transport.AssociationSocket.__new__(transport.AssociationSocket)
        holder.socket = Recorder(right)  # type: ignore[assignment]
        sender = threading.Thread(target=lambda: [left.sendall(b"x" * 1000), left.sendall(b"y" * 1000)])
        sender.start()
        data = holder.recv(2000)
        sender.join()
        assert data == b"x" * 1000 + b"y" * 1000
        assert (socket.IPPROTO_TCP, socket.TCP_QUICKACK) in calls
    finally:
        left.close()
        right.close()


def test_echo_helper_reachable_and_closed_port(scp: Any) -> None:
    port, _seen, _rx = scp
    assert dicom_ae.echo("127.0.0.1", port, called_ae="TESTSCP", calling_ae="X") == 0
    with pytest.raises(dicom_ae.NetworkError):
        dicom_ae.echo("127.0.0.1", free_port(), called_ae="NOBODY", timeout=2)


def test_idle_association_polls_slowly_again(scp: Any) -> None:
    port, _seen, _rx = scp
    ae = dicom_ae.make_ae("TESTSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="TESTSCP")
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0
        assert assoc.dul._run_loop_delay == patches.FAST_DELAY
        # after LINGER without traffic the reactor is back to pynetdicom's 1 ms
        wait_for(lambda: assoc.dul._run_loop_delay == 0.001, 5, what="idle polling")
        assert assoc.send_c_echo().Status == 0
        assert assoc.dul._run_loop_delay == patches.FAST_DELAY
    finally:
        assoc.release()
