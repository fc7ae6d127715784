"""Guards dts's changes to pynetdicom: they must apply to the installed version and work
on a live association (socket options, short polling, large reads, files in a folder)."""

from __future__ import annotations

import inspect
import socket
import threading
from pathlib import Path
from typing import Any

import pydicom
import pynetdicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import association, dimse, dimse_messages, dul, evt, service_class, transport
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from dts import dicomnet
from tests.helpers import free_port, make_instance, wait_for


def _original(fn: Any) -> Any:
    while hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
    return fn


def test_pinned_pynetdicom_still_has_what_tune_changes() -> None:
    assert pynetdicom.__version__ == dicomnet.PINNED_VERSION
    assert dicomnet.version_ok()
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
    # what the fast C-STORE path (dts.scp) relies on
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
    """A pynetdicom method as pynetdicom wrote it, even after dts.scp.install()."""
    from dts import scp

    originals = {"_serve_request": scp._original_serve,
                 "_is_transport_event": scp._original_transport_event}
    return originals.get(name) or getattr(cls, name)


def test_tune_is_idempotent() -> None:
    assert dicomnet.tune()
    assert dicomnet.tune()
    assert isinstance(dul.DULServiceProvider.__dict__["_run_loop_delay"], property)
    sinit = transport.AssociationSocket.__init__
    assert not getattr(sinit.__wrapped__, "_dts_tuned", False), "wrapped twice"
    assert transport.AssociationSocket.recv is dicomnet._recv
    assert isinstance(association.time, dicomnet._ShortSleepTime)
    from dts import scp

    assert association.Association._serve_request is scp._serve_request
    assert dul.DULServiceProvider._is_transport_event is scp._is_transport_event
    assert scp._original_serve is not scp._serve_request  # installed once, not wrapped twice


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

    ae = dicomnet.make_ae("TESTSCP")
    dicomnet.add_scp_contexts(ae)
    dicomnet.set_receive_directory(rx)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_ECHO, on_echo), (evt.EVT_C_STORE, on_store)])
    yield port, seen, rx
    server.shutdown()
    dicomnet.set_receive_directory(None)


def test_live_association_is_tuned_on_both_ends(scp: Any, tmp_path: Path) -> None:
    port, seen, rx = scp
    ae = dicomnet.make_ae("TESTSCU")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="TESTSCP")
    assert assoc.is_established
    try:
        assert _opts(assoc.dul.socket.socket)["nodelay"] == 1
        assert assoc.dul._run_loop_delay == dicomnet.FAST_DELAY
        assert assoc.send_c_echo().Status == 0
        # a 2 MiB image: many large reads through the replaced recv()
        path = make_instance(tmp_path / "big.dcm", study_uid=generate_uid(),
                             series_uid=generate_uid(), rows=1024, cols=1024)
        status = assoc.send_c_store(path)
        assert status.Status == 0
    finally:
        assoc.release()
    assert seen["acceptor"]["nodelay"] == 1
    assert seen["acceptor_delay"] == dicomnet.FAST_DELAY  # busy: short polls
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

    left, right = _tcp_pair()
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


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    left = socket.create_connection(srv.getsockname())
    right, _ = srv.accept()
    srv.close()
    return left, right


def test_echo_helper_reachable_and_closed_port(scp: Any) -> None:
    port, _seen, _rx = scp
    assert dicomnet.echo("127.0.0.1", port, called_ae="TESTSCP", calling_ae="X") == 0
    with pytest.raises(dicomnet.NetworkError):
        dicomnet.echo("127.0.0.1", free_port(), called_ae="NOBODY", timeout=2)


def test_idle_association_polls_slowly_again(scp: Any) -> None:
    port, _seen, _rx = scp
    ae = dicomnet.make_ae("TESTSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="TESTSCP")
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0
        assert assoc.dul._run_loop_delay == dicomnet.FAST_DELAY
        # after LINGER without traffic the reactor is back to pynetdicom's 1 ms
        wait_for(lambda: assoc.dul._run_loop_delay == 0.001, 5, what="idle polling")
        assert assoc.send_c_echo().Status == 0
        assert assoc.dul._run_loop_delay == dicomnet.FAST_DELAY
    finally:
        assoc.release()
