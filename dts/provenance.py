"""Owns the registry of objects this station produced (the feedback-loop guard).

The run stage registers the SOP Instance UID of every result it lets out as an
empty-ish file ``spool/produced/<SOPInstanceUID>`` holding the producing job's id.
When a PACS forwards such a result back to us, the classifier finds its UIDs here
and leaves the study unmatched instead of processing our own output again.
"""

from __future__ import annotations

import os
from typing import Iterable

from .dicom.uid import valid_uid
from .spool import Spool


def register_produced(spool: Spool, sop_uids: Iterable[str], job_id: str) -> int:
    """Record ``sop_uids`` as produced by ``job_id``; returns how many were recorded."""
    spool.produced.mkdir(parents=True, exist_ok=True)
    n = 0
    for uid in sop_uids:
        if not valid_uid(uid):
            continue
        fd = os.open(spool.produced / uid, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, job_id.encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        n += 1
    if n:
        from .spool import fsync_dir

        fsync_dir(spool.produced)
    return n


def produced_by(spool: Spool, sop_uid: str) -> str | None:
    """The id of the job that produced ``sop_uid``, or None if it is not ours."""
    if not valid_uid(sop_uid):
        return None
    try:
        return (spool.produced / sop_uid).read_text().strip() or "?"
    except FileNotFoundError:
        return None
