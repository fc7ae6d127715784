"""Owns ``dts replay``: studies already processed, run through one stream again.

A finished job in ``done/`` keeps its input (``input/<SeriesInstanceUID>/*.dcm``) and
its ``study.json`` until ``dts clean`` removes it. ``replay`` makes, per study, new run
jobs of one stream from them: only that stream is evaluated on the study.json kept
(its ``called_ae``/``calling_ae``/``when``/selections, as the classifier would; a
stream switched off with ``enabled = false`` may still be replayed), no other stream is
classified, and the original jobs are only read: the new job's input is hard links to
theirs, its study.json a copy.

Each new job is ``<new id>.<stream>`` (``.s<n>`` per series for ``per = "series"``),
so it sorts by when it was made, behind the live work already waiting; its job.json has
the study's identity keys, ``stream``, ``selection``, ``parent`` (the study's job),
``replay_of`` (the job it was made from) and ``shadow: true`` unless ``live``: a shadow
job ends in ``done/`` and sends nothing (``dts.review.hand_on``). It is written under
``tmp/`` and published into ``run/new/`` with one rename, like a classifier's.

The sources: the jobs named (each must be in ``done/``), or every study in ``done/``
that arrived after ``since`` (one source per study: its received job when that still
has its input, else its newest run job). A named job whose input is gone, or that the
stream does not match, fails (exit 1, named); with ``since`` a study the stream does
not match is skipped, one whose input is gone fails.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from .classifier import Decision, evaluate_stream, units
from .config import Stream
from .errors import UsageError
from .jobrecord import IDENTITY_KEYS, JobRecord
from .journal import Event, Stage, Status
from .spool import Job, Queue, age_seconds, isotime, new_job_id, write_file_durably
from .station import Station


@dataclass
class Report:
    """What a replay did: jobs made, studies skipped (not matched), sources that failed."""

    stream: str
    shadow: bool
    made: list[dict[str, Any]] = field(default_factory=list)     # job, replay_of, study_uid
    skipped: list[dict[str, Any]] = field(default_factory=list)  # job, study_uid, reason
    failed: list[dict[str, Any]] = field(default_factory=list)   # job, reason

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _Unusable(Exception):
    """A source that cannot be replayed (its reason names the job)."""


@dataclass
class _Source:
    job: Job             # the job named or chosen (replay_of)
    data: JobRecord
    study: Job           # whose input/ and study.json are used


def replay(station: Station, stream_name: str, *, job_ids: list[str] | None = None,
           since: datetime | None = None, live: bool = False,
           by: str = "") -> Report:
    """New run jobs of ``stream_name`` from the named jobs or those since ``since``."""
    stream = station.config.stream(stream_name)
    if stream is None:
        names = ", ".join(s.name for s in station.config.streams) or "none"
        raise UsageError(f"--stream: no stream {stream_name!r} in {station.config.path} "
                         f"(configured: {names})")
    if live and stream.shadow:
        raise UsageError(f"--live: stream {stream.name} is a shadow stream (shadow = true): "
                         "its results are never sent; set shadow = false to replay it live")
    if bool(job_ids) == (since is not None):
        raise UsageError("give either job ids or --since, not both (and one of them)")
    report = Report(stream=stream.name, shadow=not live)
    sources: list[_Source | tuple[str, str]] = []
    if job_ids:
        for job_id in job_ids:
            loc, _path = station.spool.find(job_id)  # UsageError: no such job
            if loc.queue is not Queue.DONE:
                raise UsageError(f"job {job_id} is in {loc}: only finished jobs (in done/) "
                                 "can be replayed")
        for job_id in job_ids:
            try:
                sources.append(_source(station, Job(station.spool.find(job_id)[1])))
            except _Unusable as exc:
                sources.append((job_id, str(exc)))
    else:
        assert since is not None
        sources = _since(station, since)
    for src in sources:
        if isinstance(src, tuple):
            report.failed.append({"job": src[0], "reason": src[1]})
            continue
        try:
            made = _replay_one(station, stream, src, live=live, by=by)
        except _Unusable as exc:
            report.failed.append({"job": src.job.id, "reason": str(exc)})
            continue
        if isinstance(made, str):  # not matched
            if job_ids:
                report.failed.append({"job": src.job.id, "reason": made})
            else:
                report.skipped.append({"job": src.job.id,
                                       "study_uid": src.data.get("study_uid"), "reason": made})
            continue
        report.made += made
    return report


def _has_input(job: Job) -> bool:
    try:
        return any(p.is_dir() and any(p.iterdir()) for p in job.input_dir.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return False


def _source(station: Station, job: Job) -> _Source:
    """Where a finished job's study is kept: its own input, or (a run job) its parent's
    whole study when that is still in done/ with its input."""
    data = job.read()
    if not data.get("study_uid"):
        raise _Unusable(f"job {job.id} has no study (job.json has no study_uid)")
    study = job
    parent = data.get("parent")
    if isinstance(parent, str):
        found = station.spool.locate(parent)
        if found is not None and found[0].queue is Queue.DONE and _has_input(Job(found[1])):
            study = Job(found[1])
    if not _has_input(study):
        raise _Unusable(f"job {job.id}: its input was removed (input/ is missing or empty), "
                        "so its study cannot be run again")
    if not (study.path / "study.json").is_file():
        raise _Unusable(f"job {job.id}: it has no study.json (it was never classified)")
    return _Source(job, data, study)


def _since(station: Station, since: datetime) -> list[_Source | tuple[str, str]]:
    """One source per study of done/ that arrived after ``since``: its received job
    if that has its input, else its newest run job with input."""
    spool = station.spool
    cutoff = since.timestamp()
    by_study: dict[str, list[tuple[Job, JobRecord]]] = {}
    for job_id in spool.list(Queue.DONE):
        age = age_seconds(job_id)
        if age is None or time.time() - age < cutoff:
            continue
        job = Job(spool.dir(Queue.DONE) / job_id)
        data = job.read()
        study = data.get("study_uid")
        if isinstance(study, str) and (job.path / "study.json").is_file():
            by_study.setdefault(study, []).append((job, data))
    out: list[_Source | tuple[str, str]] = []
    for jobs in by_study.values():
        received = [(j, d) for j, d in jobs if not d.get("parent")]
        ordered = received + sorted([(j, d) for j, d in jobs if d.get("parent")],
                                    key=lambda jd: jd[0].id, reverse=True)
        chosen: _Source | tuple[str, str] | None = None
        for job, data in ordered:
            if _has_input(job):
                chosen = _Source(job, data, job)
                break
        gone = ordered[0][0].id
        why = f"job {gone}: its input was removed (input/ is missing or empty), so its " \
            "study cannot be run again"
        out.append(chosen or (gone, why))
    return out


def _replay_one(station: Station, stream: Stream, src: _Source, *, live: bool,
                by: str) -> list[dict[str, Any]] | str:
    """The new run jobs of one source, published; or why the stream does not match."""
    try:
        study_bytes = (src.study.path / "study.json").read_bytes()
        doc = json.loads(study_bytes)
    except (OSError, ValueError) as exc:
        raise _Unusable(f"job {src.study.id}: study.json unreadable: {exc}") from None
    # the stream is named on purpose: replayed even while it is switched off
    decision = evaluate_stream(dataclasses.replace(stream, enabled=True), doc)
    if not decision.matched:
        return (f"stream {stream.name} does not match the study of job {src.job.id}: "
                + "; ".join(decision.reasons))
    made = []
    for _key, unit, part in units(decision, stream):
        made.append(_publish(station, stream, src, unit, part, study_bytes, live=live, by=by))
    return made


def _publish(station: Station, stream: Stream, src: _Source, decision: Decision, part: int,
             study_bytes: bytes, *, live: bool, by: str) -> dict[str, Any]:
    spool = station.spool
    uids = list(dict.fromkeys(u for sel in decision.selection.values() for u in sel))
    files: dict[str, list[Path]] = {}
    for uid in uids:
        folder = src.study.input_dir / uid
        names = sorted(f for f in folder.iterdir() if f.is_file()) if folder.is_dir() else []
        if not names:
            raise _Unusable(f"job {src.job.id}: stream {stream.name} selects series {uid}, "
                            "which its input does not hold (a run job keeps only its own "
                            "stream's series, and the study's job is gone)")
        files[uid] = names
    job_id = f"{new_job_id()}.{stream.name}" + (f".s{part}" if part else "")
    job = spool.create_tmp_job(job_id=job_id)
    try:
        count = 0
        for uid, names in files.items():
            dest = job.input_dir / uid
            dest.mkdir(parents=True)
            for f in names:
                os.link(f, dest / f.name)
                count += 1
        write_file_durably(job.path / "study.json", study_bytes)
        data: JobRecord = {}
        for key in IDENTITY_KEYS:
            if key in src.data:
                data[key] = src.data[key]
        parent = src.data.get("parent")
        study_job = parent if isinstance(parent, str) else src.job.id  # the received job
        data.update({"stream": stream.name, "parent": study_job,
                     "selection": decision.selection, "instances": count,
                     "series": {u: len(n) for u, n in files.items()}, "attempts": 0,
                     "error": None, "created_at": isotime(), "replay_of": src.job.id})
        if not live:
            data["shadow"] = True
        job.write(data)
        station.journal.emit(Stage.RUN, Event.REPLAYED, Status.INFO,
                             f"{'live' if live else 'shadow'} replay of {src.job.id} through "
                             f"stream {stream.name}" + (f" by {by}" if by else "") +
                             f": {len(uids)} series, {count} instances", job=job,
                             job_data=data, replay_of=src.job.id, parent=study_job,
                             shadow=not live, by=by or None)
        spool.publish(job, Queue.RUN)
    except BaseException:
        if job.path.parent == spool.tmp:  # not published: nothing half-made stays
            shutil.rmtree(job.path, ignore_errors=True)
        raise
    return {"job": job_id, "replay_of": src.job.id, "study_uid": data.get("study_uid"),
            "shadow": not live}
