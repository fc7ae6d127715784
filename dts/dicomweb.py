"""Owns DICOMweb towards other systems: results sent by STOW-RS, a service checked by
QIDO-RS (``dts echo``).

A ``[[destination]]`` with ``url`` is a DICOMweb service. Its results go in STOW-RS
requests (dicomweb-client) of at most ``BATCH_INSTANCES`` objects or ``BATCH_BYTES``
bytes each, so memory stays bounded; dts keeps its own retries and backoff (the
client's are off). What the answer means for each object:

- 200 (or 202) with a ReferencedSOPSequence: those objects are stored (a WarningReason
  is a warning, as a DIMSE warning status); a FailedSOPSequence fails exactly the
  objects it names, with their FailureReason;
- 409 Conflict: every object failed; the FailedSOPSequence of the body, when there is
  one, says why for each;
- any other 4xx: refused for good (named: ``HTTP 403 Forbidden``), the whole request's
  objects fail;
- 5xx, 408, 429, a connection that fails or times out: temporary, the job tries again
  later with only what is missing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient

from .config import Destination
from .dicom.store import Delivery, Item, OnResult
from .errors import TemporaryFailure, UsageError
from .jobrecord import DestinationState, JobRecord, SendStatus
from .journal import Event, Stage, Status
from .spool import Job
from .station import Station

log = logging.getLogger(__name__)

BATCH_INSTANCES = 50
BATCH_BYTES = 64 << 20
TEMPORARY_HTTP = frozenset({408, 429})
# PS3.18 FailureReason / WarningReason values worth a name (the rest shown in hex)
REASONS = {
    0xA700: "out of resources", 0xA900: "data set does not match SOP class",
    0xC000: "cannot understand", 0xC122: "referenced transfer syntax not supported",
    0x0110: "processing failure", 0x0122: "referenced SOP class not supported",
    0xB000: "coercion of data elements", 0xB006: "elements discarded",
    0xB007: "data set does not match SOP class",
}


def reason_text(code: int) -> str:
    name = REASONS.get(code)
    return f"0x{code:04X}" + (f" ({name})" if name else "")


def _secret(path: Any) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            value = fh.read().strip()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not value:
        raise UsageError(f"{path} is empty")
    return value


def session_for(dest: Destination) -> requests.Session:
    """A requests session with the destination's login and the CA it trusts."""
    session = requests.Session()
    session.trust_env = False  # no proxy from the environment: the hospital network is explicit
    if dest.ca_certificates is not None:
        session.verify = str(dest.ca_certificates)
    auth = dest.auth
    if auth is not None and auth.bearer_token_file is not None:
        session.headers["Authorization"] = f"Bearer {_secret(auth.bearer_token_file)}"
    elif auth is not None and auth.username and auth.password_file is not None:
        session.auth = (auth.username, _secret(auth.password_file))
    return session


def client_for(dest: Destination) -> DICOMwebClient:
    assert dest.url is not None
    client = DICOMwebClient(dest.url, session=session_for(dest), timeout=dest.timeout)
    client.set_http_retry_params(retry=False)  # dts's own backoff decides
    return client


def _batches(items: list[Item]) -> Iterator[list[Item]]:
    batch: list[Item] = []
    size = 0
    for it in items:
        try:
            n = it.path.stat().st_size
        except OSError:
            n = 0
        if batch and (len(batch) >= BATCH_INSTANCES or size + n > BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(it)
        size += n
    if batch:
        yield batch


def _http_text(response: requests.Response) -> str:
    return f"HTTP {response.status_code} {response.reason or ''}".strip()


def _answer(body: Any) -> tuple[dict[str, int | None], dict[str, int]]:
    """(referenced: {uid: warning reason or None}, failed: {uid: failure reason}) of a
    STOW-RS response data set (pydicom Dataset)."""
    referenced: dict[str, int | None] = {}
    failed: dict[str, int] = {}
    if body is None:
        return referenced, failed
    for item in getattr(body, "ReferencedSOPSequence", None) or []:
        uid = str(getattr(item, "ReferencedSOPInstanceUID", "") or "")
        if uid:
            warn = getattr(item, "WarningReason", None)
            referenced[uid] = int(warn) if warn not in (None, "") else None
    for item in getattr(body, "FailedSOPSequence", None) or []:
        uid = str(getattr(item, "ReferencedSOPInstanceUID", "") or "")
        if uid:
            why = getattr(item, "FailureReason", None)
            failed[uid] = int(why) if why not in (None, "") else 0x0110
    return referenced, failed


def _body_of(response: requests.Response) -> Any:
    """The response's data set (DICOM JSON), or None."""
    kind = (response.headers.get("Content-Type") or "").split(";")[0].strip()
    if not response.content or kind not in ("application/dicom+json", "application/json"):
        return None
    try:
        return pydicom.Dataset.from_json(response.json())
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def store(dest: Destination, items: list[Item], on_result: OnResult | None = None) -> Delivery:
    """Deliver ``items`` to a STOW-RS destination; what happened to each (see the module)."""
    result = Delivery()
    try:
        client = client_for(dest)
    except UsageError as exc:
        result.refused = str(exc)
        return result

    def done(it: Item, outcome: str, code: int | None) -> None:
        if on_result is not None:
            on_result(it, outcome, code)

    for batch in _batches(items):
        try:
            datasets = [pydicom.dcmread(it.path) for it in batch]
        except (OSError, ValueError) as exc:
            for it in batch:
                result.failed[it.sop_uid] = "unreadable"
                result.reasons[it.sop_uid] = f"cannot read {it.path.name}: {exc}"
                done(it, "failed", None)
            continue
        study = {str(getattr(ds, "StudyInstanceUID", "")) for ds in datasets}
        try:
            body = client.store_instances(datasets,
                                          study_instance_uid=study.pop() if len(study) == 1
                                          else None)
            status: int | None = None
        except requests.HTTPError as exc:
            response = exc.response
            if response is None:
                result.temporary = f"{dest.url}: {exc}"
                return result
            status = response.status_code
            if status >= 500 or status in TEMPORARY_HTTP:
                result.temporary = f"{dest.url} answered {_http_text(response)}"
                return result
            if status != 409:
                result.refused = f"{dest.url} refused the objects: {_http_text(response)}"
                for it in batch:
                    result.failed[it.sop_uid] = f"HTTP {status}"
                    result.reasons[it.sop_uid] = result.refused
                    done(it, "failed", None)
                return result
            body = _body_of(response)
        except (requests.ConnectionError, requests.Timeout) as exc:
            result.temporary = f"{dest.url} unreachable: {_short(exc)}"
            return result
        except (requests.RequestException, ValueError) as exc:
            result.temporary = f"{dest.url}: {_short(exc)}"
            return result
        referenced, failed = _answer(body)
        for it in batch:
            uid = it.sop_uid
            if uid in failed:
                code = failed[uid]
                result.failed[uid] = f"FailureReason {reason_text(code)}"
                result.reasons[uid] = (f"{dest.name} ({dest.url}) did not store {uid}: "
                                       f"FailureReason {reason_text(code)}")
                done(it, "failed", code)
            elif status == 409 or (referenced and uid not in referenced) or \
                    (not referenced and failed):
                result.failed[uid] = "HTTP 409" if status == 409 else "not in the response"
                result.reasons[uid] = (f"{dest.name} ({dest.url}) did not store {uid}: "
                                       f"{result.failed[uid]}")
                done(it, "failed", None)
            else:
                warn = referenced.get(uid)
                result.sent.append(uid)
                if warn is not None:
                    result.warnings[uid] = warn
                done(it, "warning" if warn is not None else "sent", warn)
    return result


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) <= 200 else text[:197] + "..."


def send(station: Station, job: Job, data: JobRecord, dest: Destination,
         state: DestinationState, items: list[Item], progress: OnResult) -> SendStatus:
    """One try to a STOW-RS destination (the sender's dispatch); returns its new status.
    The same per-instance state and events as a DICOM destination."""
    done = set(state["sent"]) | set(state["failed"])
    todo = [it for it in items if it.sop_uid not in done]
    if not todo:
        return "failed" if state["failed"] else "done"
    t0 = time.monotonic()
    result = store(dest, todo, progress)
    seconds = time.monotonic() - t0
    journal = station.journal
    for uid, code in result.warnings.items():
        journal.emit(Stage.SEND, Event.STORE_WARNING, Status.WARNING,
                     f"{dest.name} ({dest.url}) stored {uid} with WarningReason "
                     f"{reason_text(code)}", job=job, job_data=data, destination=dest.name,
                     sop_uid=uid, warning_reason=f"0x{code:04X}")
    for uid, status in result.failed.items():
        state["failed"][uid] = status
        journal.emit(Stage.SEND, Event.STORE_FAILED, Status.ERROR,
                     result.reasons.get(uid, status), job=job, job_data=data,
                     destination=dest.name, sop_uid=uid, failure=status)
    if result.sent:
        journal.emit(Stage.SEND, Event.STORED, Status.INFO,
                     f"{len(result.sent)} of {len(todo)} objects stored to {dest.name} "
                     f"({dest.url}) by STOW-RS in {seconds:.1f}s", job=job, job_data=data,
                     destination=dest.name, count=len(result.sent))
    if result.refused:
        state["error"] = result.refused
        return "failed"
    if result.temporary:
        state["error"] = result.temporary
        return "retry"
    state.pop("error", None)
    return "failed" if state["failed"] else "done"


@dataclass
class EchoResult:
    url: str
    status: int
    studies: int
    ms: float


def echo(dest: Destination, timeout: float | None = None) -> EchoResult:
    """Check a DICOMweb service with a QIDO-RS request (``GET {url}/studies?limit=1``);
    TemporaryFailure when it cannot be reached or does not answer 200/204."""
    assert dest.url is not None
    session = session_for(dest)
    t0 = time.monotonic()
    try:
        response = session.get(f"{dest.url}/studies", params={"limit": "1"},
                               headers={"Accept": "application/dicom+json"},
                               timeout=timeout or dest.timeout)
    except requests.RequestException as exc:
        raise TemporaryFailure(f"{dest.name} ({dest.url}) unreachable: {_short(exc)}") \
            from None
    finally:
        session.close()
    ms = (time.monotonic() - t0) * 1000
    if response.status_code not in (200, 204):
        raise TemporaryFailure(f"{dest.name} ({dest.url}) answered QIDO-RS with "
                               f"{_http_text(response)}")
    try:
        found = len(response.json()) if response.content else 0
    except ValueError:
        raise TemporaryFailure(f"{dest.name} ({dest.url}) answered QIDO-RS with something "
                               "that is not DICOM JSON") from None
    return EchoResult(dest.url, response.status_code, found, ms)
