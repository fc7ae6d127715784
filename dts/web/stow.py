"""Owns the STOW-RS route of ``dts web``: ``POST /dicom-web/studies[/{StudyInstanceUID}]``.

Not a page: no cookies, no CSRF. A request logs in with ``Authorization: Bearer
<the token in [stow] token_file>`` or HTTP Basic with a user of the users file whose
role is operator or admin; a session cookie is ignored (a browser cannot be made to
store into the station by a page it visits). The answers (PS3.18):

- 200 every part stored, 202 some failed, 409 all failed: a DICOM JSON body with the
  ReferencedSOPSequence and the FailedSOPSequence (FailureReason per part);
- 400 a malformed multipart body, 401 no or a wrong login (``WWW-Authenticate``),
  403 a user whose role may not store, 429 too many failed logins (the login page's
  throttle), 404 ``[stow] enabled = false`` or a study UID
  in the path that is not a UID, 413 a body over ``[stow] max_upload_mb``, 415 not
  ``multipart/related; type="application/dicom"``.

The body streams into the request's scratch folder (``dts.stow``); nothing of a
request answered 4xx other than 409/202 stays.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from ..dicom.uid import valid_uid
from ..journal import Event, Stage, Status
from ..stow import MalformedBody, MultipartParser, Outcome, Stow, media_type
from .security import Throttle
from .users import Role, UserFile

log = logging.getLogger(__name__)
STORE_ROLE = Role.OPERATOR


class Refused(Exception):
    def __init__(self, status: int, message: str, **headers: str) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def _token(stow: Stow) -> str | None:
    path = stow.cfg.token_file
    if path is None:
        return None
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError:
        log.warning("cannot read [stow] token_file %s", path)
        return None
    return value or None


def _login(stow: Stow, users: UserFile, throttle: Throttle, request: Request) -> str:
    """Who stores: ``token`` or the user's name; Refused otherwise (cookies never count)."""
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    challenge = {"WWW-Authenticate": 'Basic realm="dts STOW-RS", charset="UTF-8"'}
    if scheme.lower() == "bearer" and value.strip():
        token = _token(stow)
        if token is not None and hmac.compare_digest(value.strip().encode(), token.encode()):
            return "token"
        raise Refused(401, "wrong bearer token", **challenge)
    if scheme.lower() == "basic" and value.strip():
        try:
            name, sep, password = base64.b64decode(value.strip(), validate=True) \
                .decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise Refused(401, "malformed Basic credentials", **challenge) from None
        address = request.client.host if request.client else "-"
        wait = throttle.wait(name, address)
        if wait > 0:  # the login page's throttle: guessing by STOW-RS is no faster
            raise Refused(429, f"too many failed logins; try again in {wait:.0f}s",
                          **{"Retry-After": str(int(wait) + 1)})
        user = users.authenticate(name, password) if sep else None
        if user is None:
            throttle.failed(name, address)
            raise Refused(401, "wrong user name or password", **challenge)
        throttle.succeeded(name, address)
        if not user.role.allows(STORE_ROLE):
            raise Refused(403, f"user {user.name} ({user.role.value}) may not store; it needs "
                               f"the role {STORE_ROLE.value}")
        return user.name
    raise Refused(401, "STOW-RS needs a bearer token or a user and password", **challenge)


def _check_type(request: Request) -> bytes:
    kind, params = media_type(request.headers.get("content-type", ""))
    if kind != "multipart/related":
        raise Refused(415, f"expected multipart/related; type=\"application/dicom\", got "
                           f"{kind or 'no Content-Type'}")
    part_type = params.get("type", "application/dicom").lower()
    if part_type != "application/dicom":
        raise Refused(415, f"only application/dicom parts are accepted (type={part_type!r}; "
                           "application/dicom+json and +xml bulk data are not)")
    boundary = params.get("boundary", "")
    if not boundary:
        raise Refused(400, "multipart/related without a boundary")
    return boundary.encode("latin-1")


def _refusal_event(stow: Stow, request: Request, exc: Refused, who: str | None) -> None:
    client = request.client
    stow.station.journal.emit(
        Stage.RECEIVE, Event.STOW_REFUSED, Status.WARNING,
        f"refused a STOW-RS request from {client.host if client else '?'} with HTTP "
        f"{exc.status}: {exc.message}", http_status=exc.status, reason=exc.message,
        peer=client.host if client else None, user=who, best_effort=True)


def _stored_event(stow: Stow, request: Request, outcome: Outcome, who: str | None,
                  study_uid: str | None) -> None:
    client = request.client
    stow.station.journal.emit(
        Stage.RECEIVE, Event.STOW_STORED, Status.OK if not outcome.failed else Status.WARNING,
        f"STOW-RS from {client.host if client else '?'} ({who}): "
        f"{len(outcome.stored)} part(s) stored, {len(outcome.failed)} failed",
        stored=len(outcome.stored), failed=len(outcome.failed),
        peer=client.host if client else None, user=who, study_uid=study_uid,
        best_effort=True)


async def store(stow: Stow, users: UserFile, throttle: Throttle,
                request: Request) -> Response:
    """The endpoint (see the module docstring)."""
    who: str | None = None
    try:
        if not stow.cfg.enabled:
            raise Refused(404, "STOW-RS is not enabled ([stow] enabled = false)")
        study_uid = request.path_params.get("study_uid")
        if study_uid is not None and not valid_uid(study_uid):
            raise Refused(404, f"no study {study_uid[:80]!r} (not a UID)")
        who = await run_in_threadpool(_login, stow, users, throttle, request)
        boundary = _check_type(request)
        limit = stow.cfg.max_upload_mb * 1024 * 1024
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise Refused(413, f"the body is larger than {stow.cfg.max_upload_mb} MB "
                               "([stow] max_upload_mb)")
        client = request.client
        req = await run_in_threadpool(stow.request, peer=client.host if client else "-",
                                      peer_port=client.port if client else 0,
                                      study_uid=study_uid)
        try:
            parser = MultipartParser(boundary, req.open_part, req.end_part)
            size = 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise Refused(413, f"the body is larger than {stow.cfg.max_upload_mb} MB "
                                       "([stow] max_upload_mb)")
                if chunk:
                    await run_in_threadpool(parser.feed, chunk)
            parser.close()
            if not req.parts:
                raise MalformedBody("no parts")
            outcome = await run_in_threadpool(req.commit)
        except MalformedBody as exc:
            raise Refused(400, f"malformed multipart/related body: {exc}") from None
        except ClientDisconnect:  # nothing kept: the scratch goes, nobody reads an answer
            raise Refused(400, "the client went away before the body was complete") \
                from None
        finally:
            await run_in_threadpool(req.close)
    except Refused as exc:
        await run_in_threadpool(_refusal_event, stow, request, exc, who)
        return JSONResponse({"error": exc.message, "status": exc.status},
                            status_code=exc.status, headers=exc.headers)
    body: dict[str, Any] = outcome.response()
    await run_in_threadpool(_stored_event, stow, request, outcome, who, study_uid)
    return JSONResponse(body, status_code=outcome.http_status,
                        media_type="application/dicom+json")
