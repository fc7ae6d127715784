"""Owns the C-STORE requestor: DICOM objects on disk delivered to a peer, fast.

``store(peer, items)`` opens one association proposing exactly the presentation contexts
the objects need (each object's own SOP class and transfer syntax, plus an uncompressed
fallback per class), sends every object as encoded on disk (decoding only when the peer
accepted nothing but another transfer syntax), and says per instance what happened:
delivered, delivered with a warning, refused (with the status), or still missing because
the association broke (why). A dropped association that had made progress is reopened a
few times within one call. Retries over time, state and events are the send stage's
(``dts.sender``).

Speed: the exchange of C-STORE requests and responses on an established association is
done by ``dts.dicom.scu``, not by pynetdicom's per-fragment machinery; association,
release and abort stay pynetdicom's (tuned by ``dts.dicom.patches``). With a pynetdicom
outside the supported range, pynetdicom's ``send_c_store`` does it all.
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext, build_context

from ..config import StationConfig
from ..errors import UsageError
from . import ae as dicom_ae
from . import filemeta, patches, scu

log = logging.getLogger(__name__)

UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
MAX_CONTEXTS = 128  # presentation contexts one association can propose (odd ids 1..255)
NO_CONTEXT = "no-context"  # a failed instance's status when the peer accepted no context
RECONNECTS = 3  # new associations within one try, as long as each one made progress


# -- what is sent -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Item:
    """One DICOM object to deliver, as found on disk."""

    path: Path
    sop_uid: str
    sop_class: str
    transfer_syntax: str
    has_meta: bool = True  # file meta present: it can be streamed from disk as encoded


def read_item(path: Path) -> Item | None:
    """The identity of a DICOM file from its header; None for a file that is not DICOM."""
    try:
        with open(path, "rb") as fh:
            fm = filemeta.read(fh)
        if fm and fm.sop_class and fm.sop_instance and fm.transfer_syntax:
            return Item(path, fm.sop_instance, fm.sop_class, fm.transfer_syntax)
    except OSError:
        pass
    try:
        meta = read_file_meta_info(path)
        uid, cls, ts = (meta.get("MediaStorageSOPInstanceUID"),
                        meta.get("MediaStorageSOPClassUID"), meta.get("TransferSyntaxUID"))
        if uid and cls and ts:
            return Item(path, str(uid), str(cls), str(ts))
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError):
        pass
    try:  # no (complete) file meta: a bare data set, read up to the pixels only
        ds = dcmread(path, stop_before_pixels=True, force=True,
                     specific_tags=["SOPClassUID", "SOPInstanceUID"])
        uid, cls = ds.get("SOPInstanceUID"), ds.get("SOPClassUID")
        if not (uid and cls):
            return None
        implicit = ds.original_encoding[0]
        ts = ImplicitVRLittleEndian if implicit in (True, None) else ExplicitVRLittleEndian
        return Item(path, str(uid), str(cls), str(ts), has_meta=False)
    except Exception:  # anything pydicom cannot make sense of is simply not DICOM
        return None


def collect_files(paths: Iterable[Path]) -> Iterator[Path]:
    """Files named, and files under folders named, in a stable order."""
    for p in paths:
        if p.is_dir():
            for dirpath, dirnames, files in os.walk(p):
                dirnames.sort()
                for name in sorted(files):
                    yield Path(dirpath) / name
        elif p.is_file():
            yield p
        else:
            raise UsageError(f"no such file or folder: {p}")


def scan(paths: Iterable[Path]) -> tuple[list[Item], list[Path]]:
    """DICOM objects (first file of each SOP Instance UID) and the other files."""
    items: list[Item] = []
    other: list[Path] = []
    seen: set[str] = set()
    for f in collect_files(paths):
        item = read_item(f)
        if item is None:
            other.append(f)
        elif item.sop_uid not in seen:
            seen.add(item.sop_uid)
            items.append(item)
    return items, other


# -- DICOM delivery ------------------------------------------------------------------------

@dataclass(frozen=True)
class Peer:
    """A DICOM node to store to."""

    name: str
    ae_title: str
    host: str
    port: int
    calling_ae: str
    tls: ssl.SSLContext | None = None
    server_name: str | None = None  # the name the peer's certificate is checked against

    def __str__(self) -> str:
        return f"{self.name} ({self.ae_title}@{self.host}:{self.port}{' TLS' if self.tls else ''})"


@dataclass(frozen=True)
class NetSettings:
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    connect_timeout: float = 10.0

    @classmethod
    def of(cls, station: StationConfig) -> NetSettings:
        return cls(acse_timeout=min(station.network_timeout, 30.0),
                   dimse_timeout=station.dimse_timeout, network_timeout=station.network_timeout,
                   connect_timeout=min(station.network_timeout, 10.0))


@dataclass
class Delivery:
    """What one try to deliver a set of objects to one DICOM peer achieved."""

    sent: list[str] = field(default_factory=list)
    warnings: dict[str, int] = field(default_factory=dict)   # delivered with a warning
    failed: dict[str, str] = field(default_factory=dict)     # SOPInstanceUID -> status
    reasons: dict[str, str] = field(default_factory=dict)    # SOPInstanceUID -> why
    temporary: str | None = None   # why the rest is still missing (retry later)
    refused: str | None = None     # the peer refused the association for good


OnResult = Callable[[Item, str, int | None], None]  # item, "sent"|"warning"|"failed", status


def tune() -> None:
    """pynetdicom as dts wants it for sending (idempotent)."""
    patches.tune()  # short reactor polls, TCP_NODELAY and TCP_QUICKACK
    patches.send_files_as_encoded()


def propose(items: Iterable[Item]) -> list[PresentationContext]:
    """Exactly the presentation contexts these objects need: one per SOP class and
    transfer syntax they are in (so the peer can accept each as it is), plus one
    uncompressed fallback per SOP class."""
    syntaxes: dict[str, list[str]] = {}
    for it in items:
        ts = syntaxes.setdefault(it.sop_class, [])
        if it.transfer_syntax not in ts:
            ts.append(it.transfer_syntax)
    contexts: list[PresentationContext] = []
    for cls, tss in syntaxes.items():
        for one in tss:
            contexts.append(build_context(cls, one))
        fallback: list[str | UID] = [ts for ts in UNCOMPRESSED if ts not in tss]
        if fallback:
            contexts.append(build_context(cls, fallback))
    return contexts


def _groups(items: list[Item]) -> list[list[Item]]:
    """Items split by SOP class into groups whose contexts fit one association."""
    by_class: dict[str, list[Item]] = {}
    for it in items:
        by_class.setdefault(it.sop_class, []).append(it)
    groups: list[list[Item]] = [[]]
    size = 0
    for cls_items in by_class.values():
        need = len(propose(cls_items))
        if size and size + need > MAX_CONTEXTS:
            groups.append([])
            size = 0
        groups[-1].extend(cls_items)
        size += need
    return [g for g in groups if g]


def _associate(peer: Peer, contexts: list[PresentationContext],
               net: NetSettings, evt_handlers: list[Any] | None = None) -> Association:
    ae = dicom_ae.make_ae(peer.calling_ae, acse_timeout=net.acse_timeout,
                          dimse_timeout=net.dimse_timeout, network_timeout=net.network_timeout,
                          connection_timeout=net.connect_timeout)
    ae.requested_contexts = contexts
    tls_args = (peer.tls, peer.server_name or peer.host) if peer.tls is not None else None
    return dicom_ae.associate(ae, peer.host, peer.port, ae_title=peer.ae_title,
                              tls_args=tls_args, evt_handlers=evt_handlers)


def open_association(peer: Peer, contexts: list[PresentationContext], net: NetSettings,
                     evt_handlers: list[Any] | None = None) -> Association:
    """An association to ``peer`` proposing ``contexts`` (the other DIMSE services of
    the send stage: storage commitment, C-FIND); see ``why_not`` when not established."""
    return _associate(peer, contexts, net, evt_handlers)


def why_not(assoc: Association, peer: Peer) -> tuple[str, bool]:
    """Why an association was not established, and whether that is for good."""
    return _why_not(assoc, peer)


def _why_not(assoc: Association, peer: Peer) -> tuple[str, bool]:
    """Why an association was not established, and whether that is for good."""
    if assoc.is_rejected:
        rsp = assoc.acceptor.primitive
        result = getattr(rsp, "result", None)
        text = (f"{peer} rejected the association: {getattr(rsp, 'result_str', '?')}, "
                f"{getattr(rsp, 'source_str', '?')}, {getattr(rsp, 'reason_str', '?')}")
        return text, result == 0x01
    if assoc.is_aborted and assoc.acceptor.primitive is not None:
        return f"{peer} aborted the association during negotiation", False
    if peer.tls is not None:
        problem = dicom_ae.tls_problem(peer.host, peer.port, peer.tls,
                                       peer.server_name or peer.host)
        if problem:
            return f"{peer}: {problem}", False
    return f"{peer} is not reachable (connection refused or no answer)", False


def _refused_class(out: Delivery, item: Item, peer: Peer, on_result: OnResult | None) -> None:
    """``item`` fails for good: the peer accepted no presentation context for its class."""
    out.failed[item.sop_uid] = NO_CONTEXT
    out.reasons[item.sop_uid] = f"{peer} refused SOP class {_class_name(item.sop_class)}"
    if on_result:
        on_result(item, "failed", None)


def _class_name(uid: str) -> str:
    name = UID(uid).name
    return f"{name} ({uid})" if name != uid else uid


def status_text(code: int) -> str:
    return f"0x{code:04X}"


Accepted = dict[str, dict[str, int]]  # SOP class -> {transfer syntax: context id}


def _as_is(item: Item, accepted: Accepted) -> int | None:
    """The context to send ``item`` on as encoded on disk, if the peer accepted one."""
    return accepted.get(item.sop_class, {}).get(item.transfer_syntax) if item.has_meta else None


def _send_one(assoc: Association, item: Item, accepted: Accepted, fast: scu.Sender | None,
              after: Item | None = None) -> tuple[Dataset | None, tuple[str, str] | None]:
    """C-STORE one object: (status, None), or (None, (failed status, why)) when it
    cannot be sent over this association."""
    tss = accepted.get(item.sop_class, {})
    cx_id = _as_is(item, accepted)
    if cx_id is not None:
        if fast is not None:
            next_cx = _as_is(after, accepted) if after is not None else None
            return fast.store(item, cx_id, (after, next_cx) if after and next_cx else None), None
        return assoc.send_c_store(item.path), None
    if not any(ts in UNCOMPRESSED for ts in tss) and item.transfer_syntax not in tss:
        names = ", ".join(UID(t).name for t in tss) or "none"
        return None, (NO_CONTEXT, (f"the peer accepted {_class_name(item.sop_class)} only in "
                                   f"{names}, not in {UID(item.transfer_syntax).name}"))
    # The peer accepted only another (uncompressed) transfer syntax: decode and re-encode.
    ds = dcmread(item.path, force=True)
    ts = UID(item.transfer_syntax)
    if ts.is_compressed:
        try:
            ds.decompress(generate_instance_uid=False)  # the same object, decoded
        except Exception as exc:  # noqa: BLE001 - any codec error means "cannot convert"
            return None, (NO_CONTEXT, (f"the peer accepts {_class_name(item.sop_class)} only "
                                       f"uncompressed and {ts.name} could not be "
                                       f"decompressed: {exc}"))
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", Dataset()):
        if not hasattr(ds, "file_meta"):
            ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = UID(item.transfer_syntax)
    if fast is not None:
        fast.give()  # pynetdicom sends this one and reads its response itself
    try:
        return assoc.send_c_store(ds), None
    finally:
        if fast is not None:
            fast.take()


def _store_on(assoc: Association, peer: Peer, items: list[Item], out: Delivery,
              net: NetSettings, on_result: OnResult | None) -> tuple[list[Item], str | None]:
    """Send ``items`` over an established association; returns what is still missing
    and why (None when nothing is)."""
    accepted: Accepted = {}
    for cx in assoc.accepted_contexts:
        accepted.setdefault(str(cx.abstract_syntax), {}).setdefault(
            str(cx.transfer_syntax[0]), int(cx.context_id or 0))
    missing: list[Item] = []
    why_missing: str | None = None
    with scu.Sender(assoc, net.dimse_timeout, net.network_timeout) as sender:
        fast = sender if sender.held else None
        for i, item in enumerate(items):
            if not assoc.is_established:
                missing, why_missing = items[i:], f"{peer} dropped the association"
                break
            if item.sop_class not in accepted:
                _refused_class(out, item, peer, on_result)
                continue
            try:
                after = items[i + 1] if i + 1 < len(items) else None
                status, why = _send_one(assoc, item, accepted, fast, after)
            except (scu.FileError, InvalidDicomError, AttributeError, ValueError, EOFError) as exc:
                status, why = None, ("unreadable", f"cannot be read and sent: {exc}")
            except TimeoutError:
                missing, why_missing = items[i:], (f"{peer}: no whole C-STORE response "
                                                   f"within {net.dimse_timeout:g}s, or "
                                                   f"silent for {net.network_timeout:g}s "
                                                   "inside one")
                break
            except (OSError, RuntimeError) as exc:  # the connection went away
                missing, why_missing = items[i:], f"{peer}: connection lost: {exc}"
                break
            if why is not None:
                out.failed[item.sop_uid] = why[0]
                out.reasons[item.sop_uid] = f"{item.sop_uid} ({item.path.name}): {why[1]}"
                if on_result:
                    on_result(item, "failed", None)
                continue
            assert status is not None
            if "Status" not in status:
                # No answer within the DIMSE timeout, or the association dropped.
                missing, why_missing = items[i:], (f"{peer}: no C-STORE response for "
                                                   f"{item.sop_uid} (association aborted or "
                                                   "DIMSE timeout)")
                break
            code = int(status.Status)
            if code == 0x0000:
                out.sent.append(item.sop_uid)
                if on_result:
                    on_result(item, "sent", code)
            elif 0xB000 <= code <= 0xBFFF:
                out.sent.append(item.sop_uid)
                out.warnings[item.sop_uid] = code
                if on_result:
                    on_result(item, "warning", code)
            elif 0xA700 <= code <= 0xA7FF:
                # out of resources: the peer's disk is full or it is overloaded, for now
                return items[i:], f"{peer}: out of resources ({status_text(code)})"
            else:
                out.failed[item.sop_uid] = status_text(code)
                comment = status.get("ErrorComment")
                out.reasons[item.sop_uid] = (
                    f"{peer} refused {item.sop_uid} ({_class_name(item.sop_class)}) with "
                    f"status {status_text(code)}" + (f": {comment}" if comment else ""))
                if on_result:
                    on_result(item, "failed", code)
    if missing and assoc.is_established:
        assoc.abort()  # whatever state the peer is in, this association is done
    return missing, why_missing


def store(peer: Peer, items: list[Item], net: NetSettings | None = None,
          on_result: OnResult | None = None) -> Delivery:
    """Deliver ``items`` to ``peer``: one association (more only if over 128 contexts are
    needed, or to resume after a dropped association that had made progress)."""
    tune()
    net = net or NetSettings()
    out = Delivery()
    for group in _groups(items):
        contexts = propose(group)
        todo = group
        reconnects = 0
        while todo:
            assoc = _associate(peer, contexts, net)
            if not assoc.is_established:
                if assoc.is_aborted and assoc.rejected_contexts and not assoc.accepted_contexts:
                    # answered, but accepted none of the contexts: refused for good
                    for item in todo:
                        _refused_class(out, item, peer, on_result)
                    break
                reason, for_good = _why_not(assoc, peer)
                if for_good:
                    out.refused = reason
                else:
                    out.temporary = reason
                return out
            before = len(out.sent) + len(out.failed)
            try:
                todo, why = _store_on(assoc, peer, todo, out, net, on_result)
            finally:
                if assoc.is_established:
                    assoc.release()
            if not todo:
                break
            progress = len(out.sent) + len(out.failed) - before
            reconnects += 1
            if progress == 0 or reconnects > RECONNECTS:
                out.temporary = why
                return out
            log.info("%s; resuming %d missing objects on a new association", why, len(todo))
    return out
