"""Owns ``dts compare``: two streams' results on the studies both processed, side by side.

The source is the finished jobs in ``done/`` (a shadow run ends there as well as a
delivered live one): per job its job.json ``results`` (the values the model reported,
``jobrecord.ResultEntry``, docs/results.md) and what it produced (``outputs`` and
``built``: object kinds and counts). For every study with a finished job of each stream
(the latest one of each, by the run's end), each result is paired by its name and the
series it is about (``series_uid``; ror's ``key``/``record_id`` likewise), and every pair
whose values differ, or that only one side has, is marked; so are the kinds produced.
Nothing is changed; the rows are returned for the command to show.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .errors import UsageError
from .jobrecord import JobRecord, ResultEntry
from .spool import Job, Queue, age_seconds, parse_isotime, utcnow
from .station import Station

# SOP Class UID prefixes -> the kind a person calls them (dts.builders' names)
_KINDS = (
    ("1.2.840.10008.5.1.4.1.1.88.59", "kos"),
    ("1.2.840.10008.5.1.4.1.1.88.", "sr"),
    ("1.2.840.10008.5.1.4.1.1.66.4", "seg"),
    ("1.2.840.10008.5.1.4.1.1.104.1", "pdf"),
    ("1.2.840.10008.5.1.4.1.1.7", "sc"),
)


def kind_of(sop_class: str | None) -> str:
    for prefix, kind in _KINDS:
        if sop_class and (sop_class == prefix or sop_class.startswith(prefix)):
            return kind
    return "other"


def produced(data: JobRecord) -> dict[str, int]:
    """What a run produced: DICOM object kind -> count (the builder's kinds for what dts
    built, the SOP class's for what the model wrote itself), and ``files`` for the
    non-DICOM files."""
    built = {b.get("sop_uid"): b.get("kind") or "other" for b in data.get("built") or []}
    counts: dict[str, int] = {}
    for o in data.get("outputs") or []:
        kind = built.get(o.get("sop_uid")) or kind_of(o.get("sop_class"))
        counts[kind] = counts.get(kind, 0) + 1
    counts = dict(sorted(counts.items()))
    files = len(data.get("other_files") or [])
    if files:
        counts["files"] = files
    return counts


def result_key(entry: ResultEntry) -> str:
    """What pairs a result of one stream with the other's: its name, and the series (or
    ror record) it is about."""
    parts = [str(entry.get("name", ""))]
    for k in ("series_uid", "key", "record_id", "event_name"):
        v = entry.get(k)
        if v:
            parts.append(str(v))
    return " | ".join(parts)


@dataclass
class Side:
    """One stream's finished job of a study."""

    job: str
    finished_at: str | None
    shadow: bool
    produced: dict[str, int]
    results: dict[str, ResultEntry]

    def as_dict(self) -> dict[str, Any]:
        return {"job": self.job, "finished_at": self.finished_at, "shadow": self.shadow,
                "produced": self.produced,
                "results": {k: dict(v) for k, v in self.results.items()}}


@dataclass
class Row:
    """One study both streams processed."""

    study_uid: str
    accession: str | None
    a: Side
    b: Side
    results: list[dict[str, Any]] = field(default_factory=list)  # name, a, b, unit, same
    produced: list[dict[str, Any]] = field(default_factory=list)  # kind, a, b, same

    @property
    def differs(self) -> bool:
        return any(not r["same"] for r in self.results + self.produced)

    def as_dict(self) -> dict[str, Any]:
        return {"study_uid": self.study_uid, "accession": self.accession,
                "differs": self.differs, "a": self.a.as_dict(), "b": self.b.as_dict(),
                "results": self.results, "produced": self.produced}


@dataclass
class Comparison:
    stream_a: str
    stream_b: str
    since: str | None
    rows: list[Row]
    only_a: list[str]   # studies only stream A finished (in the window)
    only_b: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {"stream_a": self.stream_a, "stream_b": self.stream_b, "since": self.since,
                "studies": len(self.rows),
                "differing": sum(1 for r in self.rows if r.differs),
                "rows": [r.as_dict() for r in self.rows],
                "only_a": self.only_a, "only_b": self.only_b}


def _finished_at(data: JobRecord, job_id: str) -> datetime | None:
    run = data.get("run") or {}
    text = run.get("finished_at") if isinstance(run, dict) else None
    if isinstance(text, str):
        try:
            return parse_isotime(text)
        except ValueError:
            pass
    age = age_seconds(job_id)
    return None if age is None else datetime.fromtimestamp(utcnow().timestamp() - age,
                                                           tz=utcnow().tzinfo)


def _side(job_id: str, data: JobRecord) -> Side:
    run = data.get("run") or {}
    return Side(job=job_id, finished_at=run.get("finished_at") if isinstance(run, dict)
                else None, shadow=bool(data.get("shadow")), produced=produced(data),
                results={result_key(e): e for e in data.get("results") or []})


def _stream_name(data: JobRecord) -> str | None:
    s = data.get("stream")
    if isinstance(s, dict):
        s = s.get("name")
    return s if isinstance(s, str) else None


def _same(x: Any, y: Any) -> bool:
    if isinstance(x, bool) or isinstance(y, bool):
        return x is y
    if isinstance(x, (int, float)) and isinstance(y, (int, float)):
        return float(x) == float(y)
    return bool(x == y)


def pair(a: Side, b: Side) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The results and the produced kinds of two sides, paired, differences marked."""
    results = []
    for key in list(dict.fromkeys([*a.results, *b.results])):
        ea, eb = a.results.get(key), b.results.get(key)
        va = ea.get("value") if ea is not None else None
        vb = eb.get("value") if eb is not None else None
        entry: dict[str, Any] = {
            "key": key, "name": (ea or eb or {}).get("name"),
            "series_uid": (ea or eb or {}).get("series_uid"),
            "unit": (ea or eb or {}).get("unit"), "a": va, "b": vb,
            "same": ea is not None and eb is not None and _same(va, vb)}
        if isinstance(va, (int, float)) and isinstance(vb, (int, float)) \
                and not isinstance(va, bool) and not isinstance(vb, bool):
            entry["delta"] = round(float(vb) - float(va), 9)
        results.append(entry)
    kinds = []
    for kind in sorted(set(a.produced) | set(b.produced)):
        na, nb = a.produced.get(kind, 0), b.produced.get(kind, 0)
        kinds.append({"kind": kind, "a": na, "b": nb, "same": na == nb})
    return results, kinds


def compare(station: Station, stream_a: str, stream_b: str,
            since: datetime | None = None) -> Comparison:
    """Both streams' latest finished job per study (in ``done/``, finished after
    ``since``), paired."""
    if stream_a == stream_b:
        raise UsageError(f"compare two different streams (both are {stream_a!r})")
    known = {s.name for s in station.config.streams}
    for name in (stream_a, stream_b):
        if name not in known and not _ever_ran(station, name):
            raise UsageError(f"no stream {name!r} in {station.config.path} and no finished "
                             f"job of it in done/ (streams: {', '.join(sorted(known)) or 'none'})")
    spool = station.spool
    latest: dict[str, dict[str, tuple[datetime | None, str, JobRecord]]] = {
        stream_a: {}, stream_b: {}}
    for job_id in spool.list(Queue.DONE):
        data = Job(spool.dir(Queue.DONE) / job_id).read()
        of = _stream_name(data)
        if of is None or of not in latest or "run" not in data or not data.get("study_uid"):
            continue
        when = _finished_at(data, job_id)
        if since is not None and (when is None or when < since):
            continue
        study = str(data["study_uid"])
        old = latest[of].get(study)
        if old is None or _later(when, old[0]):
            latest[of][study] = (when, job_id, data)
    rows = []
    for study, (_t, ja, da) in latest[stream_a].items():
        other = latest[stream_b].get(study)
        if other is None:
            continue
        _tb, jb, db = other
        a, b = _side(ja, da), _side(jb, db)
        results, kinds = pair(a, b)
        rows.append(Row(study_uid=study, accession=da.get("accession") or db.get("accession"),
                        a=a, b=b, results=results, produced=kinds))
    rows.sort(key=lambda r: max(r.a.finished_at or "", r.b.finished_at or ""))
    only_a = sorted(set(latest[stream_a]) - set(latest[stream_b]))
    only_b = sorted(set(latest[stream_b]) - set(latest[stream_a]))
    return Comparison(stream_a, stream_b, since.isoformat() if since else None, rows,
                      only_a, only_b)


def _later(t: datetime | None, than: datetime | None) -> bool:
    if t is None:
        return than is None
    return than is None or t >= than


def _ever_ran(station: Station, name: str) -> bool:
    """A stream taken out of the configuration can still be compared by its jobs."""
    spool = station.spool
    return any(_stream_name(Job(spool.dir(Queue.DONE) / j).read()) == name
               for j in spool.list(Queue.DONE))
