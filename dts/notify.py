"""Owns webhooks (``[[notify]]``): telling people what happened, without a stage waiting.

A notifier follows the journal with a cursor of its own, as the journal shipper does
(``spool/notify/cursor.json``: per journal file its inode and the offset read), and
turns each line of a class a webhook asked for into a pending delivery in the outbox,
``spool/notify/<time>-<id>.json`` (one JSON file per delivery and webhook, written
atomically; the name is made from the journal line and the URL, so a line read again
after a crash makes no second file). Only then does the cursor move. Deliveries are
POSTed when due; a failure (no connection, 5xx, 408, 429) is retried with backoff
(``RETRY_FIRST`` doubling to ``RETRY_MAX``), a 4xx answer (other than 408/429) is
given up at once, a delivery older than ``GIVE_UP_AFTER`` is given up: a delivery given
up moves to ``spool/notify/gave-up/`` and is a ``notify-gave-up`` event. Nothing a
stage does waits for any of this; a stage never even knows.

Classes (``events = [...]``): ``failed`` = journal events ``failed`` and
``send-failed``; ``delivered`` = ``sent``; ``review`` = ``review-waiting``; ``stuck`` = a
queue whose oldest job waits longer than ``stuck_after`` (what ``dts status --check
--max-age`` reports), once when it becomes stuck (again after it recovered). The
notifier's own events (``notify-*``) are never delivered.

A webhook's request: ``POST url`` with a JSON body (``body()``), ``Content-Type:
application/json``, ``X-DTS-Event`` (the class), ``X-DTS-Delivery`` (the delivery id:
a receiver may see one twice and should ignore the second), ``X-DTS-Timestamp`` (Unix
seconds when it was sent) and, with ``secret_file``, ``X-DTS-Signature:
sha256=<hex HMAC-SHA256 with the secret of "<timestamp>.<body>">``: a receiver checks
the signature and refuses a timestamp more than a few minutes old (a replay).

The first run starts at the end of the journal as it is (history is not delivered).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import requests

from .config import Config, Notify
from .journal import Event, Stage, Status
from .spool import Spool, State, age_seconds, isotime, parse_isotime, utcnow, write_file_durably
from .station import Station
from .status import NOTIFY_CURSOR as CURSOR
from .status import NOTIFY_DIR, service_state
from .status import NOTIFY_GAVE_UP as GAVE_UP

log = logging.getLogger(__name__)

CLASSES: dict[str, str] = {"failed": "failed", "send-failed": "failed", "sent": "delivered",
                           "review-waiting": "review"}
RETRY_FIRST = 10.0
RETRY_MAX = 3600.0
GIVE_UP_AFTER = 7 * 86400.0
TEMPORARY_HTTP = frozenset({408, 429})
MAX_LINE = 1 << 20


def notify_dir(spool: Spool) -> Path:
    return spool.root / NOTIFY_DIR


@dataclass
class Round:
    """What one round did."""

    queued: int = 0
    delivered: int = 0
    failed: int = 0
    gave_up: int = 0
    pending: int = 0
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"queued": self.queued, "delivered": self.delivered, "failed": self.failed,
                "gave_up": self.gave_up, "pending": self.pending}


def web_base(config: Config, spool: Spool) -> str | None:
    """The page's address for links, when there is a page: the running ``dts web``'s
    URL, else the one ``[web]`` describes."""
    state = service_state(spool, "web")
    if state.get("running") and state.get("url"):
        url = str(state["url"]).rstrip("/")
        host = config.web.host
        if host in ("0.0.0.0", "::"):
            url = url.replace(f"//{host}:", f"//{socket.gethostname()}:")
        return url
    if not config.web.enabled:
        return None
    host = config.web.host
    if host in ("0.0.0.0", "::"):
        host = socket.gethostname()
    shown = f"[{host}]" if ":" in host else host
    return f"{'https' if config.web.tls else 'http'}://{shown}:{config.web.port}"


def body(config: Config, spool: Spool, kind: str, rec: dict[str, Any]) -> dict[str, Any]:
    """The JSON a webhook receives for journal line ``rec`` of class ``kind``."""
    out: dict[str, Any] = {
        "event": kind,
        "journal_event": rec.get("event"),
        "time": rec.get("time"),
        "station": config.station.ae_title,
        "host": rec.get("host") or socket.gethostname(),
        "job": rec.get("job"),
        "study_uid": rec.get("study_uid"),
        "accession": rec.get("accession"),
        "stream": rec.get("stream"),
        "stage": rec.get("stage"),
        "status": rec.get("status"),
        "message": rec.get("message"),
    }
    for key in ("queue", "oldest_seconds", "destination"):
        if rec.get(key) is not None:
            out[key] = rec[key]
    links: dict[str, str] = {}
    base = web_base(config, spool)
    if base is not None:
        if rec.get("study_uid"):
            links["exam"] = f"{base}/exams/{rec['study_uid']}"
        if rec.get("job"):
            links["job"] = f"{base}/jobs/{rec['job']}"
        if kind == "stuck":
            links["attention"] = f"{base}/attention"
    out["links"] = links
    return out


def signature(secret: bytes, timestamp: str, payload: bytes) -> str:
    """``X-DTS-Signature``: HMAC-SHA256 of ``<timestamp>.<body>``."""
    mac = hmac.new(secret, timestamp.encode() + b"." + payload, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


class Notifier:
    """The webhooks of one station: journal -> outbox -> POST (see the module)."""

    def __init__(self, station: Station) -> None:
        self.station = station
        self.config = station.config
        self.hooks = station.config.notify
        self.dir = notify_dir(station.spool)
        self._lock = threading.Lock()

    # -- the outbox ------------------------------------------------------------------
    def outbox(self) -> list[Path]:
        try:
            return sorted(p for p in self.dir.iterdir()
                          if p.suffix == ".json" and p.name != CURSOR and not
                          p.name.startswith("."))
        except FileNotFoundError:
            return []

    def _queue(self, hook: Notify, kind: str, key: str, rec: dict[str, Any]) -> bool:
        digest = hashlib.sha256(f"{hook.url}\n{key}".encode()).hexdigest()[:16]
        when = str(rec.get("time") or isotime()).replace(":", "").replace("-", "")
        path = self.dir / f"{when}-{digest}.json"
        if path.exists() or (self.dir / GAVE_UP / path.name).exists():
            return False
        entry: dict[str, Any] = {"id": f"{when}-{digest}", "url": hook.url, "event": kind,
                 "created_at": isotime(), "attempts": 0, "next_attempt_at": None,
                 "last_error": None,
                 "body": body(self.config, self.station.spool, kind, rec)}
        entry["body"]["id"] = entry["id"]
        write_file_durably(path, json.dumps(entry, sort_keys=True).encode() + b"\n")
        return True

    # -- following the journal -------------------------------------------------------
    def _load_cursor(self) -> dict[str, Any] | None:
        try:
            data = json.loads((self.dir / CURSOR).read_bytes())
            return data if isinstance(data, dict) else None
        except (FileNotFoundError, ValueError):
            return None

    def _save_cursor(self, cursor: dict[str, Any]) -> None:
        write_file_durably(self.dir / CURSOR, json.dumps(cursor, sort_keys=True).encode()
                           + b"\n")

    def collect(self) -> int:
        """Journal lines (and stuck queues) since the cursor -> outbox; the count queued."""
        if not self.hooks:
            return 0
        self.dir.mkdir(parents=True, exist_ok=True)
        log_dir = self.station.spool.log_dir
        present = {p.name: p for p in sorted(log_dir.glob("*.jsonl"))} \
            if log_dir.is_dir() else {}
        cursor = self._load_cursor()
        if cursor is None:  # the first run: from here on, not the history
            files = {}
            for name, path in present.items():
                st = path.stat()
                files[name] = {"ino": st.st_ino, "offset": st.st_size}
            self._save_cursor({"files": files, "stuck": {}})
            return 0
        files = {k: v for k, v in dict(cursor.get("files") or {}).items() if k in present}
        stuck: dict[str, Any] = dict(cursor.get("stuck") or {})
        queued = 0
        for name, path in present.items():
            try:
                fh = open(path, "rb")  # noqa: SIM115 - closed by the with below
            except FileNotFoundError:
                continue
            with fh:
                st = os.fstat(fh.fileno())
                c = files.get(name)
                offset = int(c["offset"]) if c and c.get("ino") == st.st_ino else 0
                if offset > st.st_size:
                    offset = 0
                if offset == st.st_size:
                    files[name] = {"ino": st.st_ino, "offset": offset}
                    continue
                fh.seek(offset)
                for raw in fh:
                    if not raw.endswith(b"\n"):
                        break  # a line still being written
                    offset += len(raw)
                    queued += self._line(raw, f"{name}:{offset}")
                files[name] = {"ino": st.st_ino, "offset": offset}
        queued += self._stuck(stuck)
        self._save_cursor({"files": files, "stuck": stuck})
        return queued

    def _line(self, raw: bytes, key: str) -> int:
        if len(raw) > MAX_LINE:
            return 0
        try:
            rec = json.loads(raw)
        except ValueError:
            return 0
        if not isinstance(rec, dict):
            return 0
        kind = CLASSES.get(str(rec.get("event")))
        if kind is None:
            return 0
        return sum(self._queue(h, kind, key, rec) for h in self.hooks if kind in h.events)

    def _stuck(self, stuck: dict[str, Any]) -> int:
        hooks = [h for h in self.hooks if "stuck" in h.events]
        if not hooks:
            stuck.clear()
            return 0
        spool = self.station.spool
        now = time.time()
        queued = 0
        for q in Spool.WORK:
            ids = spool.list(q, State.NEW) + spool.list(q, State.CUR)
            ages = [a for a in (age_seconds(i, now) for i in ids) if a is not None]
            oldest = max(ages) if ages else None
            for hook in hooks:
                key = f"{hook.url}|{q.value}"
                if oldest is None or oldest <= hook.stuck_after:
                    stuck.pop(key, None)  # recovered: the next time is news again
                    continue
                if key in stuck:
                    continue
                stuck[key] = isotime()
                rec = {"event": "stuck", "time": isotime(), "stage": q.value,
                       "status": Status.WARNING.value, "queue": q.value,
                       "oldest_seconds": round(oldest),
                       "message": f"{q.value}: the oldest job waits for {oldest:.0f}s "
                                  f"(> {hook.stuck_after:.0f}s)"}
                queued += self._queue(hook, "stuck", f"stuck|{q.value}|{stuck[key]}", rec)
        return queued

    # -- delivering ------------------------------------------------------------------
    def deliver(self, *, all_now: bool = False) -> Round:
        """POST every due delivery of the outbox (``all_now``: due or not)."""
        result = Round()
        hooks = {h.url: h for h in self.hooks}
        now = utcnow()
        for path in self.outbox():
            try:
                entry = json.loads(path.read_bytes())
            except FileNotFoundError:
                continue
            except ValueError:
                self._give_up(path, {"id": path.stem, "url": "?", "event": "?", "body": {}},
                              "the outbox file is not JSON", result)
                continue
            due = entry.get("next_attempt_at")
            if due and not all_now and parse_isotime(str(due)) > now:
                result.pending += 1
                continue
            hook = hooks.get(str(entry.get("url")))
            if hook is None:
                self._give_up(path, entry, "its url is no longer a [[notify]] url", result)
                continue
            self._attempt(path, entry, hook, result)
        return result

    def _attempt(self, path: Path, entry: dict[str, Any], hook: Notify, result: Round) -> None:
        payload = json.dumps(entry.get("body") or {}, sort_keys=True).encode()
        timestamp = str(int(time.time()))
        headers = {"Content-Type": "application/json", "User-Agent": "dts-notify",
                   "X-DTS-Event": str(entry.get("event")),
                   "X-DTS-Delivery": str(entry.get("id")), "X-DTS-Timestamp": timestamp}
        if hook.secret_file is not None:
            try:
                secret = hook.secret_file.read_bytes().strip()
            except OSError as exc:
                self._retry(path, entry, f"cannot read secret_file {hook.secret_file}: "
                                         f"{exc.strerror or exc}", result)
                return
            headers["X-DTS-Signature"] = signature(secret, timestamp, payload)
        session = requests.Session()
        session.trust_env = False  # no proxy from the environment
        try:
            with session.post(hook.url, data=payload, headers=headers, timeout=hook.timeout,
                              allow_redirects=False, stream=True) as rsp:
                code, why = rsp.status_code, rsp.reason
        except requests.RequestException as exc:
            self._retry(path, entry, f"{hook.url} unreachable: {_short(exc)}", result)
            return
        finally:
            session.close()
        if 400 <= code < 500 and code not in TEMPORARY_HTTP:
            self._give_up(path, entry, f"{hook.url} answered HTTP {code} {why}", result)
            return
        if not 200 <= code < 300:
            self._retry(path, entry, f"{hook.url} answered HTTP {code} {why}", result)
            return
        path.unlink(missing_ok=True)
        result.delivered += 1
        if int(entry.get("attempts") or 0) > 0:
            self.station.journal.emit(
                Stage.NOTIFY, Event.NOTIFY_DELIVERED, Status.INFO,
                f"webhook {hook.url}: {entry.get('event')} delivery {entry.get('id')} "
                f"delivered after {entry['attempts']} failed tries", **self._fields(entry),
                best_effort=True)

    def _retry(self, path: Path, entry: dict[str, Any], reason: str, result: Round) -> None:
        attempts = int(entry.get("attempts") or 0) + 1
        try:
            age = (utcnow() - parse_isotime(str(entry.get("created_at")))).total_seconds()
        except (ValueError, TypeError):
            age = 0.0
        if age > GIVE_UP_AFTER:
            self._give_up(path, entry, f"still failing after {age / 86400:.0f} days: {reason}",
                          result)
            return
        delay = min(RETRY_MAX, RETRY_FIRST * 2 ** (attempts - 1)) * random.uniform(0.75, 1.0)
        entry.update(attempts=attempts, last_error=reason,
                     next_attempt_at=isotime(utcnow() + _seconds(delay)))
        write_file_durably(path, json.dumps(entry, sort_keys=True).encode() + b"\n")
        result.failed += 1
        result.pending += 1
        self.station.journal.emit(
            Stage.NOTIFY, Event.NOTIFY_FAILED, Status.WARNING,
            f"webhook: {entry.get('event')} delivery {entry.get('id')} failed (try "
            f"{attempts}): {reason}; next try at {entry['next_attempt_at']}",
            **self._fields(entry), best_effort=True)

    def _give_up(self, path: Path, entry: dict[str, Any], reason: str, result: Round) -> None:
        entry.update(gave_up_at=isotime(), last_error=reason)
        keep = self.dir / GAVE_UP
        keep.mkdir(parents=True, exist_ok=True)
        write_file_durably(keep / path.name, json.dumps(entry, sort_keys=True).encode() + b"\n")
        path.unlink(missing_ok=True)
        result.gave_up += 1
        self.station.journal.emit(
            Stage.NOTIFY, Event.NOTIFY_GAVE_UP, Status.ERROR,
            f"webhook: {entry.get('event')} delivery {entry.get('id')} given up: {reason} "
            f"(kept in {NOTIFY_DIR}/{GAVE_UP}/{path.name})", **self._fields(entry),
            best_effort=True)

    @staticmethod
    def _fields(entry: dict[str, Any]) -> dict[str, Any]:
        b = entry.get("body") or {}
        return {"url": entry.get("url"), "delivery": entry.get("id"),
                "notify_event": entry.get("event"), "subject_job": b.get("job"),
                "study_uid": b.get("study_uid"), "accession": b.get("accession")}

    # -- rounds ------------------------------------------------------------------------
    def run_once(self, *, all_now: bool = False) -> Round:
        with self._lock:
            queued = self.collect()
            result = self.deliver(all_now=all_now)
            result.queued = queued
            return result

    def run(self, stop: threading.Event, interval: float = 1.0) -> None:
        """Rounds until ``stop`` (``dts watch``, ``dts notify``)."""
        while not stop.is_set():
            try:
                self.run_once()
            except Exception:  # a bug here must not stop the station
                log.exception("notify round failed")
            stop.wait(interval)


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) <= 200 else text[:197] + "..."


def _seconds(value: float) -> timedelta:
    return timedelta(seconds=value)


__all__ = ["Notifier", "body", "signature"]
