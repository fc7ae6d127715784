"""Owns every change dts makes to pynetdicom, the range of versions it is made for, and the
check that the installed pynetdicom still looks like the one the changes were written
against (docs/performance.md says what each change buys).

pynetdicom 3.0 polls: its DUL thread sleeps ``_run_loop_delay`` (1 ms) whenever a loop
finds nothing to do, and ``Association._run_reactor`` sleeps 1 ms before every look for
a complete DIMSE message. It sets neither ``TCP_NODELAY`` nor ``TCP_QUICKACK``, so
against a sender that leaves Nagle's algorithm on (Debian's dcmtk by default) every
small message waits for a delayed ACK (~40 ms), and it reads the socket 4 KiB at a time.
``tune()`` changes that, and hooks in the SCP fast path (``dts.dicom.scp``) and the
receive lock both fast paths take the socket over with (``dts.dicom.takeover``):

======================================  ==================================================
pynetdicom                              changed to
======================================  ==================================================
``association.time``                    ``_ShortSleepTime``: the reactor's 1 ms poll is
                                        0.1 ms while the association is busy
``DULServiceProvider._run_loop_delay``  a property: 0.1 ms while PDUs arrive, else 1 ms
``AssociationSocket.__init__``          wrapped: ``TCP_NODELAY`` on every socket, an
                                        accepted one's timeout is ``network_timeout``
``AssociationSocket.recv``              replaced: large reads into place, QUICKACK re-armed,
                                        a PDU longer than accepted refused unread, a
                                        peer silent mid-PDU a closed connection
``AssociationSocket.connect``           wrapped: a requestor's socket keeps a timeout,
                                        ``network_timeout``, once connected
``AssociationServer.get_request``       replaced: the TLS handshake is not made on the
                                        accepting thread (it had no deadline)
``DULServiceProvider                    wrapped: under the receive lock
._is_transport_event``
``Association._serve_request``          wrapped: the SCP fast path takes over after it
``dimse_messages.NamedTemporaryFile``   ``scp.ReceiveFile`` (``set_receive_directory``)
``dimse_messages.write_file_meta_info`` ``filemeta.encode``: any SOP Instance UID, even empty
``_config.VALIDATORS["UI"]``            every UID passes: the handler answers 0xC000
======================================  ==================================================

They are made only when the installed version is in ``SUPPORTED`` and ``problems()``
finds nothing amiss; otherwise dts runs on pynetdicom as it is (slower, both fast paths
off) and says so once in a warning. tests/test_dicom_patches.py proves the range: the
installed version is in it, ``problems()`` is empty, and the code of every function
relied on is the one reviewed (``REVIEWED``).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import linecache
import logging
import re
import socket
import tempfile
import threading
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.uid import UID

import pynetdicom
from pynetdicom import _config, association, dimse_messages, dul, presentation, transport

from . import filemeta, scp, takeover, wire

LOGGER = logging.getLogger(__name__)

# The pynetdicom versions the changes are made for: >= the first, < the second.
SUPPORTED = ((3, 0, 0), (3, 1, 0))
SUPPORTED_TEXT = "pynetdicom>=3.0.0,<3.1"  # as pyproject.toml says it (a test compares)

# Polling delay of both reactor threads once tuned (pynetdicom's default: 1 ms).
FAST_DELAY = 0.0001
# How long an association counts as busy after its last activity, and how long an
# idle reactor loop takes at most (a longer one did some work).
LINGER = 0.5
BUSY_LOOP = 0.0003

_tuned = False
_tune_lock = threading.Lock()
_originals: dict[str, Any] = {}  # what tune() replaced, by the name used in INTERNALS


def parse_version(text: str) -> tuple[int, int, int] | None:
    """(major, minor, micro) of a version string such as ``3.0.4`` or ``3.1.0rc1``."""
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    return (int(m[1]), int(m[2]), int(m[3] or 0)) if m else None


def in_range(version: str) -> bool:
    parsed = parse_version(version)
    return parsed is not None and SUPPORTED[0] <= parsed < SUPPORTED[1]


def version_ok() -> bool:
    """Whether the installed pynetdicom is one the changes are made for."""
    return in_range(str(pynetdicom.__version__))


def is_tuned() -> bool:
    return _tuned


# -- what the changes rely on --------------------------------------------------------------

@dataclass(frozen=True)
class Internal:
    """One pynetdicom internal a change relies on, and how it must look."""

    name: str                        # below ``pynetdicom``, e.g. "dul.DULServiceProvider.run"
    why: str
    source: tuple[str, ...] = ()     # fragments its code must hold
    params: tuple[str, ...] | None = None  # its parameters, for one that is called or replaced


INTERNALS: tuple[Internal, ...] = (
    Internal("association.time", "the reactor's sleeps go through this module attribute"),
    Internal("association.Association._run_reactor",
             "short reactor polls; the SCP fast path runs from _serve_request; parking",
             source=("time.sleep(0.001)", "self._serve_request(msg, cast(int, context_id))",
                     "self._is_paused = True", "self._reactor_checkpoint.wait()",
                     "self.dimse.get_msg(block=False)")),
    Internal("association.Association._serve_request", "wrapped: the SCP fast path",
             params=("self", "msg", "context_id")),
    Internal("association.Association.__init__", "attributes the fast paths read or set",
             source=("self._accepted_cx", "self._reactor_checkpoint", "self._is_paused",
                     "self._kill")),
    Internal("dul.DULServiceProvider.__init__", "replaced by a property: _run_loop_delay",
             source=("self._run_loop_delay = 0.001", "self._idle_timer")),
    Internal("dul.DULServiceProvider.run_reactor", "the DUL's poll is _run_loop_delay",
             source=("time.sleep(self._run_loop_delay)", "self._is_transport_event()")),
    Internal("dul.DULServiceProvider._is_transport_event",
             "wrapped under the receive lock: it looks at the socket and reads a PDU",
             source=("self.socket.ready", "self._read_pdu_data()"), params=("self",)),
    Internal("dul.DULServiceProvider._read_pdu_data",
             "reads a PDU through socket.recv(): the header, then the body it announces; "
             "an empty header is a closed connection",
             source=("self.socket.recv(6)", "self.socket.recv(pdu_length)",
                     "except struct.error:", 'self.event_queue.put("Evt17")')),
    Internal("transport.AssociationSocket.__init__",
             "wrapped: TCP_NODELAY; an accepted socket (_is_connected) gets a timeout",
             source=("self.socket = client_socket", "self._create_socket(",
                     "self._assoc = assoc", "self._is_connected = True")),
    Internal("transport.AssociationSocket.recv",
             "replaced: exact reads in large chunks, PDUs longer than accepted refused",
             params=("self", "nr_bytes")),
    Internal("transport.AssociationSocket.close",
             "the SCP fast path closes a connection whose PDU it refuses",
             source=("self._shutdown_socket()", 'self.event_queue.put("Evt17")'),
             params=("self",)),
    Internal("transport.AssociationSocket.ready", "QuietSocket overrides this property"),
    Internal("transport.AssociationSocket.connect",
             "wrapped: a connected requestor socket gets network_timeout (pynetdicom clears it)",
             source=("self.socket.settimeout(None)", "self._is_connected = True"),
             params=("self", "primitive")),
    Internal("transport.AssociationServer.get_request",
             "replaced: accepts, and wraps a TLS socket without its handshake",
             source=("self.socket.accept()", "self.ssl_context.wrap_socket(",
                     "server_side=True"), params=("self",)),
    Internal("dimse.DIMSEServiceProvider.receive_primitive",
             "the SCP fast path hands a request it does not serve to it",
             source=("self.message = None", "self.msg_queue.put("), params=("self", "primitive")),
    Internal("dimse_messages.DIMSEMessage.decode_msg",
             "received data sets go into files made by NamedTemporaryFile",
             source=("NamedTemporaryFile(delete=False", "_config.STORE_RECV_CHUNKED_DATASET",
                     "write_file_meta_info(")),
    Internal("dimse_messages.NamedTemporaryFile", "replaced: scp.ReceiveFile"),
    Internal("dimse_messages.write_file_meta_info",
             "replaced: filemeta.encode, which writes an empty or overlong SOP Instance UID "
             "too (pydicom raises in the DUL thread, the peer gets no answer)",
             params=("fp", "file_meta", "enforce_standard")),
    Internal("dimse_primitives.DIMSEPrimitive._AffectedSOPInstanceUID",
             "an empty UID is set past its setter (which makes it None, an invalid request "
             "pynetdicom leaves unanswered)", source=("self._affected_sop_instance_uid",)),
    Internal("_config.VALIDATORS", "UI: every UID reaches the store handler, which answers "
             "0xC000 (pynetdicom aborts on a UID longer than 64 characters)"),
    Internal("service_class.StorageServiceClass.SCP",
             "removes a received file the handler left (ReceiveFile has .name)",
             source=("os.unlink(req._dataset_file.name)",)),
    Internal("dsutils.create_file_meta", "filemeta.encode writes what pydicom writes of it",
             source=("PYNETDICOM_IMPLEMENTATION_UID", "PYNETDICOM_IMPLEMENTATION_VERSION")),
    Internal("_config.STORE_RECV_CHUNKED_DATASET", "received data sets into files"),
    Internal("_config.STORE_SEND_CHUNKED_DATASET", "files sent as encoded"),
    Internal("pdu_primitives.P_DATA.presentation_data_value_list",
             "the SCP fast path builds a P-DATA for pynetdicom's DIMSE layer"),
    Internal("acse.ACSE._negotiate_as_requestor",
             "ae.associate: a rejection read before the socket check stays in to_user_queue",
             source=("if not socket._is_connected:", "self.dul.receive_pdu(wait=True")),
    Internal("dul.DULServiceProvider.receive_pdu", "the queue ae.associate looks in",
             source=("self.to_user_queue.get(",)),
    Internal("transport.RequestHandler._create_association",
             "deep-copies the server's presentation contexts for every accepted association",
             source=("deepcopy(self.server.contexts)",)),
    Internal("presentation.PresentationContext.__init__",
             "PresentationContext.__deepcopy__: these fields, the transfer syntaxes a list",
             source=("self._context_id", "self._abstract_syntax", "self._transfer_syntax",
                     "self.result", "self._scu_role", "self._scp_role", "self._as_scp",
                     "self._as_scu")),
)


def resolve(name: str) -> Any:
    """The object ``pynetdicom.<name>`` as pynetdicom defines it (before dts's changes);
    AttributeError/ImportError when it does not exist."""
    if name in _originals:
        return _originals[name]
    module_name, _, rest = name.partition(".")
    obj: Any = __import__(f"pynetdicom.{module_name}", fromlist=["_"])
    for part in rest.split("."):
        # from a class: the attribute as defined (a property, not its value on the class)
        obj = obj.__dict__[part] if isinstance(obj, type) and part in obj.__dict__ \
            else getattr(obj, part)
    return obj


def _code_of(obj: Any) -> Any:
    obj = obj.fget if isinstance(obj, property) else obj
    while hasattr(obj, "__wrapped__"):
        obj = obj.__wrapped__
    return obj


def source_of(name: str) -> str:
    """The source code of a relied-on function, as pynetdicom wrote it: its lines from
    the first to the last that holds code. (Cheaper than ``inspect.getsource``, which
    tokenizes: ``tune()`` checks at every start of a dts command.)"""
    code = _code_of(resolve(name)).__code__
    lines = linecache.getlines(code.co_filename)
    if not lines:
        raise OSError(f"no source for {code.co_filename}")
    return "".join(lines[code.co_firstlineno - 1:_last_line(code)])


def _last_line(code: types.CodeType) -> int:
    nested = [_last_line(c) for c in code.co_consts if isinstance(c, types.CodeType)]
    return max([line for _start, _end, line in code.co_lines() if line is not None] + nested)


def fingerprint(name: str) -> str:
    """A short digest of ``source_of(name)``: it changes whenever that code changes."""
    return hashlib.sha256(source_of(name).encode()).hexdigest()[:16]


def fingerprints() -> dict[str, str]:
    """``fingerprint`` of every relied-on function pynetdicom defines (not of plain
    attributes, nor of what it imports from elsewhere)."""
    out: dict[str, str] = {}
    for internal in INTERNALS:
        try:
            code = _code_of(resolve(internal.name))
        except (AttributeError, ImportError, KeyError):
            continue
        if inspect.isfunction(code) and code.__module__.startswith("pynetdicom"):
            out[internal.name] = fingerprint(internal.name)
    return out


def problems() -> list[str]:
    """Why the changes would not fit the installed pynetdicom ([] when they do)."""
    found: list[str] = []
    for internal in INTERNALS:
        try:
            obj = resolve(internal.name)
        except (AttributeError, ImportError, KeyError):
            found.append(f"pynetdicom.{internal.name} is gone ({internal.why})")
            continue
        if internal.source:
            try:
                code = source_of(internal.name)
            except (OSError, TypeError):
                found.append(f"pynetdicom.{internal.name}: its source cannot be read")
                continue
            missing = [s for s in internal.source if s not in code]
            if missing:
                found.append(f"pynetdicom.{internal.name} changed ({internal.why}): no "
                             + ", ".join(repr(s) for s in missing))
        if internal.params is not None:
            try:
                params = tuple(inspect.signature(_code_of(obj)).parameters)
            except (TypeError, ValueError):
                params = ()
            if params != internal.params:
                found.append(f"pynetdicom.{internal.name} takes {params}, not "
                             f"{internal.params} ({internal.why})")
    try:
        if not isinstance(resolve("association.time"), types.ModuleType):
            found.append("pynetdicom.association.time is not the time module")
    except AttributeError:
        pass  # said above
    return found


# The code of the functions relied on, as reviewed: pynetdicom 3.0.0, 3.0.1, 3.0.3 and
# 3.0.4 (there is no 3.0.2 on PyPI) all have exactly this code. A new pynetdicom whose
# code differs fails tests/test_dicom_patches.py until someone has read the difference,
# made sure every change here still holds, and recorded the new digest.
REVIEWED: dict[str, str] = {
    "association.Association._run_reactor": "f28838c5559e462a",
    "association.Association._serve_request": "2f24c1759cdf6c8c",
    "association.Association.__init__": "eb07516b8009ad8f",
    "dul.DULServiceProvider.__init__": "c82dafa9438ddf70",
    "dul.DULServiceProvider.run_reactor": "e3a10eb3a0931e48",
    "dul.DULServiceProvider._is_transport_event": "8725ed03bb8fbdef",
    "dul.DULServiceProvider._read_pdu_data": "19f2d4e38c13c835",
    "transport.AssociationSocket.__init__": "1f0325fdef2cc353",
    "transport.AssociationSocket.recv": "6bc20a33b1b7cfe7",
    "transport.AssociationSocket.ready": "3eb58e3d39dc076d",
    "transport.AssociationSocket.close": "c726c8db53813d55",
    "transport.AssociationServer.get_request": "925a4f3a3042f6e4",
    "transport.AssociationSocket.connect": "aeeeae413bd339dc",
    "dimse.DIMSEServiceProvider.receive_primitive": "5f99c86b14a15cef",
    "dimse_messages.DIMSEMessage.decode_msg": "f51c777e841a76be",
    "dimse_primitives.DIMSEPrimitive._AffectedSOPInstanceUID": "9277bce0ad4d990f",
    "service_class.StorageServiceClass.SCP": "63afca7fc6c6e7ee",
    "dsutils.create_file_meta": "035ed415f5aeea15",
    "pdu_primitives.P_DATA.presentation_data_value_list": "9f2d171cdd1e929b",
    "acse.ACSE._negotiate_as_requestor": "507959152c5896c6",
    "dul.DULServiceProvider.receive_pdu": "fa67339834ca998c",
    "transport.RequestHandler._create_association": "05c8d12b79863cdb",
    "presentation.PresentationContext.__init__": "37a8842ac07cd8f3",
}


# -- the changes ---------------------------------------------------------------------------

class _ShortSleepTime:
    """Stands in for the ``time`` module inside ``pynetdicom.association``: only the
    reactor's 1 ms poll changes. It becomes ``FAST_DELAY`` while the association is
    busy (a loop that took longer than an idle one did some work within ``LINGER``)
    and stays 1 ms on an idle association, which would otherwise cost CPU for nothing."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self._local = threading.local()

    def sleep(self, seconds: float) -> None:
        if seconds != 0.001:
            time.sleep(seconds)
            return
        local = self._local
        now = time.monotonic()
        if now - getattr(local, "woke", 0.0) > BUSY_LOOP:
            local.busy_until = now + LINGER
        time.sleep(self.delay if now < getattr(local, "busy_until", 0.0) else seconds)
        local.woke = time.monotonic()

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def _dul_delay(self: dul.DULServiceProvider) -> float:
    """``DULServiceProvider._run_loop_delay``: short while PDUs arrive, 1 ms when idle."""
    last = getattr(self.socket, "_dts_last_rx", 0.0)
    return FAST_DELAY if time.monotonic() - last < LINGER else 0.001


def _ignore_delay(self: dul.DULServiceProvider, value: float) -> None:
    pass  # pynetdicom's __init__ assigns its 1 ms; the property decides


def _recv(self: transport.AssociationSocket, nr_bytes: int) -> bytearray:
    """``AssociationSocket.recv`` reading large chunks straight into the result buffer
    and re-arming TCP_QUICKACK before each read. Same contract as the original:
    blocks until ``nr_bytes`` are read, returns less only when the peer closed.

    pynetdicom reads a PDU as its 6-byte header, then a body of the length the header
    announced (``DULServiceProvider._read_pdu_data``). A header announcing more than dts
    accepts (``wire.pdu_limit``) is refused before its body is read: the peer gets an
    A-ABORT (an A-ASSOCIATE-RJ for an association request) and pynetdicom is told the
    connection closed (nothing read), which it then closes."""
    sock = self.socket
    assert sock is not None
    self._dts_last_rx = time.monotonic()  # type: ignore[attr-defined]
    body = self.__dict__.pop("_dts_body", None)  # the header's length, when read last
    # An accepted connection's first PDU (its A-ASSOCIATE-RQ) must be whole by this time
    # however slowly it trickles in (set in __init__, dropped once that PDU is read).
    deadline = self.__dict__.get("_dts_rq_deadline")
    timeout = sock.gettimeout() if deadline is not None else None
    try:
        data = wire.recv_exact(sock, nr_bytes, ack=True, deadline=deadline)
    except TimeoutError:
        # Silent mid-PDU for network_timeout (the socket's timeout, see __init__), or no
        # whole request in time: the connection is as good as closed; pynetdicom is told
        # so and closes it.
        if deadline is not None and time.monotonic() >= deadline:
            LOGGER.warning("%s sent no whole association request within %ss of "
                           "connecting: closing the connection", _peer(sock), timeout)
        else:
            LOGGER.warning("%s sent nothing for %ss in the middle of a PDU: closing the "
                           "connection", _peer(sock), sock.gettimeout())
        return bytearray()
    finally:
        if deadline is not None:
            _restore_timeout(sock, timeout)
    if body is not None and deadline is not None:
        del self._dts_rq_deadline  # type: ignore[attr-defined]
    if body is None and nr_bytes == wire.PDU_HEADER_LEN == len(data):
        pdu_type, length = wire.pdu_header(data)
        if pdu_type in wire.PDU_TYPES:  # else pynetdicom reads no body
            if _refuse(self, sock, pdu_type, length):
                return bytearray()
            self._dts_body = length  # type: ignore[attr-defined]
    return data


def _restore_timeout(sock: Any, timeout: float | None) -> None:
    try:
        sock.settimeout(timeout)
    except OSError:
        pass  # closed meanwhile


def _refuse(self: transport.AssociationSocket, sock: Any, pdu_type: int, length: int) -> bool:
    """Refuse a PDU announcing ``length`` bytes if that is more than dts accepts on this
    association (``wire.pdu_limit`` of the maximum length it advertised); True if so."""
    assoc = getattr(self, "_assoc", None)
    local = None if assoc is None else assoc.acceptor if assoc.is_acceptor else assoc.requestor
    limit = wire.pdu_limit(pdu_type, int(getattr(local, "maximum_length", 0) or 0))
    if limit is None or length <= limit:
        return False
    rq = pdu_type == wire.A_ASSOCIATE_RQ and assoc is not None and assoc.is_acceptor \
        and not assoc.is_established
    LOGGER.warning("%s from %s announces %d bytes, more than the %d accepted: %s",
                   wire.pdu_name(pdu_type), _peer(sock), length, limit,
                   "rejected" if rq else "aborted")
    try:
        sock.settimeout(1.0)  # a peer that does not read gets no answer, not our thread
        sock.sendall(wire.a_associate_rj() if rq else wire.a_abort())
    except (OSError, ValueError):
        pass
    return True


def _peer(sock: Any) -> str:
    """How a log line names the peer of ``sock``."""
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return "a peer"
    return f"{host}:{port}"


def _patch_socket_init(original: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(original)
    def __init__(self: transport.AssociationSocket, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        # Requestor sockets are tuned before connect(), accepted ones right away;
        # TLS wraps the same descriptor, so the options survive the handshake.
        wire.set_nodelay(self.socket)
        if self.socket is not None and self._is_connected:
            # An accepted socket is blocking without a timeout (socket.accept() does not
            # pass the listening socket's on): a peer that stops halfway through a PDU
            # would hold pynetdicom's reader (a non-daemon thread) for ever. With it, no
            # read waits longer than network_timeout for the next byte (``_recv``).
            timeout = getattr(self._assoc, "network_timeout", None)
            if timeout is not None:
                try:
                    self.socket.settimeout(timeout)
                except OSError:
                    pass
                # ... and its A-ASSOCIATE-RQ must be whole within it of the accept, not
                # only have no gap that long (a byte at a time held a place for ever).
                self._dts_rq_deadline = time.monotonic() + timeout  # type: ignore

    __init__._dts_tuned = True  # type: ignore[attr-defined]
    return __init__


def _patch_connect(original: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(original)
    def connect(self: transport.AssociationSocket, primitive: Any) -> None:
        original(self, primitive)
        # pynetdicom clears the socket's timeout once connected: a peer that stopped
        # halfway through a PDU (its A-ASSOCIATE-AC, a C-STORE response) held dts echo
        # and dts send for ever. With network_timeout on it, such a read ends (``_recv``:
        # as a closed connection) and the association with it.
        timeout = getattr(self._assoc, "network_timeout", None)
        if self._is_connected and self.socket is not None and timeout is not None:
            try:
                self.socket.settimeout(timeout)
            except OSError:
                pass

    connect._dts_tuned = True  # type: ignore[attr-defined]
    return connect


def _get_request(self: transport.AssociationServer) -> tuple[Any, Any]:
    """``AssociationServer.get_request`` without the TLS handshake. pynetdicom makes it
    here, on the one thread that accepts every connection, with no deadline: a peer that
    connected and sent nothing kept the station from accepting anyone else. The socket
    is wrapped unshaken; the handshake happens with the connection's first read, on its
    own thread, bounded by the socket's timeout and the ACSE timeout (network_timeout)."""
    listening = self.socket
    assert listening is not None
    client, address = listening.accept()
    if self.ssl_context:
        client = self.ssl_context.wrap_socket(client, server_side=True,
                                              do_handshake_on_connect=False)
    return client, address


def _copy_context(self: presentation.PresentationContext,
                  memo: dict[int, Any]) -> presentation.PresentationContext:
    """``copy.deepcopy`` of a presentation context: pynetdicom copies every context the
    receiver supports for each association it accepts (171 SOP classes, 7,654 transfer
    syntaxes: 35 ms of CPU an association, pydicom validating each UID again). The same
    fields, a list of transfer syntaxes of its own; the UIDs (immutable strings) shared."""
    new = self.__class__.__new__(self.__class__)
    new.__dict__.update(self.__dict__)
    new._transfer_syntax = list(self._transfer_syntax)
    memo[id(self)] = new
    return new


def _serve_request(self: association.Association, msg: Any, context_id: int) -> None:
    """``Association._serve_request``, after which the SCP fast path may keep the
    association's socket (``scp.take``)."""
    _answerable(msg)
    loop = scp.take(self, msg)
    try:
        _originals["association.Association._serve_request"](self, msg, context_id)
    except BaseException:
        if loop is not None:
            loop.give()
        raise
    if loop is not None:
        loop.run()


def _answerable(msg: Any) -> None:
    """A C-STORE-RQ with an empty Affected SOP Instance UID, which pynetdicom would drop
    unanswered (its primitive holds None, so it is no valid request), gets an empty UID:
    it reaches the store handler, which refuses it with 0xC000."""
    if (type(msg).__name__ == "C_STORE" and msg.MessageIDBeingRespondedTo is None
            and msg.MessageID is not None and msg.AffectedSOPInstanceUID is None):
        msg._affected_sop_instance_uid = UID("")


def tune() -> bool:
    """Apply dts's changes to pynetdicom once per process; True when applied.

    With a pynetdicom outside ``SUPPORTED``, or one whose internals do not look as
    expected, nothing is changed (the station still works, only slower) and a warning
    says so.
    """
    global _tuned
    with _tune_lock:
        if _tuned:
            return True
        if not version_ok():
            LOGGER.warning("pynetdicom %s is installed, dts is tuned for %s: running "
                           "without its network tuning", pynetdicom.__version__,
                           SUPPORTED_TEXT)
            return False
        found = problems()
        if found:
            LOGGER.warning("pynetdicom %s does not look as dts expects, running without its "
                           "network tuning: %s", pynetdicom.__version__, "; ".join(found))
            return False
        _originals.update({
            "association.time": association.time,
            "association.Association._serve_request": association.Association._serve_request,
            "dul.DULServiceProvider._is_transport_event":
                dul.DULServiceProvider._is_transport_event,
            "transport.AssociationSocket.recv": transport.AssociationSocket.recv,
            "transport.AssociationSocket.__init__": transport.AssociationSocket.__init__,
            "transport.AssociationServer.get_request": transport.AssociationServer.get_request,
            "transport.AssociationSocket.connect": transport.AssociationSocket.connect,
        })
        association.time = _ShortSleepTime(FAST_DELAY)  # type: ignore[assignment]
        dul.DULServiceProvider._run_loop_delay = property(  # type: ignore[assignment]
            _dul_delay, _ignore_delay)
        transport.AssociationSocket.__init__ = _patch_socket_init(  # type: ignore[method-assign]
            transport.AssociationSocket.__init__)
        transport.AssociationSocket.recv = _recv  # type: ignore[method-assign]
        transport.AssociationServer.get_request = _get_request  # type: ignore[method-assign]
        transport.AssociationSocket.connect = _patch_connect(  # type: ignore[method-assign]
            transport.AssociationSocket.connect)
        association.Association._serve_request = _serve_request  # type: ignore[method-assign]
        presentation.PresentationContext.__deepcopy__ = _copy_context  # type: ignore[attr-defined]
        locked = takeover.locked_transport_event(dul.DULServiceProvider._is_transport_event)
        dul.DULServiceProvider._is_transport_event = locked  # type: ignore
        _tuned = True
        return True


def set_receive_directory(path: Path | None) -> None:
    """Have pynetdicom write received C-STORE data sets into files under ``path``
    (the spool's ``tmp/``: same filesystem, so the handler can rename them into
    place); None goes back to holding them in memory. Process-wide."""
    if path is None:
        _config.STORE_RECV_CHUNKED_DATASET = False
        dimse_messages.NamedTemporaryFile = tempfile.NamedTemporaryFile  # type: ignore
        dimse_messages.write_file_meta_info = _PYDICOM_WRITE_FILE_META  # type: ignore
        _config.VALIDATORS["UI"] = _PYNETDICOM_VALIDATE_UI
        return
    folder = str(path)

    def factory(*args: Any, **kwargs: Any) -> scp.ReceiveFile:
        return scp.ReceiveFile(folder)

    _config.STORE_RECV_CHUNKED_DATASET = True
    dimse_messages.NamedTemporaryFile = factory  # type: ignore
    # A request whose UIDs dts refuses must still reach the handler, which answers it
    # (0xC000): pynetdicom would abort the association on a UID longer than 64 characters
    # (its UI validator) and kill its DUL thread on an empty SOP Instance UID (pydicom
    # refuses to write such file meta). dts checks every UID itself (``uid.valid_uid``).
    dimse_messages.write_file_meta_info = _write_file_meta  # type: ignore
    _config.VALIDATORS["UI"] = _any_uid


_PYDICOM_WRITE_FILE_META = dimse_messages.write_file_meta_info
_PYNETDICOM_VALIDATE_UI = _config.VALIDATORS["UI"]


def _write_file_meta(fp: Any, file_meta: Any, enforce_standard: bool = True) -> None:
    """pydicom's ``write_file_meta_info`` for a received data set (after the preamble and
    ``DICM``), the same bytes (``filemeta.encode``), but written for any UID, even empty."""
    fp.write(filemeta.encode(str(file_meta.get("MediaStorageSOPClassUID", "") or ""),
                             str(file_meta.get("MediaStorageSOPInstanceUID", "") or ""),
                             str(file_meta.get("TransferSyntaxUID", "") or ""))
             [filemeta.PREAMBLE + 4:])


def _any_uid(value: Any) -> tuple[bool, str]:
    """pynetdicom's UI validator on the receiving side: every UID passes (dts judges)."""
    return True, ""


def send_files_as_encoded() -> None:
    """pynetdicom's ``send_c_store(path)`` streams a file's data set as encoded instead
    of decoding and re-encoding it."""
    _config.STORE_SEND_CHUNKED_DATASET = True


_handed: socket.socket | None = None  # serve_handed_connections()


def serve_handed_connections(channel: socket.socket) -> None:
    """The association server of this process takes its connections from ``channel``,
    instead of listening itself: a receive worker's end of the Unix socket pair over
    which its supervisor hands it each accepted connection (``dts.receivepool``).
    Process-wide: only a worker calls it, before it starts its one server. Independent of
    ``tune()``: a pynetdicom dts is not tuned for still gets its connections."""
    global _handed
    _handed = channel
    bind = transport.AssociationServer.server_bind
    if getattr(bind, "_dts_handed", False):
        return
    activate = transport.AssociationServer.server_activate
    get_request = transport.AssociationServer.get_request

    def server_bind(self: Any) -> None:
        if _handed is None:
            bind(self)
            return
        self.socket.close()  # the TCP socket socketserver made: never bound
        self.socket = _handed

    def server_activate(self: Any) -> None:
        if _handed is None:
            activate(self)

    def get_handed_request(self: Any) -> tuple[Any, Any]:
        if _handed is None or self.socket is not _handed:
            return get_request(self)
        client, address = _handed_connection(_handed)
        if self.ssl_context:  # the handshake with the first read, as _get_request does
            client = self.ssl_context.wrap_socket(client, server_side=True,
                                                  do_handshake_on_connect=False)
        return client, address

    server_bind._dts_handed = True  # type: ignore[attr-defined]
    transport.AssociationServer.server_bind = server_bind  # type: ignore[method-assign]
    transport.AssociationServer.server_activate = server_activate  # type: ignore[method-assign]
    transport.AssociationServer.get_request = get_handed_request  # type: ignore[method-assign]


def _handed_connection(channel: socket.socket) -> tuple[socket.socket, Any]:
    """The next connection the supervisor handed over ``channel`` (one byte and one
    descriptor per message); OSError when the message holds none (the supervisor is
    gone: its end of file)."""
    message, fds, _, _ = socket.recv_fds(channel, 16, 1)
    if not fds:
        if not message:
            time.sleep(0.05)  # end of file: the worker sees its supervisor gone and ends
        raise OSError("no connection in the receive supervisor's message")
    client = socket.socket(fileno=fds[0])
    try:
        return client, client.getpeername()
    except OSError:
        client.close()  # the peer is gone already
        raise
