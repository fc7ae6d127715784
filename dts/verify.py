"""Owns the delivery check by query (``verify = "find"``): after storing to a DICOM
destination, ask it with C-FIND (Study Root Query/Retrieve) whether every instance sent
is there, for peers that do not offer storage commitment.

Per series of the results: an IMAGE-level query with StudyInstanceUID and
SeriesInstanceUID as keys and SOPInstanceUID as the key returned; every sent instance
must come back. A peer that does not answer at instance level (a failure status, or no
match at all for a series just stored) is asked at SERIES level for
NumberOfSeriesRelatedInstances instead: fewer than sent (or no such series) means the
series' instances are missing. What is missing leaves the destination's ``sent`` list,
so the next try stores it again (within the send retry budget).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pynetdicom.presentation import build_context

from .config import Destination
from .dicom.header import read_attributes
from .dicom.store import Item, NetSettings, Peer, open_association, why_not

log = logging.getLogger(__name__)

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"  # Study Root Query/Retrieve - FIND


class QueryRefused(Exception):
    """The peer does not answer queries at all (for good)."""


class QueryUnavailable(Exception):
    """The query could not be made now (peer unreachable, association dropped)."""


@dataclass
class Found:
    """What the query found."""

    missing: list[str] = field(default_factory=list)   # SOP Instance UIDs not found
    series_level: list[str] = field(default_factory=list)  # series checked by count only


def _find(assoc: object, query: Dataset, peer: Peer) -> tuple[list[Dataset], int | None]:
    """The identifiers a C-FIND returned, and its failure status (None: success)."""
    matches: list[Dataset] = []
    for status, identifier in assoc.send_c_find(query, STUDY_ROOT_FIND):  # type: ignore[attr-defined]
        if status is None or "Status" not in status:
            raise QueryUnavailable(f"{peer}: no C-FIND response (association aborted or "
                                   "DIMSE timeout)")
        code = int(status.Status)
        if code in (0xFF00, 0xFF01):
            if identifier is not None:
                matches.append(identifier)
        elif code == 0x0000:
            return matches, None
        else:
            return matches, code
    return matches, None


def check(dest: Destination, peer: Peer, items: list[Item], net: NetSettings) -> Found:
    """C-FIND ``peer`` for ``items``; which of them it does not have."""
    series: dict[tuple[str, str], list[str]] = {}
    for it in items:
        try:
            attrs = read_attributes(it.path, ["StudyInstanceUID", "SeriesInstanceUID"])
        except ValueError as exc:
            raise QueryUnavailable(str(exc)) from None
        key = (attrs.get("StudyInstanceUID", ""), attrs.get("SeriesInstanceUID", ""))
        series.setdefault(key, []).append(it.sop_uid)
    assoc = open_association(peer, [build_context(STUDY_ROOT_FIND)], net)
    conf = f"destination.{dest.name}.verify"
    if not assoc.is_established:
        if assoc.is_aborted and assoc.rejected_contexts and not assoc.accepted_contexts:
            raise QueryRefused(f"{conf}: {peer} does not accept C-FIND (Study Root "
                               "Query/Retrieve FIND), so the delivery cannot be checked")
        reason, for_good = why_not(assoc, peer)
        raise (QueryRefused if for_good else QueryUnavailable)(f"verify: {reason}")
    found = Found()
    try:
        if not assoc.accepted_contexts:
            raise QueryRefused(f"{conf}: {peer} does not accept C-FIND (Study Root "
                               "Query/Retrieve FIND)")
        for (study, ser), uids in series.items():
            q = Dataset()
            q.QueryRetrieveLevel = "IMAGE"
            q.StudyInstanceUID = study
            q.SeriesInstanceUID = ser
            q.SOPInstanceUID = ""
            matches, failure = _find(assoc, q, peer)
            there = {str(m.get("SOPInstanceUID", "")) for m in matches}
            if failure is None and there:
                found.missing += [u for u in uids if u not in there]
                continue
            # no answer at instance level: the series' count instead
            q = Dataset()
            q.QueryRetrieveLevel = "SERIES"
            q.StudyInstanceUID = study
            q.SeriesInstanceUID = ser
            q.NumberOfSeriesRelatedInstances = ""
            matches, failure = _find(assoc, q, peer)
            if failure is not None:
                raise QueryRefused(f"{conf}: {peer} answered a SERIES-level C-FIND with "
                                   f"status 0x{failure:04X}")
            found.series_level.append(ser)
            count = 0
            for m in matches:
                try:
                    count = max(count, int(m.get("NumberOfSeriesRelatedInstances") or 0))
                except (TypeError, ValueError):
                    pass
            if count < len(uids):
                found.missing += uids
    finally:
        if assoc.is_established:
            assoc.release()
    return found


__all__ = ["Found", "QueryRefused", "QueryUnavailable", "check"]
