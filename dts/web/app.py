"""Owns the page and its JSON API: routes, who may use each, and the answers.

Server-rendered HTML (Jinja2, autoescaped) that reads well without JavaScript, a little
plain JavaScript for the live parts (``static/dts.js``), and under ``/api/`` the same
data as JSON for scripts; ``/metrics`` in Prometheus' text format. Lists and the
overview read the index (``dts.index``, synced from the journal before answering); a
timeline and everything a person does read or change the spool through the core
(``dts.web.actions``). Every route checks the role it needs on the server
(``dts.web.users.Role``); a viewer never sees a patient ID (masked here, in HTML and
JSON alike), and nobody sees a patient name.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
import tomli_w
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .. import config as config_mod
from .. import metrics
from ..dicom.uid import valid_uid
from ..errors import ConfigError, DtsError, UsageError
from ..index import ExamQuery, Index, IndexUnavailable
from ..journal import Event, EventFilter, Stage, Status, parse_since, read_events
from ..rules import load_station_rules
from ..spool import Job, parse_isotime, valid_job_id
from ..station import Station
from ..status import service_state
from ..stow import Stow
from . import actions
from . import stow as stow_route
from .security import PRE_COOKIE, SESSION_COOKIE, Session, Sessions, Throttle, csrf_ok, session_key
from . import users as users_mod
from .users import Role, User, UserFile

log = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent
MASK = "***"
PATIENT_ID_KEYS = frozenset({"patient_id", "PatientID", "OtherPatientIDs"})
PATIENT_NAME_KEYS = frozenset({"patient_name", "PatientName", "PatientBirthName",
                               "PatientMotherBirthName", "OtherPatientNames"})
RECEIVED_JOB = re.compile(r"^\d{8}T\d{6}\.\d+Z-[0-9a-f]+$")  # not a fan-out child J.<stream>
LOG_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
MAX_LOG_BYTES = 8 << 20  # a job's log as shown: at most its last 8 MiB
SYNC_EVERY = 1.0   # seconds: the index is synced at most this often
EXPORT_LIMIT = 1_000_000
STATUSES = ("receiving", "classifying", "running", "review", "sending", "done", "failed",
            "unmatched")


class HttpError(Exception):
    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra


class NeedLogin(HttpError):
    def __init__(self) -> None:
        super().__init__(401, "log in first")


def redact(value: Any, may_see_ids: bool) -> Any:
    """``value`` with patient names removed and, unless ``may_see_ids``, patient IDs
    masked, at any depth."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if k in PATIENT_NAME_KEYS:
                continue
            if k in PATIENT_ID_KEYS and not may_see_ids:
                out[k] = MASK if v not in (None, "") else v
            else:
                out[k] = redact(v, may_see_ids)
        return out
    if isinstance(value, list):
        return [redact(v, may_see_ids) for v in value]
    return value


# -- template filters -------------------------------------------------------------------

def _when(text: Any) -> str:
    if not text:
        return ""
    try:
        return parse_isotime(str(text)).strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return str(text)


def _seconds(value: Any) -> str:
    if value is None or value == "":
        return "–"
    try:
        s = float(value)
    except (TypeError, ValueError):
        return str(value)
    if s < 10:
        return f"{s:.1f} s"
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.0f} d"


def _plain_json(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


@dataclass
class Page:
    """One request as a handler sees it."""

    web: Web
    request: Request
    session: Session
    form: Mapping[str, Any] = field(default_factory=dict)
    files: list[tuple[str, bytes]] = field(default_factory=list)

    @property
    def station(self) -> Station:
        return self.web.station

    @property
    def query(self) -> Mapping[str, str]:
        return self.request.query_params

    @property
    def may_see_ids(self) -> bool:
        return self.session.role.allows(Role.OPERATOR)

    @property
    def remote(self) -> str:
        return self.request.client.host if self.request.client else "-"

    def who(self) -> dict[str, Any]:
        return {"user": self.session.user or "(anonymous)", "remote": self.remote}

    def clean(self, value: Any) -> Any:
        return redact(value, self.may_see_ids)

    def json(self, data: Any, status: int = 200) -> JSONResponse:
        return JSONResponse(self.clean(data), status_code=status)

    def render(self, template: str, status: int = 200, **context: Any) -> HTMLResponse:
        return self.web.render(self.request, self.session, template, status,
                               **self.clean(context))


Handler = Callable[[Page], Response]


class Web:
    """The application's state: station, index, users, sessions, throttle, templates."""

    def __init__(self, station: Station, index: Any = None) -> None:
        self.station = station
        self.cfg = station.config.web
        self.index: Any = index if index is not None else Index(station)
        self.users = UserFile(self.cfg.users_file)
        self.sessions = Sessions(session_key(self.cfg.session_key_file), self.users,
                                 self.cfg.session_hours)
        self.throttle = Throttle()
        self.env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"),
                                      autoescape=True)
        self.env.filters.update(when=_when, seconds=_seconds, plain_json=_plain_json)
        self._sync_lock = threading.Lock()
        self._synced = -SYNC_EVERY
        self._background: threading.Thread | None = None
        self.index_error: str | None = None

    # -- the index ------------------------------------------------------------------
    def start_syncing(self, stop: threading.Event) -> threading.Thread:
        """Keep the index in step from a thread of its own (``dts web``): a request then
        never waits for a sync, not even the first after days of backlog (a year of
        journal takes minutes to index), and pages answer from what is there."""
        def loop() -> None:
            while not stop.is_set():
                self._sync_now()
                stop.wait(SYNC_EVERY)

        self._background = threading.Thread(target=loop, name="dts-index", daemon=True)
        self._background.start()
        return self._background

    def sync(self) -> None:
        """Ship new journal lines into the index (at most every SYNC_EVERY seconds);
        the index being down is shown on the page, never raised from here. With the
        background thread running (``start_syncing``) a request does not sync."""
        if self._background is not None and self._background.is_alive():
            return
        self._sync_now()

    def _sync_now(self) -> None:
        if time.monotonic() - self._synced < SYNC_EVERY:
            return
        if not self._sync_lock.acquire(blocking=False):
            return  # another request syncs right now: answer from what is there
        try:
            self.index.sync()
            self.index_error = None
        except IndexUnavailable as exc:
            self.index_error = str(exc)
        except Exception as exc:  # a bug in the index must not take the page down
            log.exception("syncing the index failed")
            self.index_error = f"the index could not be brought up to date: {exc}"
        finally:
            self._synced = time.monotonic()
            self._sync_lock.release()

    # -- who is asking ----------------------------------------------------------------
    def session_of(self, request: Request) -> Session | None:
        if not self.users.any():
            return Session(None, Role.VIEWER, "")  # read-only, everyone a viewer
        return self.sessions.read(request.cookies.get(SESSION_COOKIE))

    def render(self, request: Request, session: Session | None, template: str, status: int,
               **context: Any) -> HTMLResponse:
        html = self.env.get_template(template).render(
            session=session, path=request.url.path, users=self.users.any(),
            tls=self.cfg.tls, Role=Role, **context)
        return HTMLResponse(html, status_code=status)

    def cookie_args(self) -> dict[str, Any]:
        return {"httponly": True, "samesite": "strict", "secure": self.cfg.tls, "path": "/"}


def _wants_json(request: Request) -> bool:
    p = request.url.path
    return p.startswith("/api/") or p == "/metrics"


def _error(web: Web, request: Request, session: Session | None, exc: HttpError) -> Response:
    if isinstance(exc, NeedLogin) and not _wants_json(request):
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?{urlencode({'next': target})}", status_code=303)
    if _wants_json(request):
        return JSONResponse({"error": exc.message, "status": exc.status, **exc.extra},
                            status_code=exc.status)
    return web.render(request, session, "error.html", exc.status, code=exc.status,
                      message=exc.message, extra=exc.extra)


def _headers(response: Response) -> Response:
    h = response.headers
    h.setdefault("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; "
                 "frame-ancestors 'none'; form-action 'self'; base-uri 'none'")
    h.setdefault("X-Content-Type-Options", "nosniff")
    h.setdefault("X-Frame-Options", "DENY")
    h.setdefault("Referrer-Policy", "same-origin")
    h.setdefault("Cache-Control", "no-store")
    return response


async def _read_body(web: Web, request: Request) -> tuple[dict[str, Any], list[tuple[str, bytes]]]:
    """The form (or JSON) of a POST and its uploaded files, within ``max_upload_mb``."""
    limit = web.cfg.max_upload_mb * 1024 * 1024
    length = request.headers.get("content-length")
    kind = request.headers.get("content-type", "")
    if length is None and request.headers.get("transfer-encoding"):
        # a chunked body has no length to check before it is read: anyone could send
        # gigabytes to /api/login; browsers and scripts send Content-Length
        raise HttpError(411, "a request body needs a Content-Length")
    if kind.startswith("multipart/"):
        if length is None:
            raise HttpError(411, "an upload needs a Content-Length")
        if not length.isdigit() or int(length) > limit:
            raise HttpError(413, f"the upload is larger than {web.cfg.max_upload_mb} MB "
                                 "([web] max_upload_mb)")
    elif length is not None and length.isdigit() and int(length) > 1024 * 1024:
        raise HttpError(413, "the request is larger than 1 MB")
    if kind.startswith("application/json"):
        try:
            data = json.loads(await request.body() or b"{}")
        except ValueError:
            raise HttpError(400, "the body is not JSON") from None
        if not isinstance(data, dict):
            raise HttpError(400, "the body is not a JSON object")
        return data, []
    form: FormData = await request.form(max_files=10_000, max_fields=100)
    fields: dict[str, Any] = {}
    files: list[tuple[str, bytes]] = []
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            if value.filename:
                files.append((value.filename, await value.read()))
        else:
            fields.setdefault(key, value)
    await form.close()
    if sum(len(d) for _n, d in files) > limit:
        raise HttpError(413, f"the upload is larger than {web.cfg.max_upload_mb} MB "
                             "([web] max_upload_mb)")
    return fields, files


def endpoint(web: Web, handler: Handler, role: Role | None, post: bool) -> Any:
    """The ASGI endpoint of a handler: session, CSRF and role checked on the server
    before the handler runs (in a worker thread: the core is blocking)."""

    async def serve(request: Request) -> Response:
        session: Session | None = None
        try:
            session = web.session_of(request)
            if role is not None and session is None:
                raise NeedLogin()
            # the role first: a viewer's upload is refused before it is read
            if role is not None and session is not None and not session.role.allows(role):
                raise HttpError(403, f"this needs the role {role.value} (you are "
                                     f"{session.role.value})")
            form: dict[str, Any] = {}
            files: list[tuple[str, bytes]] = []
            if post:
                form, files = await _read_body(web, request)
                assert session is not None
                token = request.headers.get("x-csrf-token") or form.get("csrf")
                if not csrf_ok(session, token):
                    raise HttpError(403, "missing or wrong CSRF token (reload the page)")
            page = Page(web, request, session or Session(None, Role.VIEWER, ""), form, files)
            response = await run_in_threadpool(handler, page)
        except HttpError as exc:
            response = _error(web, request, session, exc)
        except IndexUnavailable as exc:
            response = _error(web, request, session, HttpError(503, f"the index is "
                                                               f"unavailable: {exc}"))
        except actions.NotFound as exc:
            response = _error(web, request, session, HttpError(404, str(exc)))
        except actions.Moved as exc:
            response = _error(web, request, session, HttpError(409, str(exc),
                                                               location=exc.location))
        except (UsageError, ConfigError) as exc:
            response = _error(web, request, session, HttpError(400, str(exc)))
        except DtsError as exc:  # the spool or a peer: said as it is, never a traceback
            log.warning("%s %s: %s", request.method, request.url.path, exc)
            response = _error(web, request, session, HttpError(
                503 if exc.exit_code == 75 else 500, str(exc)))
        return _headers(response)

    return serve


# -- parsing what a request asks for ------------------------------------------------------

def _job_id(value: str) -> str:
    if not valid_job_id(value) or len(value) > 200 or not re.match(r"^[A-Za-z0-9_.-]+$", value):
        raise HttpError(404, f"no job {value!r}")
    return value


def _study_uid(value: str) -> str:
    if not valid_uid(value):
        raise HttpError(404, f"no study {value!r} (not a UID)")
    return value


def _event_filter(query: Mapping[str, str]) -> EventFilter:
    def text(name: str) -> str | None:
        v = (query.get(name) or "").strip()
        return v or None

    stage, status, event = text("stage"), text("status"), text("event")
    if stage is not None and stage not in {s.value for s in Stage}:
        raise UsageError(f"stage: expected one of {', '.join(s.value for s in Stage)}, got "
                         f"{stage!r}")
    statuses: tuple[str, ...] = ()
    if status is not None:
        statuses = tuple(s.strip() for s in status.split(",") if s.strip())
        bad = [s for s in statuses if s not in {x.value for x in Status}]
        if bad:
            raise UsageError(f"status: expected one of {', '.join(s.value for s in Status)}, "
                             f"got {bad[0]!r}")
    if event is not None and event not in {e.value for e in Event}:
        raise UsageError(f"event: not a journal event: {event!r}")
    times: dict[str, datetime | None] = {}
    for name in ("since", "until"):
        v = text(name)
        try:
            times[name] = parse_since(v) if v else None
        except ValueError as exc:
            raise UsageError(f"{name}: {exc}") from None
    return EventFilter(job=text("job"), study=text("study"), accession=text("accession"),
                       stream=text("stream"), stage=stage, status=statuses, event=event,
                       since=times["since"], until=times["until"])


def _int(query: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = query.get(name)
    if raw in (None, ""):
        return default
    try:
        value = int(str(raw))
    except ValueError:
        raise UsageError(f"{name}: expected a whole number, got {raw!r}") from None
    if not low <= value <= high:
        raise UsageError(f"{name}: expected {low} to {high}, got {value}")
    return value


def _query_string(query: Mapping[str, str], **changes: Any) -> str:
    params = {k: v for k, v in query.items() if v not in ("", None)}
    params.update({k: v for k, v in changes.items()})
    return urlencode({k: v for k, v in params.items() if v not in ("", None)})


# -- the handlers -----------------------------------------------------------------------

def overview(p: Page) -> Response:
    p.web.sync()
    data = p.web.index.overview()
    data.setdefault("services", {})["web"] = service_state(p.station.spool, "web")
    if _wants_json(p.request):
        return p.json(data)
    days = data.get("events_per_day") or []
    peak = max([d.get("total", 0) for d in days] + [1])
    return p.render("overview.html", o=data, days=days, peak=peak,
                    index_error=p.web.index_error)


def exams(p: Page) -> Response:
    query = ExamQuery.parse(p.query)
    p.web.sync()
    page = p.web.index.exams(query)
    rows, total = page.rows, page.total
    if query.text and not p.may_see_ids:
        # a viewer cannot see patient IDs, so cannot find exams by one either
        rows = [r for r in rows if query.text in (r.get("accession"), r.get("study_uid"))
                or query.text in (r.get("jobs") or [])]
        total = len(rows) if len(rows) != len(page.rows) else total
    data = {"rows": rows, "total": total, "page": page.page, "per_page": page.per_page}
    if _wants_json(p.request):
        return p.json(data)
    pages = max(1, -(-page.total // max(1, page.per_page)))
    streams = [s.name for s in p.station.config.streams]
    return p.render("exams.html", data=data, pages=pages, q=dict(p.query), statuses=STATUSES,
                    streams=streams, index_error=p.web.index_error,
                    prev_qs=_query_string(p.query, page=page.page - 1),
                    next_qs=_query_string(p.query, page=page.page + 1))


def timeline(p: Page) -> Response:
    uid = _study_uid(p.request.path_params["study_uid"])
    p.web.sync()
    data = p.web.index.timeline(uid)
    if data is None:
        raise actions.NotFound(f"no study {uid} in this station's spool or index")
    p.station.journal.emit(Stage.WEB, Event.TIMELINE_VIEWED, Status.INFO,
                           f"{p.who()['user']} opened the timeline of study {uid}",
                           study_uid=uid, accession=data.get("accession"), **p.who())
    if _wants_json(p.request):
        return p.json(data)
    params = {s.name: s.parameters for s in p.station.config.streams if s.parameters}
    tails = {j["id"]: _log_tail(p, j) for j in data.get("jobs", []) if j.get("log_files")}
    # the page's own audit lines (who looked) go below the story, not into it
    audit = [e for e in data.get("entries", []) if e.get("stage") == Stage.WEB.value]
    data = {**data, "entries": [e for e in data.get("entries", [])
                                if e.get("stage") != Stage.WEB.value]}
    return p.render("timeline.html", t=data, params=params, tails=tails, audit=audit,
                    done=dict(p.query))


def _log_tail(p: Page, job: Mapping[str, Any], lines: int = 15) -> str:
    """The last lines of a job's first log file (the whole log is a link)."""
    found = p.station.spool.locate(str(job["id"]))
    if found is None:
        return ""
    for name in job.get("log_files") or []:
        path = found[1] / "logs" / str(name)
        if LOG_FILE.match(str(name)) and path.is_file() and not path.is_symlink():
            with open(path, "rb") as fh:
                fh.seek(max(0, path.stat().st_size - 4096))
                text = fh.read().decode(errors="replace")
            return "\n".join(text.splitlines()[-lines:])
    return ""


def explain_job(p: Page) -> Response:
    """``dts classify --explain JOB`` (reads the job's headers; moves nothing)."""
    job_id = _job_id(p.request.path_params["job"])
    if p.station.spool.locate(job_id) is None:
        raise actions.NotFound(f"no job {job_id}")
    result = actions.test_rules_on_job(p.station, job_id)
    if _wants_json(p.request):
        return p.json(result)
    return p.render("explain.html", e=result)


def attention(p: Page) -> Response:
    p.web.sync()
    rows = p.web.index.attention()
    if _wants_json(p.request):
        return p.json({"jobs": rows})
    return p.render("attention.html", rows=rows, done=dict(p.query))


def _job_of(p: Page, job_id: str) -> Job | None:
    found = p.station.spool.locate(job_id)
    return Job(found[1]) if found is not None else None


def requeue(p: Page) -> Response:
    job = _job_id(str(p.form.get("job") or ""))
    target = str(p.form.get("to") or "")
    seen = str(p.form.get("from") or "") or None
    p.station.journal.emit(Stage.WEB, Event.REQUEUE, Status.INFO,
                           f"{p.who()['user']} asked to requeue {job} to {target}",
                           job=_job_of(p, job), target=target, **p.who())
    done = actions.requeue_job(p.station, job, target, seen_in=seen,
                               by=f"web:{p.session.user}")
    if _wants_json(p.request):
        return p.json(done)
    return RedirectResponse("/attention?" + urlencode({"requeued": job, "to": done["to"]}),
                            status_code=303)


def review_decision(p: Page) -> Response:
    """Approve or reject a job's results waiting in review/ (the timeline's buttons)."""
    job = _job_id(str(p.form.get("job") or ""))
    decision = str(p.form.get("decision") or "")
    reason = str(p.form.get("reason") or "").strip()[:1000] or None
    study = (Job(found[1]).read().get("study_uid")
             if (found := p.station.spool.locate(job)) is not None else None)
    done = actions.review_job(p.station, job, decision, by=f"web:{p.session.user}",
                              reason=reason)
    if _wants_json(p.request):
        return p.json(done)
    target = f"/exams/{study}" if isinstance(study, str) and valid_uid(study) else "/attention"
    return RedirectResponse(target + "?" + urlencode({"reviewed": job,
                                                      "decision": done["decision"]}),
                            status_code=303)


def log_page(p: Page) -> Response:
    flt = _event_filter(p.query)
    limit = _int(p.query, "limit", 200, 1, 5000)
    offset = _int(p.query, "offset", 0, 0, 10_000_000)
    after = p.query.get("after")
    if after:  # the live tail: only what is newer than the newest line shown
        try:
            flt.since = parse_isotime(after)
        except ValueError:
            raise UsageError(f"after: not an ISO-8601 time: {after!r}") from None
    p.web.sync()
    events = p.web.index.events(flt, limit=limit, offset=offset)
    if after:
        events = [e for e in events if str(e.get("time", "")) > after]
    if _wants_json(p.request):
        return p.json({"events": events, "limit": limit, "offset": offset})
    return p.render("log.html", events=events, q=dict(p.query), limit=limit, offset=offset,
                    stages=[s.value for s in Stage], statuses=[s.value for s in Status],
                    export_qs=_query_string(p.query, limit=None, offset=None, after=None),
                    next_qs=_query_string(p.query, offset=offset + limit),
                    prev_qs=_query_string(p.query, offset=max(0, offset - limit)),
                    index_error=p.web.index_error)


def log_export(p: Page) -> Response:
    """The journal files (the truth, not the index) with the page's filters."""
    flt = _event_filter(p.query)
    kind = p.request.path_params["kind"]
    rows = (p.clean(e) for e in read_events(p.station.spool, flt))
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    if kind == "jsonl":
        body: Iterator[str] = (json.dumps(e, default=str, separators=(",", ":")) + "\n"
                               for e in rows)
        media = "application/x-ndjson"
    elif kind == "csv":
        body = _csv(rows)
        media = "text/csv; charset=utf-8"
    else:
        raise HttpError(404, f"no export {kind!r} (csv or jsonl)")
    return StreamingResponse(body, media_type=media, headers={
        "Content-Disposition": f'attachment; filename="dts-log-{stamp}.{kind}"'})


def _csv(rows: Iterator[dict[str, Any]]) -> Iterator[str]:
    columns = ["time", "stage", "event", "status", "job", "study_uid", "accession", "stream",
               "message", "details"]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(columns)
    for rec in rows:
        details = {k: v for k, v in rec.items() if k not in columns}
        writer.writerow([rec.get(c, "") for c in columns[:-1]] +
                        [json.dumps(details, default=str)])
        yield buf.getvalue()
        buf.seek(0)
        buf.truncate()
    yield buf.getvalue()


def _configuration(p: Page) -> dict[str, Any]:
    cfg = p.station.config
    try:
        config_mod.load(cfg.path, p.station.spool.root)
        validation: dict[str, Any] = {"valid": True, "message": f"{cfg.path}: ok"}
    except DtsError as exc:
        validation = {"valid": False, "message": str(exc)}
    try:
        types = load_station_rules(cfg.rules_path, cfg.path).types
        rules: dict[str, Any] = {"file": str(cfg.rules_path), "types": types}
    except DtsError as exc:
        rules = {"file": str(cfg.rules_path), "types": [], "error": str(exc)}
    dests = [{"name": d.name, "kind": "folder" if d.is_folder else "stow" if d.is_web
              else "dicom", "url": d.url,
              "ae_title": d.ae_title, "host": d.host, "port": d.port,
              "folder": str(d.folder) if d.folder else None, "tls": d.tls is not None}
             for d in cfg.destinations.values()]
    out: dict[str, Any] = {"file": str(cfg.path), "validation": validation, "rules": rules,
                           "destinations": dests,
                           "streams": [s.name for s in cfg.streams]}
    if p.session.role.allows(Role.ADMIN):
        out["effective"] = config_mod.effective(cfg)
    return out


def configuration(p: Page) -> Response:
    data = _configuration(p)
    if _wants_json(p.request):
        return p.json(data)
    effective = tomli_w.dumps(data["effective"]) if "effective" in data else None
    recent = [] if not p.may_see_ids else _recent_jobs(p)
    return p.render("config.html", c=data, effective=effective, recent=recent, echo=None,
                    test=None, tested=None)


def _recent_jobs(p: Page) -> list[str]:
    """Received jobs to pick in the rule tester, newest first."""
    spool = p.station.spool
    ids: list[str] = []
    for loc in spool.locations():
        ids += [j for j in spool.list(loc.queue, loc.state) if RECEIVED_JOB.match(j)]
    return sorted(set(ids), reverse=True)[:50]


def echo(p: Page) -> Response:
    name = str(p.form.get("destination") or "")
    result = actions.echo_destination(p.station, name)
    p.station.journal.emit(Stage.WEB, Event.ECHO,
                           Status.INFO if result["reachable"] else Status.WARNING,
                           f"{p.who()['user']} echoed {name}: "
                           f"{'reachable' if result['reachable'] else result.get('reason')}",
                           destination=name, reachable=result["reachable"], **p.who())
    if _wants_json(p.request):
        return p.json(result)
    return _config_page(p, echo=result)


def rule_test(p: Page) -> Response:
    job = str(p.form.get("job") or "").strip()
    if p.files:
        result = actions.test_rules_on_files(p.station, p.files,
                                             calling_ae=str(p.form.get("calling_ae") or ""),
                                             called_ae=str(p.form.get("called_ae") or ""))
        what = f"{len(p.files)} uploaded file(s)"
    elif job:
        _job_id(job)
        if p.station.spool.locate(job) is None:
            raise actions.NotFound(f"no job {job}")
        result = actions.test_rules_on_job(p.station, job)
        what = f"job {job}"
    else:
        raise UsageError("job: pick a job, or upload DICOM files")
    p.station.journal.emit(Stage.WEB, Event.RULE_TEST, Status.INFO,
                           f"{p.who()['user']} tested the rules on {what}: "
                           f"{result.get('outcome')}", job=_job_of(p, job) if job else None,
                           study_uid=(result.get("study") or {}).get("StudyInstanceUID"),
                           **p.who())
    if _wants_json(p.request):
        return p.json(result)
    return _config_page(p, test=result, tested=what)


def _config_page(p: Page, *, echo: dict[str, Any] | None = None,
                 test: dict[str, Any] | None = None, tested: str | None = None) -> Response:
    """The configuration page, with the answer of a C-ECHO or a rule test on it."""
    data = _configuration(p)
    effective = tomli_w.dumps(data["effective"]) if "effective" in data else None
    return p.render("config.html", c=data, effective=effective, recent=_recent_jobs(p),
                    echo=echo, test=test, tested=tested)


def show_job(p: Page) -> Response:
    """What ``dts show --json JOB`` prints."""
    job_id = _job_id(p.request.path_params["job"])
    found = p.station.spool.locate(job_id)
    if found is None:
        raise actions.NotFound(f"no job {job_id}")
    loc, path = found
    job = Job(path)
    return p.json({"location": str(loc), "path": str(path), "job": job.read(),
                   "events": job.events()})


def job_log(p: Page) -> Response:
    job_id = _job_id(p.request.path_params["job"])
    name = p.request.path_params["name"]
    found = p.station.spool.locate(job_id)
    if found is None or not LOG_FILE.match(name):
        raise actions.NotFound(f"no log {name!r} of job {job_id}")
    path = found[1] / "logs" / name
    if not path.is_file() or path.is_symlink():
        raise actions.NotFound(f"no log {name!r} of job {job_id}")
    # a model that logged gigabytes must not cost the page as much memory: its end
    with open(path, "rb") as fh:
        size = fh.seek(0, 2)
        fh.seek(max(0, size - MAX_LOG_BYTES))
        data = fh.read(MAX_LOG_BYTES)
    head = (f"[the first {size - len(data)} bytes of {size} are left out]\n"
            if size > len(data) else "")
    return PlainTextResponse(head + data.decode(errors="replace"))


def metrics_page(p: Page) -> Response:
    p.web.sync()
    body, content_type = metrics.render(p.station, p.web.index)
    return Response(body, media_type=content_type)


def me(p: Page) -> Response:
    return p.json({"user": p.session.user, "role": p.session.role.value,
                   "csrf": p.session.csrf or None, "read_only": not p.web.users.any()})


# -- logging in and out -------------------------------------------------------------------

def _safe_next(target: str | None) -> str:
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/"


def login_form(p: Page) -> Response:
    token, cookie = p.web.sessions.pre_token(p.request.cookies.get(PRE_COOKIE))
    response = p.render("login.html", token=token, next=_safe_next(p.query.get("next")),
                        message=None, name="")
    response.set_cookie(PRE_COOKIE, cookie, max_age=3600, **p.web.cookie_args())
    return response


def _login(p: Page, name: str, password: str) -> User:
    """Check a name and password, throttled; audited either way."""
    web = p.web
    if not web.users.any():
        raise HttpError(400, "this page has no users: it is read-only for everyone")
    wait = web.throttle.wait(name, p.remote)
    if wait > 0:
        p.station.journal.emit(Stage.WEB, Event.LOGIN_FAILED, Status.WARNING,
                               f"login of {name!r} from {p.remote} refused: throttled",
                               user=name, remote=p.remote, throttled=True)
        raise HttpError(429, f"too many failed logins: try again in {wait / 60:.0f} "
                             f"minute(s)", retry_after=round(wait))
    user = web.users.authenticate(name, password)
    if user is None:
        web.throttle.failed(name, p.remote)
        p.station.journal.emit(Stage.WEB, Event.LOGIN_FAILED, Status.WARNING,
                               f"failed login of {name!r} from {p.remote}",
                               user=name, remote=p.remote)
        raise HttpError(401, "wrong name or password")
    web.throttle.succeeded(name, p.remote)
    p.station.journal.emit(Stage.WEB, Event.LOGIN, Status.INFO,
                           f"{user.name} ({user.role.value}) logged in from {p.remote}",
                           user=user.name, role=user.role.value, remote=p.remote)
    return user


def login(p: Page) -> Response:
    name = str(p.form.get("name") or "")[:64]
    nxt = _safe_next(str(p.form.get("next") or ""))
    if not p.web.sessions.check_pre(p.request.cookies.get(PRE_COOKIE), p.form.get("csrf")):
        log.warning("login form from %s without a valid token (cookie %s)", p.remote,
                    "present" if p.request.cookies.get(PRE_COOKIE) else "absent")
        raise HttpError(403, "missing or wrong CSRF token (reload the login page)")
    try:
        user = _login(p, name, str(p.form.get("password") or ""))
    except HttpError as exc:
        if exc.status not in (401, 429):
            raise
        token, cookie = p.web.sessions.pre_token(p.request.cookies.get(PRE_COOKIE))
        response: Response = p.render("login.html", status=exc.status, token=token, next=nxt,
                            message=exc.message, name=name)
        response.set_cookie(PRE_COOKIE, cookie, max_age=3600, **p.web.cookie_args())
        return response
    _s, cookie = p.web.sessions.make(user.name)
    response = RedirectResponse(nxt, status_code=303)
    response.set_cookie(SESSION_COOKIE, cookie, max_age=p.web.sessions.max_age,
                        **p.web.cookie_args())
    response.delete_cookie(PRE_COOKIE, path="/")
    return response


def api_login(p: Page) -> Response:
    """For scripts: JSON ``{"name", "password"}`` -> the session cookie and its CSRF
    token (a JSON body cannot come from another site's form)."""
    if not p.request.headers.get("content-type", "").startswith("application/json"):
        raise HttpError(415, "send {\"name\", \"password\"} as application/json")
    name = str(p.form.get("name") or "")[:64]
    user = _login(p, name, str(p.form.get("password") or ""))
    session, cookie = p.web.sessions.make(user.name)
    response = JSONResponse({"user": session.user, "role": session.role.value,
                             "csrf": session.csrf})
    response.set_cookie(SESSION_COOKIE, cookie, max_age=p.web.sessions.max_age,
                        **p.web.cookie_args())
    return response


def logout(p: Page) -> Response:
    if p.session.user is not None:
        p.web.sessions.void(p.session)
        p.station.journal.emit(Stage.WEB, Event.LOGOUT, Status.INFO,
                               f"{p.session.user} logged out from {p.remote}", **p.who())
    response: Response = (JSONResponse({"logged_out": True}) if _wants_json(p.request)
                          else RedirectResponse("/login", status_code=303))
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


async def _login_post(web: Web, request: Request) -> Response:
    """POST /login and /api/login: the only POSTs without a session."""
    try:
        form, _files = await _read_body(web, request)
        page = Page(web, request, Session(None, Role.VIEWER, ""), form)
        handler = api_login if request.url.path.startswith("/api/") else login
        response = await run_in_threadpool(handler, page)
    except HttpError as exc:
        response = _error(web, request, None, exc)
    return _headers(response)


def create_app(station: Station, index: Any = None) -> Starlette:
    """The ASGI application of ``dts web`` for one station (``index``: for tests)."""
    web = Web(station, index)
    users_mod.dummy_hash()  # now, so that no login waits for it (the name-timing guard)
    V, O = Role.VIEWER, Role.OPERATOR

    def get(path: str, handler: Handler, role: Role | None = V) -> Route:
        return Route(path, endpoint(web, handler, role, post=False), methods=["GET"])

    def post(path: str, handler: Handler, role: Role = O) -> Route:
        return Route(path, endpoint(web, handler, role, post=True), methods=["POST"])

    async def login_post(request: Request) -> Response:
        return await _login_post(web, request)

    stow_receiver = Stow(station)

    async def stow_post(request: Request) -> Response:
        return _headers(await stow_route.store(stow_receiver, web.users, web.throttle,
                                               request))

    routes = [
        get("/", overview), get("/api/overview", overview),
        get("/exams", exams), get("/api/exams", exams),
        get("/exams/{study_uid}", timeline), get("/api/exams/{study_uid}", timeline),
        get("/attention", attention), get("/api/attention", attention),
        post("/attention/requeue", requeue), post("/api/requeue", requeue),
        post("/exams/review", review_decision), post("/api/review", review_decision),
        get("/log", log_page), get("/api/log", log_page),
        get("/log/export.{kind}", log_export), get("/api/log/export.{kind}", log_export),
        get("/config", configuration), get("/api/config", configuration),
        post("/config/echo", echo), post("/api/echo", echo),
        post("/config/rule-test", rule_test), post("/api/rule-test", rule_test),
        get("/jobs/{job}", show_job), get("/api/jobs/{job}", show_job),
        get("/jobs/{job}/logs/{name}", job_log),
        get("/jobs/{job}/explain", explain_job), get("/api/jobs/{job}/explain", explain_job),
        get("/metrics", metrics_page, role=None),
        get("/api/me", me),
        get("/login", login_form, role=None),
        Route("/login", login_post, methods=["POST"]),
        Route("/api/login", login_post, methods=["POST"]),
        # STOW-RS (dts.web.stow): its own login (token or Basic), never a session cookie
        Route("/dicom-web/studies", stow_post, methods=["POST"]),
        Route("/dicom-web/studies/{study_uid}", stow_post, methods=["POST"]),
        post("/logout", logout, role=V), post("/api/logout", logout, role=V),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes)
    app.state.web = web
    app.state.stow = stow_receiver
    return app
