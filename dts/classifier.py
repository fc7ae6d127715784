"""Owns the classify stage: study document, streams, and the fan-out into run jobs.

For a job claimed from ``classify/new`` (or, by id, from ``unmatched/``, ``done/`` or
``failed/`` after a rule change), ``process``:

1. builds ``study.json`` (``dts.studydoc``; an unreadable file or no instances: the job
   goes to ``failed/`` with the reason);
2. leaves a study holding any instance this station produced in ``unmatched/`` with an
   ``own-result`` event (a PACS that forwards everything must not start a loop);
3. evaluates every stream: ``enabled``, the ``called_ae``/``calling_ae`` regular
   expressions (searched, so anchor them as ``^AICORE1$``), ``when`` (jmespath over
   study.json, must be truthy in jmespath's sense: not null, false, empty string, list
   or object; dts adds the function ``regexp(value, pattern)``, the rule files' regexp
   operator) and every ``select.<name>`` (must yield at least one series: a list of
   series objects, a single series object, or SeriesInstanceUIDs of this study; an
   evaluation error counts as not matched, with the error as the reason), or instead its
   ``ror_select`` statement (``dts.rorselect``: one check per clause, the named series as
   the selection). A stream without either takes the whole study as one selection named
   ``study``;
4. creates one run job ``J.<stream>`` per matching stream in ``run/new/`` (``per =
   "series"``: one ``J.<stream>.s<n>`` per selected series, n = 1, 2, ... in study.json's
   order, its selection only that series): input holds only the selected series,
   hard-linked; study.json copied; job.json has ``stream``, ``parent``, ``selection`` and
   the parent's identity keys. ``J`` moves to ``done/`` with ``children``. No match:
   ``unmatched/`` with the reasons per stream.

Re-classifying a job whose children exist already creates new children with a numeric
suffix (``J.<stream>.2``); the old ones are left alone. The planned child ids are
recorded in the parent's job.json before the first child is published and removed only
once the parent is in ``done/``, so a classifier that dies anywhere in between adopts the
children it already published instead of duplicating them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jmespath
import jmespath.exceptions
from jmespath import functions as jp_functions

from . import rorselect, worker
from .config import Config, Stream
from .errors import ConfigError, UsageError
from .jobrecord import IDENTITY_KEYS, JobRecord
from .journal import Event, Stage, Status
from .provenance import produced_by
from .rules import RuleSet, load_station_rules
from .spool import (
    Claim,
    Job,
    Location,
    Queue,
    Spool,
    State,
    dump_json,
    isotime,
    valid_job_id,
    write_file_durably,
)
from .station import Station
from .studydoc import Study, StudyError, build_study

log = logging.getLogger(__name__)

WHOLE_STUDY = "study"


@dataclass
class Check:
    name: str  # enabled, called_ae, calling_ae, when, select.<name>
    ok: bool
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"check": self.name, "ok": self.ok, "detail": self.detail}


@dataclass
class Decision:
    stream: str
    checks: list[Check] = field(default_factory=list)
    selection: dict[str, list[str]] = field(default_factory=dict)

    @property
    def matched(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def reasons(self) -> list[str]:
        return [c.detail for c in self.checks if not c.ok]

    def as_dict(self) -> dict[str, Any]:
        return {"stream": self.stream, "matched": self.matched, "reasons": self.reasons,
                "checks": [c.as_dict() for c in self.checks],
                "selection": self.selection if self.matched else {}}


def truthy(value: Any) -> bool:
    """jmespath's truth: null, false and empty strings, lists and objects are false."""
    if value is None or value is False:
        return False
    if isinstance(value, (str, list, dict)):
        return len(value) > 0
    return True


def _short(value: Any, limit: int = 80) -> str:
    s = json.dumps(value, default=str)
    return s if len(s) <= limit else s[:limit - 3] + "..."


def _series_of(result: Any, doc: dict[str, Any]) -> tuple[list[str], str | None]:
    """SeriesInstanceUIDs a select result names, or a reason why it names none."""
    known = {s.get("SeriesInstanceUID") for s in doc.get("series", [])}
    items = result if isinstance(result, list) else [result] if result is not None else []
    flat: list[Any] = []
    for item in items:
        flat.extend(item if isinstance(item, list) else [item])
    uids: list[str] = []
    for item in flat:
        uid = item.get("SeriesInstanceUID") if isinstance(item, dict) else item
        if not isinstance(uid, str) or uid not in known:
            return [], f"yields {_short(item)}, which is not a series of this study"
        if uid not in uids:
            uids.append(uid)
    if not uids:
        return [], f"selected no series (result {_short(result)})"
    return uids, None


class _Functions(jp_functions.Functions):
    """jmespath functions dts adds for ``when`` and ``select``."""

    @jp_functions.signature({"types": ["string", "number", "array", "null"]},
                            {"types": ["string"]})
    def _func_regexp(self, subject: Any, pattern: str) -> bool:
        """``regexp(ProtocolName, 'vibe.*2min')``: the rule files' regexp operator (a
        search); null is false; an array matches when one of its items does."""
        try:
            compiled = re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"regexp(): invalid pattern {pattern!r}: {exc}") from None
        items = subject if isinstance(subject, list) else [subject]
        return any(compiled.search(str(x)) is not None for x in items if x is not None)


_OPTIONS = jmespath.Options(custom_functions=_Functions())


def _search(expr: Any, doc: dict[str, Any]) -> tuple[Any, str | None]:
    try:
        return expr.search(doc, options=_OPTIONS), None
    except jmespath.exceptions.JMESPathTypeError as exc:
        return None, (f"{type(exc).__name__}: {exc} (an attribute that is null in some "
                      "series? write e.g. `SeriesDescription || ''`)")
    except (jmespath.exceptions.JMESPathError, TypeError, ValueError, KeyError,
            AttributeError) as exc:
        return None, f"{type(exc).__name__}: {exc}"


def evaluate_stream(stream: Stream, doc: dict[str, Any]) -> Decision:
    """Does ``stream`` match the study document, and which series does it select?"""
    d = Decision(stream.name)
    if not stream.enabled:
        d.checks.append(Check("enabled", False, "stream is disabled (enabled = false)"))
        return d
    for key in ("called_ae", "calling_ae"):
        pattern = getattr(stream, key)
        value = doc.get(key) or ""
        ok = pattern.search(value) is not None
        d.checks.append(Check(key, ok, f"{key} {value!r} {'matches' if ok else 'does not match'}"
                                       f" {pattern.pattern!r}"))
    if stream.when is not None:
        result, error = _search(stream.when, doc)
        if error:
            d.checks.append(Check("when", False, f"when `{stream.when_text}` failed: {error}"))
        else:
            ok = truthy(result)
            note = "" if ok or result is False else " (null or empty: false)"
            d.checks.append(Check("when", ok, f"when `{stream.when_text}` is "
                                              f"{_short(result)}{note}"))
    if stream.ror_select is not None:
        _evaluate_ror(stream.ror_select, doc, d)
        return d
    if not stream.select:
        d.selection = {WHOLE_STUDY: [s["SeriesInstanceUID"] for s in doc.get("series", [])]}
        return d
    for name, expr in stream.select.items():
        text = stream.select_text.get(name, "")
        result, error = _search(expr, doc)
        if error:
            d.checks.append(Check(f"select.{name}", False, f"select.{name} `{text}` failed: "
                                                           f"{error}"))
            continue
        uids, problem = _series_of(result, doc)
        if problem:
            d.checks.append(Check(f"select.{name}", False, f"select.{name} `{text}` {problem}"))
        else:
            d.checks.append(Check(f"select.{name}", True,
                                  f"select.{name} `{text}` selected {len(uids)} series"))
            d.selection[name] = uids
    return d


def _evaluate_ror(stmt: rorselect.Statement, doc: dict[str, Any], d: Decision) -> None:
    """A ``ror_select`` stream: one check per clause (which series it names, or why none
    did), one per CHECK, and the statement's verdict."""
    result = rorselect.evaluate(stmt, doc)
    required = stmt.level != "series"
    checks: list[Check] = []
    for r in result.clauses:
        ok, detail = rorselect.explain_clause(r, doc, required)
        checks.append(Check(f"ror_select.{r.clause.name}", ok, detail))
    for c in result.checks:
        checks.append(Check("ror_select.check", c.ok, c.detail))
    d.checks.extend(checks)
    if result.matched:
        n = len({u for uids in result.selection.values() for u in uids})
        d.checks.append(Check("ror_select", True, f"ror_select (SELECT {stmt.level}) selected "
                                                  f"{n} series"))
        d.selection = result.selection
    elif all(c.ok for c in checks):  # else a clause or CHECK above says why
        d.checks.append(Check("ror_select", False, f"ror_select (SELECT {stmt.level}): "
                                                   f"{result.reason}"))


def statement_tags(config: Config) -> frozenset[int]:
    """The DICOM tags the streams' ``ror_select`` statements read (study.json's ``tags``)."""
    return frozenset(t for s in config.streams if s.ror_select is not None
                     for t in s.ror_select.tags)


def units(d: Decision, stream: Stream | None) -> list[tuple[str, Decision, int]]:
    """The run jobs a matched decision makes: ``(plan key, decision, n)``; one (n = 0)
    for ``per = "study"``, one per selected series for ``per = "series"`` (n = 1, 2, ...
    in the order of study.json; its selection holds only that series, under its
    name(s))."""
    if stream is None or stream.per != "series":
        return [(d.stream, d, 0)]
    out: list[tuple[str, Decision, int]] = []
    uids = list(dict.fromkeys(u for sel in d.selection.values() for u in sel))
    for n, uid in enumerate(uids, start=1):
        one = Decision(d.stream, list(d.checks),
                       {name: [uid] for name, sel in d.selection.items() if uid in sel})
        out.append((f"{d.stream}/{uid}", one, n))
    return out


def evaluate(config: Config, doc: dict[str, Any]) -> list[Decision]:
    return [evaluate_stream(s, doc) for s in config.streams]


def own_results(spool: Spool, study: Study) -> dict[str, str]:
    """SOP Instance UIDs of the study that this station produced -> producing job."""
    hits: dict[str, str] = {}
    for sop in study.sop_uids():
        job = produced_by(spool, sop)
        if job is not None:
            hits[sop] = job
    return hits


# -- processing one claimed job ---------------------------------------------------

def _fail(station: Station, claim: Claim, data: JobRecord, reason: str) -> worker.Outcome:
    data.update({"error": reason, "failed_at": isotime()})
    claim.job.write(data)
    station.journal.emit(Stage.CLASSIFY, Event.FAILED, Status.ERROR, reason, job=claim.job,
                         job_data=data)
    claim.move(Queue.FAILED)
    return worker.Outcome.FAILED


def _child_id(spool: Spool, parent: str, stream: str, taken: set[str], part: int = 0) -> str:
    base = f"{parent}.{stream}" + (f".s{part}" if part else "")
    n = 1
    while True:
        cid = base if n == 1 else f"{base}.{n}"
        if cid not in taken and spool.locate(cid) is None and not (spool.tmp / cid).exists():
            return cid
        n += 1


def _create_child(station: Station, claim: Claim, data: JobRecord, study: Study,
                  decision: Decision, child_id: str, study_bytes: bytes) -> None:
    spool = station.spool
    leftover = spool.tmp / child_id
    if leftover.exists():  # from a classifier of this same job that died before publishing
        shutil.rmtree(leftover)
    child = spool.create_tmp_job(job_id=child_id)
    uids = list(dict.fromkeys(u for sel in decision.selection.values() for u in sel))
    count = 0
    for uid in uids:
        dest = child.input_dir / uid
        dest.mkdir(parents=True)
        for f in study.series[uid].files:
            os.link(f, dest / f.name)
            count += 1
    write_file_durably(child.path / "study.json", study_bytes)
    child_data: JobRecord = {}
    for key in IDENTITY_KEYS:  # a run job inherits the identity of the job it came from
        if key in data:
            child_data[key] = data[key]
    child_data.update({"stream": decision.stream, "parent": claim.id,
                       "selection": decision.selection, "instances": count,
                       "series": {u: len(study.series[u].files) for u in uids},
                       "attempts": 0, "error": None, "created_at": isotime()})
    child.write(child_data)
    station.journal.emit(Stage.CLASSIFY, Event.QUEUED, Status.INFO,
                         f"run job for stream {decision.stream} from {claim.id}: "
                         f"{len(uids)} series, {count} instances", job=child,
                         job_data=child_data, parent=claim.id)
    spool.publish(child, Queue.RUN)


def _fan_out(station: Station, claim: Claim, data: JobRecord, study: Study,
             matched: list[tuple[str, Decision, int]], study_bytes: bytes) -> list[str]:
    """Publish the run jobs of ``matched`` (``units``), planned under their keys first."""
    spool = station.spool
    pending = data.get("fanout_pending") if isinstance(data.get("fanout_pending"), dict) else {}
    plan: dict[str, str] = {}
    for key, d, part in matched:
        cid = pending.get(key) if pending else None
        if not (isinstance(cid, str) and valid_job_id(cid) and cid.startswith(claim.id + ".")):
            cid = _child_id(spool, claim.id, d.stream, set(plan.values()), part)
        plan[key] = cid
    data["fanout_pending"] = plan
    claim.job.write(data)
    for key, d, _part in matched:
        cid = plan[key]
        found = spool.locate(cid)
        if found is not None and Job(found[1]).read().get("parent") == claim.id:
            log.info("%s: adopting run job %s published before a restart", claim.id, cid)
            continue
        _create_child(station, claim, data, study, d, cid, study_bytes)
    return [plan[key] for key, _d, _part in matched]


_REPORTED: set[str] = set()


def _rules(station: Station) -> RuleSet | None:
    """The rules, re-read when the file changed; None (reported once) while it is broken:
    a long-running classifier then lets jobs wait instead of failing them."""
    try:
        return load_station_rules(station.config.rules_path, station.config.path)
    except ConfigError as exc:
        if str(exc) not in _REPORTED:
            _REPORTED.add(str(exc))
            station.journal.emit(Stage.CLASSIFY, Event.RULES_ERROR, Status.ERROR,
                                 f"classification rules unusable, jobs wait: {exc}")
        return None


def process(station: Station, claim: Claim) -> worker.Outcome:
    """Classify one claimed job and move it on (run jobs + done/, unmatched/ or failed/)."""
    t0 = time.perf_counter()
    data = claim.job.read()
    rules = _rules(station)
    if rules is None:
        return worker.Outcome.RETRY  # the claim puts it back into classify/new
    try:
        study = build_study(claim.job.input_dir, data, rules,
                            tags=statement_tags(station.config))
    except StudyError as exc:
        return _fail(station, claim, data, str(exc))
    study_bytes = dump_json(study.doc)
    write_file_durably(claim.job.path / "study.json", study_bytes)
    counts: dict[str, Any] = {"series": len(study.series), "instances": study.images,
                              "headers_read": study.headers_read}
    data.pop("error", None)
    data["classified_at"] = isotime()

    own = own_results(station.spool, study)
    if own:
        producers = sorted(set(own.values()))
        data["unmatched"] = {"own-result": producers}
        claim.job.write(data)
        station.journal.emit(
            Stage.CLASSIFY, Event.OWN_RESULT, Status.INFO,
            f"{len(own)} of {study.images} instances were produced by this station "
            f"(job {', '.join(producers)}); not processed again", job=claim.job,
            job_data=data, produced_by=producers, **counts)
        claim.move(Queue.UNMATCHED)
        return worker.Outcome.DONE

    decisions = evaluate(station.config, study.doc)
    data["classification"] = {d.stream: {"matched": d.matched, "reasons": d.reasons}
                              for d in decisions}
    matched = [d for d in decisions if d.matched]
    if not matched:
        reasons = {d.stream: d.reasons for d in decisions}
        data["unmatched"] = reasons
        claim.job.write(data)
        summary = "; ".join(f"{s}: {', '.join(r)}" for s, r in reasons.items()) or \
            "no streams are configured"
        station.journal.emit(Stage.CLASSIFY, Event.UNMATCHED, Status.INFO,
                             f"no stream matched: {summary}", job=claim.job, job_data=data,
                             reasons=reasons, seconds=round(time.perf_counter() - t0, 3),
                             **counts)
        claim.move(Queue.UNMATCHED)
        return worker.Outcome.DONE

    data.pop("unmatched", None)
    jobs = [u for d in matched for u in units(d, station.config.stream(d.stream))]
    children = _fan_out(station, claim, data, study, jobs, study_bytes)
    data["children"] = list(dict.fromkeys(list(data.get("children") or []) + children))
    data["streams"] = [d.stream for d in matched]
    claim.job.write(data)
    seconds = round(time.perf_counter() - t0, 3)
    for (_key, d, _part), child in zip(jobs, children):
        station.journal.emit(Stage.CLASSIFY, Event.MATCHED, Status.OK,
                             f"stream {d.stream} matched: run job {child} "
                             f"({', '.join(f'{k}: {len(v)} series' for k, v in d.selection.items())})",
                             job=claim.job, job_data=data, stream=d.stream, child=child,
                             selection=d.selection, seconds=seconds, **counts)
    # The plan goes only once the job is out of classify/: a crash before that makes the
    # next classification adopt these children, never publish a second set.
    claim.move_keep(Queue.DONE)
    data.pop("fanout_pending", None)
    claim.job.write(data)
    claim.release()
    return worker.Outcome.DONE


# -- the stage ---------------------------------------------------------------------

_RECLASSIFIABLE = (Queue.UNMATCHED, Queue.DONE, Queue.FAILED)


def _check_reclassifiable(spool: Spool, job_id: str) -> Location:
    loc, path = spool.find(job_id)
    if loc == Location(Queue.CLASSIFY, State.NEW):
        return loc
    if loc.queue in _RECLASSIFIABLE:
        data = Job(path).read()
        if data.get("parent"):
            raise UsageError(f"job {job_id} is a run job of stream {data.get('stream')} "
                             f"(from {data['parent']}): classify {data['parent']} instead, "
                             f"or 'dts requeue {job_id} --to run'")
        return loc
    raise UsageError(f"job {job_id} is in {loc}: only jobs in classify/new, unmatched/, done/ "
                     "or failed/ can be classified")


def _forget_plan(claim: Claim) -> None:
    """A classification asked for again makes new children: a plan left by a crash
    between the move to done/ and its last write is not to be adopted."""
    data = claim.job.read()
    if data.pop("fanout_pending", None) is not None:
        claim.job.write(data)


def _claim(spool: Spool, job_id: str) -> Claim:
    loc = _check_reclassifiable(spool, job_id)
    if loc.queue is Queue.CLASSIFY:
        claim = spool.claim(job_id, Queue.CLASSIFY)
    else:
        claim = spool.claim_at(job_id)
        if claim is not None:
            # visible as being classified; a crash from here on sends it to classify/new
            claim.move_keep(Queue.CLASSIFY, State.CUR)
            _forget_plan(claim)
    if claim is None:
        raise UsageError(f"job {job_id} is being worked on by another process")
    return claim


def serve(station: Station, *, once: bool = False, job_ids: list[str] | None = None,
          stop: threading.Event | None = None) -> worker.Tally:
    """``dts classify``: the given jobs, what is queued (``once``), or forever."""
    if not job_ids:
        return worker.serve(station, Queue.CLASSIFY, process, once=once, stop=stop)
    worker.recover(station, Queue.CLASSIFY)
    for job_id in job_ids:
        _check_reclassifiable(station.spool, job_id)
    tally = worker.Tally()
    for job_id in job_ids:
        tally.add(job_id, worker.run_one(station, _claim(station.spool, job_id), process))
    return tally


# -- explaining --------------------------------------------------------------------

def explain(station: Station, job_id: str) -> dict[str, Any]:
    """Why each stream would or would not take this job; moves and writes nothing."""
    loc, path = station.spool.find(job_id)
    job = Job(path)
    return explain_input(station, job.input_dir, job.read(), job_id, str(loc))


def explain_input(station: Station, input_dir: Path, data: JobRecord, label: str,
                  location: str) -> dict[str, Any]:
    """``explain()`` of any ``input/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`` folder
    (the page's rule tester: uploaded files), with ``data`` for the connection keys."""
    out: dict[str, Any] = {"job": label, "location": location, "error": None,
                           "own_result": None, "outcome": None, "series": [], "streams": []}
    rules = load_station_rules(station.config.rules_path, station.config.path)
    try:
        study = build_study(input_dir, data, rules, tags=statement_tags(station.config))
    except StudyError as exc:
        out["error"] = str(exc)
        out["outcome"] = "failed"
        return out
    doc = study.doc
    out["study"] = {k: doc.get(k) for k in ("StudyInstanceUID", "AccessionNumber",
                                            "ModalitiesInStudy", "NumSeries", "NumImages",
                                            "calling_ae", "called_ae", "peer")}
    out["series"] = [{k: s.get(k) for k in ("SeriesInstanceUID", "SeriesNumber", "Modality",
                                            "SeriesDescription", "NumImages", "ClassifyType")}
                     for s in doc["series"]]
    own = own_results(station.spool, study)
    decisions = evaluate(station.config, doc)
    out["streams"] = [d.as_dict() for d in decisions]
    for entry, d in zip(out["streams"], decisions):
        stream = station.config.stream(d.stream)
        entry["per"] = stream.per if stream is not None else "study"
        entry["run_jobs"] = len(units(d, stream)) if d.matched else 0
    matched = [d.stream for d in decisions if d.matched]
    if own:
        out["own_result"] = {"instances": len(own), "produced_by": sorted(set(own.values()))}
        out["outcome"] = "unmatched (own result)"
    elif matched:
        out["outcome"] = "run: " + ", ".join(matched)
    else:
        out["outcome"] = "unmatched"
    return out


def render_explanation(e: dict[str, Any]) -> str:
    """The text form of ``explain()`` for a terminal."""
    lines = [f"job {e['job']} ({e['location']})"]
    if e.get("error"):
        lines.append(f"  cannot classify: {e['error']}")
        return "\n".join(lines)
    st = e["study"]
    lines.append(f"  study {st['StudyInstanceUID']}  accession {st.get('AccessionNumber')}  "
                 f"{st['NumSeries']} series, {st['NumImages']} images")
    lines.append(f"  from calling_ae {st.get('calling_ae')!r} to called_ae "
                 f"{st.get('called_ae')!r} (peer {st.get('peer')})")
    lines.append("series:")
    for s in e["series"]:
        lines.append(f"  {s.get('SeriesNumber')!s:>4}  {s.get('Modality') or '-':<3} "
                     f"{(s.get('SeriesDescription') or '')[:40]:<40} {s['NumImages']:>5} img  "
                     f"ClassifyType: {', '.join(s['ClassifyType']) or '-'}")
        lines.append(f"        {s['SeriesInstanceUID']}")
    lines.append("streams:")
    if not e["streams"]:
        lines.append("  (no streams configured)")
    for d in e["streams"]:
        lines.append(f"  {d['stream']}: {'MATCHED' if d['matched'] else 'not matched'}")
        for c in d["checks"]:
            lines.append(f"    {'ok  ' if c['ok'] else 'FAIL'} {c['detail']}")
        for name, uids in d["selection"].items():
            lines.append(f"    selection {name}: {', '.join(uids)}")
        if d.get("per") == "series" and d["matched"]:
            lines.append(f"    per series: {d.get('run_jobs')} run jobs, one per selected series")
    if e.get("own_result"):
        lines.append(f"own result: {e['own_result']['instances']} instances were produced by "
                     f"this station (job {', '.join(e['own_result']['produced_by'])})")
    lines.append(f"outcome: {e['outcome']}")
    return "\n".join(lines)
