"""Owns the journal database: a mirror of the spool's event journal in SQL.

The daily files ``spool/log/YYYY-MM-DD.jsonl`` stay the source of truth; no stage
ever waits on the database. A *shipper* tails those files with a durable cursor
(``spool/log/.dbcursor``: per file, its inode and the byte offset shipped so far)
and inserts new events in batches into table ``dts_events`` (created if missing), and
each ``result`` event also as a row of ``dts_results`` (docs/results.md).
Each row carries ``event_key``, the SHA-256 of the event's journal line, under a
unique constraint: a batch delivered twice (a crash between the commit and the
cursor update, a cursor lost, a file read again) inserts nothing the second time.
While the database is down the cursor stays put and the events wait in the files.

``dts watch`` runs the shipper in a thread; cron set-ups run ``dts log --sync-db``
(one pass, exit 75 when the database is unreachable). Only one shipper works at a
time (``flock`` on ``spool/log/.dbcursor.lock``); another one skips its turn.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .config import Config
from .errors import TemporaryFailure, UsageError
from .journal import EVENT_KEYS, EventFilter
from .spool import Spool, isotime, parse_isotime, write_file_durably

log = logging.getLogger(__name__)

# What a shipper's user derives from a batch of rows, in the transaction inserting them.
Derive = Callable[[Any, list[dict[str, Any]]], None]

TABLE = "dts_events"
RESULTS_TABLE = "dts_results"
CURSOR_NAME = ".dbcursor"
BATCH = 500

_sa: Any = None  # sqlalchemy, imported on first use: stages that never ship don't pay for it


def _sqlalchemy() -> Any:
    global _sa
    if _sa is None:
        import sqlalchemy

        _sa = sqlalchemy
    return _sa


def normalize_url(url: str) -> str:
    """``postgresql://`` means psycopg 3 (the driver dts depends on)."""
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            return "postgresql+psycopg://" + url[len(plain):]
    return url


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        return str(_sqlalchemy().engine.make_url(url).render_as_string(hide_password=True))
    except Exception:
        return "<journal url>"


def _table(metadata: Any) -> Any:
    sa = _sqlalchemy()
    return sa.Table(
        TABLE, metadata,
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                  primary_key=True, autoincrement=True),
        sa.Column("event_key", sa.String(64), nullable=False, unique=True),
        sa.Column("time", sa.DateTime(timezone=True), index=True),
        sa.Column("job", sa.Text, index=True),
        sa.Column("stage", sa.String(16)),
        sa.Column("event", sa.Text),
        sa.Column("status", sa.String(16)),
        sa.Column("message", sa.Text),
        sa.Column("study_uid", sa.String(64), index=True),
        sa.Column("accession", sa.Text, index=True),
        sa.Column("stream", sa.Text),
        sa.Column("details", sa.JSON().with_variant(_jsonb(), "postgresql")),
    )


def _results_table(metadata: Any) -> Any:
    """One row per ``result`` event: the predecessor's ``prediction`` table, generalised
    (docs/results.md). ``event_key`` is the event's, so a batch shipped twice adds nothing."""
    sa = _sqlalchemy()
    return sa.Table(
        RESULTS_TABLE, metadata,
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                  primary_key=True, autoincrement=True),
        sa.Column("event_key", sa.String(64), nullable=False, unique=True),
        sa.Column("time", sa.DateTime(timezone=True), index=True),
        sa.Column("study_uid", sa.String(64), index=True),
        sa.Column("accession", sa.Text, index=True),
        sa.Column("stream", sa.Text, index=True),
        sa.Column("job", sa.Text, index=True),
        sa.Column("name", sa.Text, index=True),
        sa.Column("value", sa.Text),
        sa.Column("value_number", sa.Float),   # the value when it reads as a number
        sa.Column("unit", sa.Text),
        sa.Column("source", sa.String(32)),    # results.json or output.json
        sa.Column("record_id", sa.Text),       # output.json's record_id and event_name
        sa.Column("event_name", sa.Text),
        sa.Column("series_uid", sa.String(64)),
    )


def result_row(row: dict[str, Any]) -> dict[str, Any] | None:
    """The ``dts_results`` row of an event row, if it is a ``result`` event."""
    if row.get("event") != "result":
        return None
    details = row.get("details") or {}
    res = details.get("result") if isinstance(details, dict) else None
    if not isinstance(res, dict) or not res.get("name"):
        return None
    value = res.get("value")
    text = ("true" if value else "false") if isinstance(value, bool) else \
        None if value is None else str(value)
    number: float | None = None
    if not isinstance(value, bool) and value is not None:
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = None
        if number is not None and not math.isfinite(number):
            number = None
    out = {k: row.get(k) for k in ("event_key", "time", "study_uid", "accession", "stream",
                                   "job")}
    out.update(name=str(res["name"]), value=text, value_number=number)
    for key in ("unit", "source", "record_id", "event_name", "series_uid"):
        v = res.get(key)
        out[key] = None if v is None else str(v)
    return out


def _jsonb() -> Any:
    from sqlalchemy.dialects.postgresql import JSONB

    return JSONB()


class JournalDB:
    """A connection pool to the journal database and its ``dts_events`` table."""

    def __init__(self, url: str, *, connect_timeout: float = 5.0) -> None:
        sa = _sqlalchemy()
        self.url = normalize_url(url)
        connect_args: dict[str, Any] = {}
        if self.url.startswith("postgresql"):
            connect_args["connect_timeout"] = max(1, int(connect_timeout))
        try:
            self.engine = sa.create_engine(self.url, pool_pre_ping=True,
                                           connect_args=connect_args)
        except Exception as exc:  # bad scheme, missing driver
            raise UsageError(f"[journal] url {redact(url)}: {exc}") from None
        self.metadata = sa.MetaData()
        self.table = _table(self.metadata)
        self.results = _results_table(self.metadata)
        self._created = False

    def close(self) -> None:
        self.engine.dispose()

    def ensure_table(self) -> None:
        if not self._created:
            self.metadata.create_all(self.engine, checkfirst=True)
            self._created = True

    def insert(self, rows: list[dict[str, Any]], derive: Derive | None = None) -> int:
        """Insert rows, skipping those already there (by ``event_key``); returns new rows.
        ``derive(conn, rows)`` runs in the same transaction (``dts.index`` keeps its
        tables there), so the rows and what is derived from them commit together.

        A row the database refuses (e.g. a NUL character PostgreSQL cannot store) is
        stored without its details rather than blocking every event behind it."""
        if not rows:
            return 0
        self.ensure_table()
        sa = _sqlalchemy()
        try:
            return self._insert(rows, derive)
        except (sa.exc.DataError, sa.exc.ProgrammingError) as exc:
            if len(rows) == 1:
                row = {k: (_scrub(v) if isinstance(v, str) else v) for k, v in rows[0].items()}
                row["details"] = {"details_error": _short(exc)[:200]}
                return self._insert([row], derive)
            count = sum(self.insert([r]) for r in rows)
            if derive is not None:
                with self.engine.begin() as conn:
                    derive(conn, rows)
            return count

    def _insert(self, rows: list[dict[str, Any]], derive: Derive | None) -> int:
        results = [r for r in map(result_row, rows) if r is not None]
        with self.engine.begin() as conn:  # an event and its dts_results row together
            if results:
                self._insert_into(conn, self.results, results)
            count = self._insert_into(conn, self.table, rows)
            if derive is not None:
                derive(conn, rows)
            return count

    def _insert_into(self, conn: Any, table: Any, rows: list[dict[str, Any]]) -> int:
        dialect = self.engine.dialect.name
        if dialect in ("postgresql", "sqlite"):
            from sqlalchemy.dialects import postgresql, sqlite

            if dialect == "sqlite":  # its executemany counts the rows it inserted
                stmt = sqlite.insert(table).on_conflict_do_nothing(index_elements=["event_key"])
                return int(conn.execute(stmt, rows).rowcount)
            returning = postgresql.insert(table).on_conflict_do_nothing(
                index_elements=["event_key"]).returning(table.c.id)
            return len(conn.execute(returning, rows).all())
        # other databases: look the keys up first (one shipper at a time, see the lock)
        sa = _sqlalchemy()
        keys = [r["event_key"] for r in rows]
        have = set(conn.execute(sa.select(table.c.event_key)
                                .where(table.c.event_key.in_(keys))).scalars())
        fresh = [r for r in rows if r["event_key"] not in have]
        if fresh:
            conn.execute(table.insert(), fresh)
        return len(fresh)

    def filtered(self, flt: EventFilter) -> Any:
        """``SELECT`` of the events ``flt`` asks for (unordered; ``dts log --db`` and
        ``dts.index`` order it as they need). A job matches itself, its fan-out
        children (``J.*``) and the events naming it as their parent."""
        sa = _sqlalchemy()
        t = self.table
        q = sa.select(t)
        if flt.job is not None:
            q = q.where(sa.or_(t.c.job == flt.job, t.c.job.like(_like_prefix(flt.job)),
                               t.c.details["parent"].as_string() == flt.job))
        for name, value in (("study_uid", flt.study), ("accession", flt.accession),
                            ("stream", flt.stream), ("stage", flt.stage),
                            ("event", flt.event)):
            if value is not None:
                q = q.where(t.c[name] == value)
        if flt.status:
            q = q.where(t.c.status.in_(list(flt.status)))
        if flt.since is not None:
            q = q.where(t.c.time >= flt.since)
        if flt.until is not None:
            q = q.where(t.c.time <= flt.until)
        return q

    def select(self, flt: EventFilter) -> Iterator[dict[str, Any]]:
        t = self.table
        q = self.filtered(flt).order_by(t.c.time, t.c.id)
        self.ensure_table()
        with self.engine.connect() as conn:
            for row in conn.execute(q.execution_options(yield_per=1000)).mappings():
                rec = row_to_event(dict(row))
                if flt.matches(rec):
                    yield rec


def _scrub(text: str) -> str:
    return text.replace("\x00", "")


def _like_prefix(job: str) -> str:
    escaped = job.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + ".%"


def event_to_row(line: bytes, rec: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"event_key": hashlib.sha256(line.rstrip(b"\n")).hexdigest()}
    for key in EVENT_KEYS:
        value = rec.get(key)
        if key == "time":
            try:
                value = parse_isotime(str(value))
            except ValueError:
                value = None
        elif value is not None and not isinstance(value, str):
            value = str(value)
        row[key] = value
    row["details"] = {k: v for k, v in rec.items() if k not in EVENT_KEYS}
    return row


def row_to_event(row: dict[str, Any]) -> dict[str, Any]:
    rec: dict[str, Any] = {}
    for key in EVENT_KEYS:
        value = row.get(key)
        if key == "time" and isinstance(value, datetime):
            value = isotime(value.astimezone(UTC))
        rec[key] = value
    details = row.get("details")
    if isinstance(details, str):  # drivers without JSON support
        try:
            details = json.loads(details)
        except ValueError:
            details = {}
    if isinstance(details, dict):
        for k, v in details.items():
            rec.setdefault(k, v)
    return rec


# -- reading (``dts log --db``) ------------------------------------------------

def read_db_events(config: Config, flt: EventFilter) -> Iterable[dict[str, Any]]:
    """Events from the journal database in time order, filtered like ``read_events``."""
    url = config.journal.url
    if not url:
        raise UsageError(f"{config.path}: no [journal] url configured; 'dts log' without "
                         "--db reads the spool's journal")
    db = JournalDB(url)
    return _stream(db, flt)


def _stream(db: JournalDB, flt: EventFilter) -> Iterator[dict[str, Any]]:
    sa = _sqlalchemy()
    try:
        yield from db.select(flt)
    except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
        raise TemporaryFailure(f"journal database {redact(db.url)} unreachable: "
                               f"{_short(exc)}") from None
    finally:
        db.close()


def _short(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# -- shipping ------------------------------------------------------------------

@dataclass
class ShipResult:
    read: int = 0       # complete journal lines read past the cursor
    inserted: int = 0   # rows that were new to the database
    skipped: bool = False  # another shipper holds the lock


class Shipper:
    """Copies new journal lines into the database, remembering how far it got."""

    def __init__(self, spool: Spool, url: str, *, batch: int = BATCH,
                 connect_timeout: float = 5.0, cursor: Path | None = None) -> None:
        self.spool = spool
        self.db = JournalDB(url, connect_timeout=connect_timeout)
        self.batch = batch
        self._cursor = cursor
        # Called with each batch of rows in the transaction that inserts them, before
        # the cursor moves past them (dts.index derives its tables there): if it raises,
        # nothing of the batch is kept and it is read again next time.
        self.on_rows: Derive | None = None

    @property
    def cursor_path(self) -> Path:
        return self._cursor if self._cursor is not None else self.spool.log_dir / CURSOR_NAME

    def close(self) -> None:
        self.db.close()

    def _load_cursor(self) -> dict[str, dict[str, int]]:
        try:
            data = json.loads(self.cursor_path.read_bytes())
            files = data.get("files", {}) if isinstance(data, dict) else {}
            return {str(k): {"ino": int(v["ino"]), "offset": int(v["offset"])}
                    for k, v in files.items() if isinstance(v, dict)}
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return {}  # start over: the unique event_key keeps re-delivery harmless

    def _save_cursor(self, files: dict[str, dict[str, int]]) -> None:
        write_file_durably(self.cursor_path,
                           (json.dumps({"files": files}, sort_keys=True) + "\n").encode())

    def pending(self) -> int:
        """Bytes of journal not yet shipped (0 when everything is in the database)."""
        cursor = self._load_cursor()
        total = 0
        for path in sorted(self.spool.log_dir.glob("*.jsonl")):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            c = cursor.get(path.name)
            done = c["offset"] if c and c["ino"] == st.st_ino and c["offset"] <= st.st_size else 0
            total += st.st_size - done
        return total

    def ship(self, stop: Callable[[], bool] | None = None) -> ShipResult:
        """One pass over the journal files; raises ``TemporaryFailure`` if the database is
        unreachable (nothing is lost: the cursor only moves after a commit)."""
        self.spool.log_dir.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(self.cursor_path.with_name(self.cursor_path.name + ".lock"),
                          os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return ShipResult(skipped=True)
            try:
                return self._ship_locked(stop)
            except TemporaryFailure:
                raise
            except Exception as exc:
                sa = _sqlalchemy()
                if isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError,
                                    sa.exc.DisconnectionError)):
                    raise TemporaryFailure(f"journal database {redact(self.db.url)} "
                                           f"unreachable: {_short(exc)}") from None
                raise
        finally:
            os.close(lock_fd)

    def _ship_locked(self, stop: Callable[[], bool] | None) -> ShipResult:
        result = ShipResult()
        cursor = self._load_cursor()
        present = {p.name: p for p in sorted(self.spool.log_dir.glob("*.jsonl"))}
        # files gone (rotated away) leave the cursor
        files = {k: v for k, v in cursor.items() if k in present}
        changed = files != cursor
        for name, path in present.items():
            if stop is not None and stop():
                break
            c = files.get(name)
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            if c is not None and c["ino"] == st.st_ino and c["offset"] == st.st_size:
                continue  # nothing new (the common case: every day but today)
            try:
                fh = open(path, "rb")
            except FileNotFoundError:
                continue
            with fh:
                st = os.fstat(fh.fileno())
                c = files.get(name)
                offset = c["offset"] if c and c["ino"] == st.st_ino else 0
                if offset > st.st_size:
                    offset = 0  # replaced by a shorter file: read again; keys dedupe
                if offset == st.st_size:
                    if c is None or c["ino"] != st.st_ino:
                        files[name] = {"ino": st.st_ino, "offset": offset}
                        changed = True
                    continue
                fh.seek(offset)
                while True:
                    rows, end = _read_batch(fh, offset, self.batch)
                    if end == offset:
                        break  # nothing complete past the cursor (a line still being written)
                    result.read += len(rows)
                    result.inserted += self.db.insert(rows, self.on_rows)
                    offset = end
                    files[name] = {"ino": st.st_ino, "offset": offset}
                    self._save_cursor(files)
                    changed = False
                    if stop is not None and stop():
                        break
        if changed:
            self._save_cursor(files)
        return result

    def run(self, stop: threading.Event, interval: float = 1.0,
            on_state: Callable[[bool, str], None] | None = None,
            max_backoff: float = 60.0) -> None:
        """Ship until ``stop``: every ``interval`` seconds, backing off while the database is
        down. ``on_state(up, message)`` is called when reachability changes."""
        up: bool | None = None
        delay = interval
        while not stop.is_set():
            try:
                self.ship(stop.is_set)
                if up is not True and on_state is not None:
                    on_state(True, f"journal database {redact(self.db.url)} reachable")
                up, delay = True, interval
            except TemporaryFailure as exc:
                if up is not False and on_state is not None:
                    on_state(False, str(exc))
                up = False
                delay = min(max_backoff, max(delay * 2, interval))
            except Exception as exc:  # a bug here must not stop the station
                log.exception("journal database shipper: %s", exc)
                delay = min(max_backoff, max(delay * 2, interval))
            stop.wait(delay)
        # one last pass so that a clean stop leaves nothing behind when the database is up
        try:
            self.ship()
        except Exception as exc:
            log.info("journal database: final pass not completed: %s", exc)


def _read_batch(fh: Any, offset: int, limit: int) -> tuple[list[dict[str, Any]], int]:
    """Up to ``limit`` complete lines from ``fh`` (positioned at ``offset``) as rows, and
    the offset after the last complete line read."""
    rows: list[dict[str, Any]] = []
    end = offset
    while len(rows) < limit:
        line = fh.readline()
        if not line:
            break
        if not line.endswith(b"\n"):
            break  # incomplete: its writer has not finished it; try again next pass
        end += len(line)
        text = line.strip()
        if not text:
            continue
        try:
            rec = json.loads(text)
        except ValueError:
            continue  # a line cut short by a crash: skipped like ``dts log`` does
        if isinstance(rec, dict):
            rows.append(event_to_row(line, rec))
    fh.seek(end)
    return rows, end


def sync(spool: Spool, config: Config, *, timeout: float = 10.0) -> ShipResult:
    """``dts log --sync-db``: ship everything pending once (for cron set-ups)."""
    if not config.journal.url:
        return ShipResult()
    shipper = Shipper(spool, config.journal.url, connect_timeout=timeout)
    try:
        return shipper.ship()
    finally:
        shipper.close()
