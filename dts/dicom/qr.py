"""Owns dts's Query/Retrieve SCU (Study Root): C-FIND, C-GET (dts the storage SCP on
the same association, SCP role negotiated per SOP class) and C-MOVE.

Each call opens one association to a ``store.Peer`` with ``store.NetSettings``, parks its
reactor (``ae.park_reactor``: the responses are the caller's) and releases it at the end.
A peer that cannot be reached, rejects the association, accepts none of the contexts or
does not answer raises ``NetworkError``; what the peer answered is returned as it came
(the final status data set), for the caller to judge.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pynetdicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_role, evt, sop_class

from . import ae as dicom_ae
from .ae import NetworkError
from .store import NetSettings, Peer

PENDING = (0xFF00, 0xFF01)
MAX_STORAGE_CONTEXTS = 127  # 128 presentation contexts at most, one is the Get context


def model(service: str) -> str:
    """The Study Root Query/Retrieve Information Model's ``service`` (Find, Get, Move)."""
    return str(getattr(sop_class, f"StudyRootQueryRetrieveInformationModel{service}"))


def _associate(peer: Peer, net: NetSettings, max_pdu: int,
               contexts: list[tuple[str, list[str] | None]],
               roles: list[Any] | None = None, handlers: list[Any] | None = None) -> Any:
    ae = dicom_ae.make_ae(peer.calling_ae, max_pdu=max_pdu, acse_timeout=net.acse_timeout,
                          dimse_timeout=net.dimse_timeout, network_timeout=net.network_timeout,
                          connection_timeout=net.connect_timeout)
    for abstract, syntaxes in contexts:
        if syntaxes is None:
            ae.add_requested_context(abstract)
        else:
            ae.add_requested_context(abstract, syntaxes)
    tls_args = (peer.tls, peer.server_name or peer.host) if peer.tls is not None else None
    try:
        assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, ext_neg=roles,
                             evt_handlers=handlers, tls_args=tls_args)
    except (OSError, RuntimeError) as exc:
        raise NetworkError(f"cannot reach {peer}: {exc}") from None
    if assoc.is_rejected:
        raise NetworkError(f"{peer} rejected the association from {peer.calling_ae}")
    if not assoc.is_established:
        raise NetworkError(f"cannot reach {peer}")
    if not assoc.accepted_contexts:
        assoc.release()
        raise NetworkError(f"{peer} accepted none of the presentation contexts proposed")
    dicom_ae.park_reactor(assoc)
    return assoc


def _status(ds: Any) -> int | None:
    return int(ds.Status) if ds is not None and "Status" in ds else None


def _final(responses: Any, peer: Peer, net: NetSettings, what: str,
           each: Callable[[int, Dataset | None], None] | None = None) -> Dataset:
    last: Dataset | None = None
    for status, ident in responses:
        code = _status(status)
        if code is None:
            raise NetworkError(f"{peer} did not answer the {what} (within "
                               f"{net.dimse_timeout:g} s, or it aborted)")
        if each is not None and code in PENDING:
            each(code, ident)
        last = status
    if last is None:
        raise NetworkError(f"{peer} did not answer the {what}")
    return last


def find(peer: Peer, net: NetSettings, identifier: Dataset, *,
         max_pdu: int = dicom_ae.DEFAULT_MAX_PDU) -> tuple[list[Dataset], Dataset]:
    """C-FIND ``identifier``: the pending answers' identifiers and the final status."""
    answers: list[Dataset] = []
    assoc = _associate(peer, net, max_pdu, [(model("Find"), None)])

    def keep(_code: int, ident: Dataset | None) -> None:
        if ident is not None:
            answers.append(ident)
    try:
        final = _final(assoc.send_c_find(identifier, model("Find")), peer, net, "C-FIND", keep)
    finally:
        if assoc.is_established:
            assoc.release()
    return answers, final


def storage_syntaxes() -> list[str]:
    """What a C-GET accepts per SOP class: uncompressed first, then everything else
    (the bytes are stored as they come, never decoded)."""
    first = [str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)]
    return first + [str(t) for t in pynetdicom.ALL_TRANSFER_SYNTAXES if str(t) not in first]


def common_storage_classes() -> list[str]:
    """The storage SOP classes proposed when the peer did not name a study's classes."""
    return [str(cx.abstract_syntax)
            for cx in pynetdicom.StoragePresentationContexts][:MAX_STORAGE_CONTEXTS]


def received_file(event: Any, tmp: Path) -> tuple[str, bool]:
    """The data set of an EVT_C_STORE as a file: (its path, whether dts wrote it here).
    pynetdicom has it in a file when it receives into files (the receiver of ``dts
    watch`` set that up), else in memory: then it is written into ``tmp``."""
    received = getattr(event.request, "_dataset_path", None)
    if isinstance(received, (str, os.PathLike)):
        return str(received), False
    own = tmp / f".qr-get-{os.getpid()}-{time.monotonic_ns()}.dcm"
    with open(own, "wb") as fh:
        fh.write(event.encoded_dataset())
    return str(own), True


def get(peer: Peer, net: NetSettings, identifier: Dataset, sop_classes: list[str],
        on_store: Callable[[Any], int], *,
        max_pdu: int = dicom_ae.DEFAULT_MAX_PDU) -> Dataset:
    """C-GET ``identifier``; each instance the peer sends back is ``on_store(event)``'s
    (an EVT_C_STORE event; its return value is the C-STORE status). The final status."""
    classes = list(dict.fromkeys(sop_classes))[:MAX_STORAGE_CONTEXTS]
    syntaxes = storage_syntaxes()
    assoc = _associate(peer, net, max_pdu,
                       [(model("Get"), None)] + [(c, syntaxes) for c in classes],
                       roles=[build_role(c, scp_role=True) for c in classes],
                       handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        return _final(assoc.send_c_get(identifier, model("Get")), peer, net, "C-GET")
    finally:
        if assoc.is_established:
            assoc.release()


def move(peer: Peer, net: NetSettings, identifier: Dataset, destination: str, *,
         max_pdu: int = dicom_ae.DEFAULT_MAX_PDU) -> Dataset:
    """C-MOVE ``identifier`` to the AE title ``destination``; the final status."""
    assoc = _associate(peer, net, max_pdu, [(model("Move"), None)])
    try:
        return _final(assoc.send_c_move(identifier, destination, model("Move")), peer, net,
                      "C-MOVE")
    finally:
        if assoc.is_established:
            assoc.release()


def suboperations(status: Dataset) -> tuple[int, int, int]:
    """(completed, failed, warning) sub-operations a final C-GET/C-MOVE response reports."""
    def count(keyword: str) -> int:
        return int(status.get(keyword, 0) or 0)
    return (count("NumberOfCompletedSuboperations"), count("NumberOfFailedSuboperations"),
            count("NumberOfWarningSuboperations"))


__all__ = [
    "PENDING",
    "NetworkError",
    "find",
    "get",
    "model",
    "move",
    "received_file",
    "suboperations",
]
