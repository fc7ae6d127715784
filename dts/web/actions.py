"""Owns what a person can do from the page, over the same core as the commands:
requeue (``dts.requeue``), approve or reject results in review/ (``dts.review``, as
``dts review``), C-ECHO a destination (``dts.dicom.ae.echo``, as ``dts echo``) and the
rule tester (``dts.classifier.explain``, on a job or on uploaded files). Nothing here
knows HTTP; the web application maps the errors to answers.
"""

from __future__ import annotations

import secrets
import shutil
import time
from typing import Any

from .. import classifier, dicomweb, review
from ..dicom import ae as dicom_ae
from ..dicom import header
from ..dicom.uid import valid_uid
from ..errors import DtsError, TemporaryFailure, UsageError
from ..jobrecord import JobRecord
from ..requeue import TARGETS, requeue
from ..sender import tls_context
from ..spool import Queue
from ..station import Station


class Moved(DtsError):
    """The job is no longer where the page showed it (or a worker holds it now)."""

    exit_code = 75

    def __init__(self, message: str, location: str | None) -> None:
        super().__init__(message)
        self.location = location


class NotFound(DtsError):
    """No such job, study, destination or file."""


def where(station: Station, job_id: str) -> str:
    loc, _ = station.spool.find(job_id)  # UsageError: no such job
    return str(loc)


def requeue_job(station: Station, job_id: str, target: str, *, seen_in: str | None,
                by: str) -> dict[str, str]:
    """``dts requeue JOB --to target`` for the page: ``seen_in`` is where the page showed
    the job; when it is somewhere else now (or being worked on), ``Moved`` says where."""
    if target not in {q.value for q in TARGETS}:
        raise UsageError(f"to: expected one of {', '.join(q.value for q in TARGETS)}, got "
                         f"{target!r}")
    found = station.spool.locate(job_id)
    if found is None:
        raise NotFound(f"no job {job_id}")
    now = str(found[0])
    if seen_in and now != seen_in:
        raise Moved(f"job {job_id} moved meanwhile: it is in {now} now, not {seen_in}", now)
    try:
        return requeue(station, job_id, Queue(target), by=by).as_dict()
    except TemporaryFailure as exc:
        raise Moved(str(exc), now) from None


DECISIONS = ("approve", "reject")


def review_job(station: Station, job_id: str, decision: str, *, by: str,
               reason: str | None) -> dict[str, Any]:
    """``dts review approve|reject JOB`` for the page: a job that is no longer waiting in
    review/new (decided meanwhile, or being decided) is ``Moved``, saying where it is."""
    if decision not in DECISIONS:
        raise UsageError(f"decision: expected approve or reject, got {decision!r}")
    found = station.spool.locate(job_id)
    if found is None:
        raise NotFound(f"no job {job_id}")
    now = str(found[0])
    if now != f"{Queue.REVIEW}/new":
        raise Moved(f"job {job_id} does not wait for review: it is in {now}", now)
    try:
        if decision == "approve":
            return review.approve(station, job_id, by=by, reason=reason or None).as_dict()
        return review.reject(station, job_id, by=by, reason=reason or "").as_dict()
    except TemporaryFailure as exc:
        raise Moved(str(exc), f"{Queue.REVIEW}/cur") from None


def echo_destination(station: Station, name: str, timeout: float = 10.0) -> dict[str, Any]:
    """C-ECHO a configured DICOM destination, as ``dts echo NAME``."""
    config = station.config
    d = config.destinations.get(name)
    if d is None:
        raise NotFound(f"no destination {name!r}")
    if d.is_web:  # a STOW-RS destination: checked by QIDO-RS
        try:
            found = dicomweb.echo(d, timeout)
        except (TemporaryFailure, UsageError) as exc:
            return {"destination": name, "url": d.url, "reachable": False, "reason": str(exc)}
        return {"destination": name, "url": d.url, "reachable": True, "ms": round(found.ms, 1)}
    if d.is_folder or not (d.host and d.port and d.ae_title):
        raise UsageError(f"destination {name!r} is a folder, not a DICOM peer")
    out: dict[str, Any] = {"destination": name, "ae_title": d.ae_title, "host": d.host,
                           "port": d.port}
    t0 = time.monotonic()
    try:
        status = dicom_ae.echo(d.host, d.port, called_ae=d.ae_title,
                               calling_ae=d.calling_ae or config.station.ae_title,
                               timeout=timeout, tls=tls_context(d),
                               server_name=d.tls.server_name if d.tls else None)
    except dicom_ae.NetworkError as exc:
        return {**out, "reachable": False, "reason": str(exc)}
    out["ms"] = round((time.monotonic() - t0) * 1000, 1)
    if status != 0:
        return {**out, "reachable": False, "reason": f"answered C-ECHO with 0x{status:04X}"}
    return {**out, "reachable": True}


def test_rules_on_job(station: Station, job_id: str) -> dict[str, Any]:
    return classifier.explain(station, job_id)


def test_rules_on_files(station: Station, files: list[tuple[str, bytes]], *,
                        calling_ae: str = "", called_ae: str = "") -> dict[str, Any]:
    """Which streams would take a study made of these files, and why; nothing is queued.
    The files are laid out as a job's input under ``tmp/`` and removed afterwards.
    UsageError naming the first file that is not DICOM (or has no usable UIDs)."""
    if not files:
        raise UsageError("files: choose at least one DICOM file")
    scratch = station.spool.tmp / f".ruletest-{secrets.token_hex(6)}"
    try:
        study_uids: set[str] = set()
        for name, blob in files:
            path = scratch / "upload" / secrets.token_hex(8)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(blob)
            try:
                ids = header.read_header(path)
            except ValueError:
                raise UsageError(f"files: {name!r} is not a DICOM file") from None
            sop, series, study = ids.get("sop_uid"), ids.get("series_uid"), ids.get("study_uid")
            if not (valid_uid(sop) and valid_uid(series) and valid_uid(study)):
                raise UsageError(f"files: {name!r} is not a DICOM instance with valid "
                                 "Study, Series and SOP Instance UIDs")
            assert sop and series and study
            study_uids.add(study)
            dest = scratch / "input" / series / f"{sop}.dcm"
            dest.parent.mkdir(parents=True, exist_ok=True)
            path.rename(dest)
        if len(study_uids) > 1:
            raise UsageError(f"files: they belong to {len(study_uids)} studies; upload one "
                             "study at a time")
        data: JobRecord = {"study_uid": study_uids.pop(), "calling_ae": calling_ae or None,
                           "called_ae": called_ae or None, "peer": None}
        return classifier.explain_input(station, scratch / "input", data,
                                        f"{len(files)} uploaded file(s)", "upload")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
