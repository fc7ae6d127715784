"""Owns the run stage: ``run/new/`` -> processing -> ``send/new/`` or ``failed/``.

For each claimed job the runner builds the input view the processing sees (the
selected series as ``<selection>/<SeriesInstanceUID>/*.dcm``, hard links, plus
``task.json``), runs the stream's container or command (``dts.executors``),
checks the output (``dts.validate``) and only then lets results go on to the
sender, recording each produced SOP Instance UID (``dts.provenance``) so that our
own results coming back from a PACS are not processed again.

A job's ``running`` entry in job.json says what is running for it (container or
process group), so that after a ``kill -9`` of ``dts run`` the next start can stop
the orphan (``on_recovered``) before the job runs again.

A stream with ``executor = "slurm"`` runs on the cluster instead (``dts.slurm``):
``process`` prepares the view and output as for any run, then submits a batch job and
leaves the job in ``run/slurm/``, holding no worker; the ``slurm.Follower`` of ``serve``
(and of ``dts watch``) hands it back to ``collect`` when the cluster job has ended, and
``collect`` checks and publishes it with the same code as a local run (``_finish``).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import threading
from pathlib import Path
from typing import Any, Literal, cast

import pydicom
from pydicom.errors import InvalidDicomError

from . import priors, review, slurm, worker
from .config import PRIOR_SELECTION, Stream
from .dicom.uid import valid_uid
from .errors import JobFailed, TemporaryFailure
from .executors import (
    Cancelled,
    RunResult,
    Task,
    executor_for,
    log_tail,
    parameter_environment,
    stop_orphaned_container,
    stop_orphaned_process,
    stop_processes_of_job,
)
from .builders import Built, RunContext, build
from .jobrecord import (BuiltEntry, JobRecord, RunInfo, RunningInfo, SlurmInfo,
                        ViolationEntry)
from .journal import Event, Stage, Status
from .provenance import register_produced
from .results import InvalidResults, describe, read_document, read_results
from .spool import (Claim, Job, Queue, SpoolError, State, dump_json, fsync_dir, isotime,
                    parse_isotime)
from .station import Station
from .validate import InputFacts, InvalidOutput, check_output
from .worker import Outcome, Tally

log = logging.getLogger(__name__)

VIEW_DIR = "view"            # <job>/view: what the processing sees as /input
TASK_FILE = "task.json"
ROR_DATA = "/data"           # the ror contract: the view is /data, descr.json in it
ROR_DESCR = "descr.json"
WHOLE_STUDY = "study"        # selection name when a stream selects nothing (whole study)
_SELECTION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# job.json keys of an earlier try that a successful run removes
_LAST_TRY: tuple[Literal["running", "error", "failure"], ...] = ("running", "error", "failure")
_REASONS = {
    "timeout": "killed at the stream's timeout",
    "oom": "killed for running out of memory",
}


# -- the input view ------------------------------------------------------------------


def selection_of(job: Job, data: JobRecord) -> dict[str, list[str]]:
    """``{selection name: [SeriesInstanceUID, ...]}`` from job.json; the whole input
    under ``study`` when the stream selected nothing."""
    raw = data.get("selection")
    if not raw:
        try:
            series = sorted(p.name for p in job.input_dir.iterdir() if p.is_dir())
        except FileNotFoundError:
            series = []
        return {WHOLE_STUDY: series}
    if not isinstance(raw, dict):
        raise JobFailed("job.json: selection is not an object of names to series lists")
    out: dict[str, list[str]] = {}
    for name, uids in raw.items():
        if not (isinstance(name, str) and _SELECTION_NAME.match(name) and name != TASK_FILE):
            raise JobFailed(f"job.json: selection name {name!r} is not usable as a folder name")
        if not isinstance(uids, list) or not all(valid_uid(u, conformant=True) for u in uids):
            raise JobFailed(f"job.json: selection {name!r} must list valid SeriesInstanceUIDs")
        out[name] = list(uids)
    return out


def build_view(job: Job, data: JobRecord, stream: Stream) -> Path:
    """Create ``<job>/view`` by hard links (never byte copies) and write task.json (the
    ``ror`` contract: the predecessor's ``/data`` layout instead, ``build_ror_view``)."""
    view = job.path / VIEW_DIR
    shutil.rmtree(view, ignore_errors=True)
    view.mkdir()
    selection = selection_of(job, data)
    if stream.contract == "ror":
        build_ror_view(job, view, selection, stream)
        return view
    files: dict[str, dict[str, list[str]]] = {}
    for name, series_uids in selection.items():
        files[name] = {}
        for uid in series_uids:
            src = job.input_dir / uid
            names = sorted(f.name for f in src.iterdir() if f.is_file()) if src.is_dir() else []
            if not names:
                raise JobFailed(f"selected series {uid} ({name}) has no instances in input/")
            dest = view / name / uid
            dest.mkdir(parents=True)
            for f in names:
                os.link(src / f, dest / f)
                if stream.user:
                    _readable(dest / f)
            files[name][uid] = [f"{name}/{uid}/{f}" for f in names]
    try:
        study = json.loads((job.path / "study.json").read_text())
    except FileNotFoundError:
        study = {}
    except ValueError as exc:
        raise JobFailed(f"study.json is not valid JSON: {exc}") from None
    task = {
        "job": job.id,
        "stream": stream.name,
        "parent": data.get("parent"),
        "study": study,
        "selection": selection,
        "files": files,
        "parameters": stream.parameters,
    }
    if stream.priors is not None:  # /input/prior/<Study>/<Series>/ (dts.priors)
        files[PRIOR_SELECTION], task["priors"] = priors.link_view(
            job, view, data, _readable if stream.user else None)
    (view / TASK_FILE).write_bytes(dump_json(task))
    return view


# DICOM attributes ror's descr.json carries per series (Description in ror.go), read from
# the series' first instance
_DESCR_KEYS = ("SeriesDescription", "Modality", "PatientID", "PatientName", "SequenceName",
               "StudyDate", "StudyTime", "SeriesTime", "SeriesNumber", "ReferringPhysicianName")


def _path_part(text: str) -> str:
    """One folder name of input_view_dicom_series/ (ror replaces only "/"; ".." and NUL
    could leave the view)."""
    text = text.replace("/", "_").replace("\0", "_")
    return "_" if text in (".", "..") else text


def _header(path: Path) -> dict[str, str]:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(_DESCR_KEYS)
                             + ["StudyInstanceUID"])
    except (InvalidDicomError, OSError, ValueError) as exc:
        raise JobFailed(f"{path.name}: not a readable DICOM file: {exc}") from None
    return {k: str(ds.get(k, "") or "") for k in (*_DESCR_KEYS, "StudyInstanceUID")}


def build_ror_view(job: Job, view: Path, selection: dict[str, list[str]],
                   stream: Stream) -> None:
    """The ``/data`` folder ``ror trigger`` gave a container (ror.go ``copyFiles``):

    - ``input/<Modality>_<NNNNNN>.dcm``: every selected file, numbered from 0 over the
      series in selection order (hard links here, copies in ror);
    - ``input_view_dicom_series/<PatientID>_<PatientName>/<StudyDate>_<StudyTime>/
      <SeriesNumber>_<SeriesDescription>/<same name>``: relative symbolic links to them;
    - ``descr.json``: one entry per selected series, with ``NameFromSelect`` the name
      the select statement gave it.
    """
    inp = view / "input"
    inp.mkdir()
    sorted_root = view / "input_view_dicom_series"
    study_doc = _study_document(job)
    types = {str(s.get("SeriesInstanceUID")): list(s.get("ClassifyType") or [])
             for s in study_doc.get("series", []) if isinstance(s, dict)}
    counter = 0
    linked: dict[str, tuple[int, str]] = {}  # series -> (files, its view path)
    descr: list[dict[str, Any]] = []
    for name, series_uids in selection.items():
        for uid in series_uids:
            src = job.input_dir / uid
            names = sorted(f.name for f in src.iterdir() if f.is_file()) if src.is_dir() else []
            if not names:
                raise JobFailed(f"selected series {uid} ({name}) has no instances in input/")
            head = _header(src / names[0])
            if uid not in linked:
                folder = (sorted_root / _path_part(f"{head['PatientID']}_{head['PatientName']}")
                          / _path_part(f"{head['StudyDate']}_{head['StudyTime']}")
                          / _path_part(f"{head['SeriesNumber']}_{head['SeriesDescription']}"))
                folder.mkdir(parents=True, exist_ok=True)
                for f in names:
                    fname = f"{counter:06d}.dcm"
                    if head["Modality"]:
                        fname = f"{head['Modality']}_{fname}"
                    fname = _path_part(fname)
                    counter += 1
                    os.link(src / f, inp / fname)
                    if stream.user:
                        _readable(inp / fname)
                    os.symlink(os.path.relpath(inp / fname, folder), folder / fname)
                linked[uid] = (len(names), str(folder.relative_to(view)))
            files, view_path = linked[uid]
            descr.append({
                "NameFromSelect": name, "SeriesInstanceUID": uid,
                "SeriesDescription": head["SeriesDescription"],
                "StudyInstanceUID": head["StudyInstanceUID"], "NumFiles": files,
                "Modality": head["Modality"], "PatientID": head["PatientID"],
                "PatientName": head["PatientName"], "SequenceName": head["SequenceName"],
                "StudyDate": head["StudyDate"], "StudyTime": head["StudyTime"],
                "SeriesTime": head["SeriesTime"], "SeriesNumber": head["SeriesNumber"],
                "ReferringPhysician": head["ReferringPhysicianName"],
                "ProcessDataPath": ROR_DATA, "ClassifyTypes": types.get(uid, []),
                "InputViewDICOMSeriesPath": view_path})
    (view / ROR_DESCR).write_text(json.dumps(descr, indent=2))


def _study_document(job: Job) -> dict[str, Any]:
    try:
        doc = json.loads((job.path / "study.json").read_text())
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise JobFailed(f"study.json is not valid JSON: {exc}") from None
    return doc if isinstance(doc, dict) else {}


def _readable(path: Path) -> None:
    """Let the stream's (other) user read an input file: received files may be 0600."""
    mode = os.stat(path).st_mode
    if mode & 0o004 == 0:
        os.chmod(path, mode | 0o044)


def prepare_output(job: Job, stream: Stream) -> Path:
    """An empty output/ (an interrupted attempt may have left files) the processing may
    write to, also as the stream's ``user``."""
    out = job.output_dir
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    uid, _, gid = (stream.user or "").partition(":")
    if uid.isdigit() and os.geteuid() == 0:
        os.chown(out, int(uid), int(gid) if gid.isdigit() else -1)
    elif stream.user:
        out.chmod(0o777)  # a named user inside an image: its uid is unknown here
    return out


# -- one job ------------------------------------------------------------------------


def process(station: Station, claim: Claim, *,
            cancel: threading.Event | None = None) -> Outcome:
    """Run one claimed job and move it on: send/new, failed/, or back to run/new."""
    job = claim.job
    data = job.read()
    name = data.get("stream")
    stream = station.config.stream(str(name)) if name else None
    if stream is None:
        return _fail(station, claim, "no-stream", f"stream {name!r} is not configured in "
                     f"{station.config.path}")
    attempts = int(data.get("attempts") or 0)
    max_attempts = station.config.station.max_attempts
    if attempts >= max_attempts:
        return _fail(station, claim, "attempts", f"gave up after {attempts} interrupted "
                     f"attempts ([station] max_attempts = {max_attempts})")
    if stream.priors is not None:  # the patient's earlier studies, into <job>/prior/
        try:
            priors.fetch(station, job, stream)
        except priors.PriorsMissing as exc:
            return _temporary(station, claim, str(exc), reason="priors-missing")
        except TemporaryFailure as exc:
            return _temporary(station, claim, str(exc), reason="pacs-unreachable")
        except JobFailed as exc:
            return _fail(station, claim, "priors", str(exc))
        data = job.read()
    if stream.executor == "slurm":
        return _submit(station, claim, stream, data)
    executor = executor_for(stream)
    started_at = isotime()
    try:
        view = build_view(job, data, stream)
        output = prepare_output(job, stream)
    except JobFailed as exc:
        return _fail(station, claim, "input", str(exc))
    task = Task(job_id=job.id, stream=stream, input_dir=view, output_dir=output,
                logs_dir=job.logs_dir, environment=parameter_environment(stream))
    station.journal.emit(Stage.RUN, Event.STARTED, Status.INFO,
                         f"{executor.kind} {stream.image or ' '.join(stream.command or ())}",
                         job=job, executor=executor.kind, attempt=attempts + 1)

    def started(info: dict[str, Any]) -> None:
        running = cast(RunningInfo, info.copy())  # the executor's keys (see RunningInfo)
        running.update({"started_at": started_at, "pid_of_runner": os.getpid()})
        job.update(running=running)

    try:
        result = executor.run(task, cancel=cancel, started=started)
    except (TemporaryFailure, Cancelled, JobFailed) as exc:
        error: Exception | None = exc
    else:
        error = None
    finally:
        shutil.rmtree(view, ignore_errors=True)  # before the job moves on
    if isinstance(error, TemporaryFailure):
        return _temporary(station, claim, str(error))
    if isinstance(error, Cancelled):
        _forget_running(job)
        station.journal.emit(Stage.RUN, Event.INTERRUPTED, Status.WARNING,
                             "stopped because the station is shutting down; job put back",
                             job=job)
        claim.move(Queue.RUN)
        return Outcome.SKIPPED  # not the job's fault: no attempt counted
    if error is not None:
        return _fail(station, claim, "setup", str(error))
    return _finish(station, claim, stream, result, started_at)


def _finish(station: Station, claim: Claim, stream: Stream, result: RunResult,
            started_at: str) -> Outcome:
    job = claim.job
    run = cast(RunInfo, result.provenance.copy())  # the executor's keys (see RunInfo)
    run.update({"exit_code": result.exit_code, "duration_seconds": round(result.duration, 3),
                "started_at": started_at, "finished_at": isotime()})
    if result.reason is not None:
        detail = _REASONS.get(result.reason, result.reason)
        if result.reason == "timeout":
            detail += f" ({stream.timeout:g} s)"
        elif result.reason == "oom":
            if not result.provenance.get("oom_killed"):
                detail = "killed by SIGKILL, most likely for running out of memory"
            detail += f" (memory = {stream.memory}, exit code {result.exit_code})"
        return _fail(station, claim, result.reason, detail, run=run)
    if result.exit_code != 0:
        return _fail(station, claim, "exit-code",
                     f"the processing exited with code {result.exit_code}", run=run)
    try:
        built = _build(job, stream, run)
    except InvalidResults as exc:
        return _fail(station, claim, "invalid-results", str(exc), run=run)
    facts = InputFacts.from_job(job.input_dir, job.read())
    facts.prior_study_uids, facts.prior_sop_uids = priors.facts(job)  # never sent on
    try:
        checked = check_output(job.output_dir, facts, allow_new_study=stream.allow_new_study)
    except InvalidOutput as exc:
        return _fail(station, claim, "invalid-output", str(exc), run=run,
                     violations=[{"file": v.file, "rule": v.rule, "detail": v.detail}
                                 for v in exc.violations])
    if checked.empty and stream.expect_output:
        return _fail(station, claim, "no-output", "the processing wrote nothing to its output "
                     "(set expect_output = false in the stream if that can be right)", run=run)
    try:
        results = read_results(job.output_dir, stream.contract)
    except InvalidResults as exc:
        return _fail(station, claim, "invalid-results", str(exc), run=run)
    _sync_tree(job.output_dir)  # the processing wrote without fsync; the sender relies on it
    # Registered before the results can leave, so that our own objects coming back from
    # a PACS are always recognised.
    register_produced(station.spool, [o.sop_uid for o in checked.dicom], job.id)
    data = job.read()
    for key in _LAST_TRY:
        data.pop(key, None)
    data.update({"run": run, "outputs": [o.as_dict() for o in checked.dicom],
                 "other_files": checked.other})
    data.pop("results", None)
    if results:
        data["results"] = results
    data.pop("built", None)
    if built:
        data["built"] = [cast(BuiltEntry, b.as_dict()) for b in built]
    job.write(data)
    for entry in results:
        station.journal.emit(Stage.RUN, Event.RESULT, Status.INFO, describe(entry), job=job,
                             job_data=data, result=dict(entry))
    station.journal.emit(Stage.RUN, Event.FINISHED, Status.OK,
                         f"{len(checked.dicom)} DICOM object(s) ({len(built)} built by dts), "
                         f"{len(checked.other)} other file(s) in {result.duration:.1f} s",
                         job=job, job_data=data, outputs=len(checked.dicom), built=len(built),
                         duration=round(result.duration, 3))
    # send/new, or review/new (a review stream), or done/ (a shadow job): dts.review
    where = review.hand_on(station, claim, stream, data)
    log.info("%s: done, %d DICOM object(s), now in %s", job.id, len(checked.dicom), where)
    return Outcome.DONE


def _build(job: Job, stream: Stream, run: RunInfo) -> list[Built]:
    """The DICOM objects results.json asks for, written into output/dts-built/ (the
    ``dts`` contract; ``build = false`` in the stream turns it off)."""
    if stream.contract == "ror":
        return []
    doc = read_document(job.output_dir)
    if doc is None or not stream.build or not doc.wants_objects:
        return []
    image = stream.image or ""
    name, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "")
    digests = [d.rpartition("@sha256:")[2] for d in run.get("image_digests") or []]
    digest = next((d for d in digests if d), None) or (
        str(run.get("image_id") or "").removeprefix("sha256:") or None)
    ctx = RunContext(
        stream=stream.name,
        model_name=doc.model_name or name.rsplit("/", 1)[-1] or stream.name,
        model_version=doc.model_version or tag or "unknown", image_digest=digest,
        series_description=stream.series_description,
        previous=list(job.read().get("built") or []))  # type: ignore[arg-type]
    return build(doc, job.output_dir, job.input_dir, ctx)


def _sync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY | os.O_NOFOLLOW)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def _forget_running(job: Job) -> None:
    data = job.read()
    if data.pop("running", None) is not None:
        job.write(data)


def _fail(station: Station, claim: Claim, reason: str, message: str,
          run: RunInfo | None = None,
          violations: list[ViolationEntry] | None = None) -> Outcome:
    job = claim.job
    tail = log_tail(job.logs_dir) if run is not None else ""
    data = job.read()
    data.pop("running", None)
    data.pop("results", None)  # an earlier run's values do not stand for a failed one
    data["error"] = message + (f"\n--- last lines of the log ---\n{tail}" if tail else "")
    data["failure"] = {"stage": "run", "reason": reason, "message": message, "log_tail": tail,
                       "time": isotime()}
    if violations is not None:
        data["failure"]["violations"] = violations
    if run is not None:
        data["run"] = run
    job.write(data)
    station.journal.emit(Stage.RUN, Event.FAILED, Status.ERROR, message, job=job, job_data=data,
                         reason=reason, exit_code=(run or {}).get("exit_code"))
    claim.move(Queue.FAILED)
    log.warning("%s: failed (%s): %s", job.id, reason, message)
    return Outcome.FAILED


def _temporary(station: Station, claim: Claim, message: str,
               reason: str = "engine-unreachable") -> Outcome:
    """Engine (or the priors' PACS) down: count the attempt; back to run/new, or failed/
    (with ``reason``) when attempts are used up."""
    job = claim.job
    data = job.read()
    data.pop("running", None)
    data["attempts"] = int(data.get("attempts") or 0) + 1
    data["last_error"] = message
    job.write(data)
    max_attempts = station.config.station.max_attempts
    if data["attempts"] >= max_attempts:
        return _fail(station, claim, reason,
                     f"{message} (gave up after {data['attempts']} attempts)")
    station.journal.emit(Stage.RUN, Event.RETRY, Status.WARNING,
                         f"{message}; attempt {data['attempts']} of {max_attempts}, job put back",
                         job=job, job_data=data)
    claim.move(Queue.RUN)
    log.warning("%s: %s; put back (attempt %d of %d)", job.id, message, data["attempts"],
                max_attempts)
    return Outcome.RETRY


# -- recovery -----------------------------------------------------------------------


def on_recovered(job: Job) -> None:
    """Stop what a dead ``dts run`` left running for ``job`` (called under its lock)."""
    data = job.read()
    info = data.get("running")
    if data.get("slurm"):
        # a cluster job is Slurm's, not an orphan: it is found again by name and followed
        # (or, if it never reached Slurm, submitted after one more look by name)
        if data.pop("running", None) is not None:
            job.write(data)
        return
    stopped: list[str] = []
    recorded_pgid: int | None = None
    if isinstance(info, dict) and info.get("executor") == "command":
        if stop_orphaned_process(info):
            recorded_pgid = int(info["pid"])
            stopped.append(f"process group {recorded_pgid}")
    # a command started just before its pid reached job.json is found by its environment
    stopped += [f"process {pid}" for pid in stop_processes_of_job(job.id, recorded_pgid)]
    if isinstance(info, dict) and info.get("executor") != "command":
        try:
            stopped += [f"container {c}" for c in stop_orphaned_container(job.id)]
        except TemporaryFailure:
            pass  # the next attempt removes it by its label before starting a new one
    data.pop("running", None)
    if stopped:
        data["orphans_stopped"] = list(data.get("orphans_stopped") or []) + stopped
    job.write(data)


def _recover(station: Station) -> list[str]:
    def hook(job: Job) -> None:
        before = len(job.read().get("orphans_stopped") or [])
        on_recovered(job)
        stopped = (job.read().get("orphans_stopped") or [])[before:]
        if stopped:
            station.journal.emit(Stage.RUN, Event.ORPHAN_STOPPED, Status.WARNING,
                                 f"stopped {', '.join(stopped)} left by a dts run that died",
                                 job=job)
    return worker.recover(station, Queue.RUN, hook)


# -- on the cluster (executor = "slurm") ----------------------------------------------

# one submission at a time per process: [slurm] max_submitted is counted in run/slurm/
_SUBMIT_LOCK = threading.Lock()


def _submit(station: Station, claim: Claim, stream: Stream, data: JobRecord) -> Outcome:
    """Hand a claimed run job to Slurm and leave it in run/slurm/ (no worker holds it)."""
    job, spool, cfg = claim.job, station.spool, station.config.slurm
    info: SlurmInfo = data.get("slurm") or {}
    cluster = slurm.Cluster(cfg)
    if info.get("job_id") and not info.get("collected_at"):
        return _adopt(station, claim, data, info, "followed again")  # back from run/cur
    reuse = bool(info.get("token")) and not info.get("job_id")
    token = str(info.get("token")) if reuse else slurm.new_token(spool)
    name = slurm.job_name(job.id)
    info = {**(info if reuse else {}), "name": name, "token": token,
            "state": slurm.UNSUBMITTED}
    if cfg.partition:
        info["partition"] = cfg.partition
    try:
        # an earlier try may have reached Slurm although its answer was lost: never twice
        known = cluster.queue([name])[name]
        mine = next((j for j in known if j.token == token), None)
        if mine is not None:
            info.update({"job_id": mine.job_id, "state": mine.state, "submitted_at": isotime()})
            return _adopt(station, claim, data, info, "found again by its name")
        stale = [j for j in known if not j.ended]
        for old in stale:
            cluster.cancel(old.job_id)
    except slurm.SlurmUnreachable as exc:
        data["slurm"] = info
        job.write(data)
        return _temporary(station, claim, str(exc), "slurm-unreachable")
    if stale:
        station.journal.emit(Stage.RUN, Event.ORPHAN_STOPPED, Status.WARNING,
                             f"cancelled slurm job(s) {', '.join(j.job_id for j in stale)} of "
                             "an earlier run of this job; it is submitted once they have "
                             "ended", job=job)
        return Outcome.SKIPPED  # back to run/new (the claim's home) for the next round
    with _SUBMIT_LOCK:
        if slurm.submitted_count(spool) >= cfg.max_submitted:
            return Outcome.SKIPPED  # [slurm] max_submitted on the cluster: wait in run/new
        try:
            build_view(job, data, stream)
            prepare_output(job, stream)
        except JobFailed as exc:
            return _fail(station, claim, "input", str(exc))
        info.update({"state": slurm.SUBMITTING, "submitting_at": isotime()})
        data = job.read()
        data.pop("running", None)
        data["slurm"] = info
        job.write(data)
        claim.move_keep(Queue.RUN, State.SLURM)  # where the cluster job will see it
        job = claim.job
    try:
        argv, env, command = slurm.write_batch(job, stream, cfg, spool, token)
        info.update({"sbatch": argv, "command": command,
                     "node_folder": slurm.Paths(spool, cfg).node(job.path)})
        _save_slurm(job, info)
        job_id = cluster.submit(argv, env)
    except slurm.SubmissionRefused as exc:
        shutil.rmtree(job.path / VIEW_DIR, ignore_errors=True)
        info["state"] = "REFUSED"
        _save_slurm(job, info)
        return _fail(station, claim, "slurm-refused", str(exc))
    except slurm.SlurmUnreachable as exc:
        if exc.uncertain:
            # slurmctld may have taken it: it stays in run/slurm as SUBMITTING, and the
            # follower finds it by name and token, or puts it back after command_timeout
            data = _save_slurm(job, info)
            station.journal.emit(Stage.RUN, Event.RETRY, Status.WARNING,
                                 f"{exc}; it may have reached Slurm all the same: the job "
                                 "waits in run/slurm until Slurm says whether it has it",
                                 job=job, job_data=data)
            claim.release()
            return Outcome.RETRY
        shutil.rmtree(job.path / VIEW_DIR, ignore_errors=True)
        info["state"] = slurm.UNSUBMITTED  # the token stays: if it got there, it is found
        _save_slurm(job, info)
        return _temporary(station, claim, str(exc), "slurm-unreachable")
    except JobFailed as exc:
        shutil.rmtree(job.path / VIEW_DIR, ignore_errors=True)
        return _fail(station, claim, "setup", str(exc))
    info.update({"job_id": job_id, "state": "PENDING", "submitted_at": isotime()})
    data = _save_slurm(job, info)
    station.journal.emit(Stage.RUN, Event.SUBMITTED, Status.INFO,
                         f"slurm job {job_id} submitted as {info['name']} "
                         f"({cfg.partition or 'default partition'}, "
                         f"--time={slurm.sbatch_minutes(stream.timeout)})", job=job,
                         job_data=data, executor="slurm", slurm_job_id=job_id,
                         attempt=int(data.get("attempts") or 0) + 1)
    claim.release()
    log.info("%s: submitted as slurm job %s", job.id, job_id)
    return Outcome.SUBMITTED


def _save_slurm(job: Job, info: SlurmInfo) -> JobRecord:
    data = job.read()
    data["slurm"] = info
    job.write(data)
    return data


def _adopt(station: Station, claim: Claim, data: JobRecord, info: SlurmInfo,
           how: str) -> Outcome:
    """A cluster job of this run exists already: follow it in run/slurm/, do not submit."""
    job = claim.job
    data["slurm"] = info
    data.pop("running", None)
    job.write(data)
    claim.move_keep(Queue.RUN, State.SLURM)
    job = claim.job
    station.journal.emit(Stage.RUN, Event.SUBMITTED, Status.INFO,
                         f"slurm job {info.get('job_id')} of this run {how}; following it",
                         job=job, job_data=data, executor="slurm",
                         slurm_job_id=info.get("job_id"), adopted=True)
    claim.release()
    return Outcome.SUBMITTED


def _seconds(start: str | None, end: str | None) -> float:
    try:
        return max(0.0, (parse_isotime(str(end)) - parse_isotime(str(start))).total_seconds())
    except (TypeError, ValueError):
        return 0.0


def collect(station: Station, claim: Claim, cj: slurm.ClusterJob) -> Outcome:
    """A cluster job has ended (the follower holds the job, moved to run/cur): its state,
    exit code and log decide, and a good run is checked and published as a local one."""
    job = claim.job
    shutil.rmtree(job.path / VIEW_DIR, ignore_errors=True)
    data = job.read()
    info: SlurmInfo = data.get("slurm") or {}
    stream = station.config.stream(str(data.get("stream") or ""))
    left = slurm.left_by_script(job, info)
    exit_code = left.exit_code if left is not None else cj.exit_code
    node = slurm.script_node(job) or cj.node or info.get("node")
    now = isotime()
    info.update({"state": cj.state, "ended_at": cj.end or now, "collected_at": now,
                 "exit_code": exit_code})
    if node:
        info["node"] = node
    if cj.reason and cj.reason != "None":
        info["reason"] = cj.reason
    data["slurm"] = info
    job.write(data)
    started_at = info.get("started_at") or info.get("submitted_at") or now
    duration = _seconds(started_at, info.get("ended_at"))
    run: RunInfo = {"executor": "slurm", "runtime": "podman" if stream and stream.image
                    else "command", "slurm_job_id": cj.job_id, "slurm_state": cj.state,
                    "exit_code": exit_code, "duration_seconds": round(duration, 3),
                    "started_at": started_at, "finished_at": str(info.get("ended_at"))}
    if node:
        run["node"] = node
    if stream is not None and stream.image:
        run["image"] = stream.image
    elif info.get("command"):
        run["command"] = list(info.get("command") or [])
    where = f"slurm job {cj.job_id}" + (f" on {node}" if node else "")
    if stream is None:
        return _fail(station, claim, "no-stream", f"stream {data.get('stream')!r} is not "
                     f"configured in {station.config.path}", run=run)
    state = cj.state
    if state in slurm.RERUN or state == slurm.VANISHED:
        what = (f"Slurm no longer knows {where} and it left no exit code"
                if state == slurm.VANISHED else f"{where} ended {state}")
        return _rerun(station, claim, state, what)
    if state == "TIMEOUT":
        return _fail(station, claim, "timeout", f"{where} was stopped by Slurm at its time "
                     f"limit (state TIMEOUT; the stream's timeout {stream.timeout:g} s, "
                     f"--time={slurm.sbatch_minutes(stream.timeout)})", run=run)
    if state == "OUT_OF_MEMORY" or (exit_code == 137 and stream.memory and stream.image):
        return _fail(station, claim, "oom", f"{where} ran out of memory (state {state}, "
                     f"memory = {stream.memory}, exit code {exit_code})", run=run)
    if state == "CANCELLED":
        return _fail(station, claim, "cancelled", f"{where} was cancelled outside dts (state "
                     f"CANCELLED, exit code {exit_code})", run=run)
    if state != slurm.COMPLETED and left is None and slurm.script_node(job) is None:
        return _fail(station, claim, "not-shared", f"{where} ended {state} before its batch "
                     f"script ran in the job's folder {info.get('node_folder')}: is the spool "
                     "on a filesystem the node shares ([slurm] spool_path)? (Slurm's reason: "
                     f"{cj.reason or 'none'}, exit code {exit_code})", run=run)
    if state not in (slurm.COMPLETED, "FAILED"):
        return _fail(station, claim, f"slurm-{state.lower()}", f"{where} ended {state} "
                     f"(exit code {exit_code})", run=run)
    if exit_code != 0:
        return _fail(station, claim, "exit-code", f"the processing exited with code "
                     f"{exit_code} ({where}, state {state})", run=run)
    return _finish(station, claim, stream, RunResult(exit_code=0, duration=duration,
                                                     provenance=dict(run)), started_at)


def _rerun(station: Station, claim: Claim, state: str, message: str) -> Outcome:
    """Not the job's fault (the node failed, it was preempted): run it again with the
    attempt counted, or fail once ``max_attempts`` are used up."""
    job = claim.job
    data = job.read()
    data["attempts"] = int(data.get("attempts") or 0) + 1
    old = data.pop("slurm", None)
    if old is not None:
        data["slurm_history"] = [*(data.get("slurm_history") or []), old]
    data["last_error"] = message
    job.write(data)
    max_attempts = station.config.station.max_attempts
    if data["attempts"] >= max_attempts:
        return _fail(station, claim, f"slurm-{state.lower()}",
                     f"{message} (gave up after {data['attempts']} attempts)")
    station.journal.emit(Stage.RUN, Event.RETRY, Status.WARNING,
                         f"{message}; attempt {data['attempts']} of {max_attempts}, job put "
                         "back to run again", job=job, job_data=data, slurm_state=state)
    claim.move(Queue.RUN)
    return Outcome.RETRY


def ready_for(station: Station) -> worker.Ready:
    """The run queue's ``ready``: a job of a Slurm stream waits in run/new while
    ``[slurm] max_submitted`` jobs are on the cluster."""
    def ready(job: Job) -> bool:
        try:
            name = job.read().get("stream")
        except SpoolError:
            return True  # the stage itself says what is wrong with it
        stream = station.config.stream(str(name)) if isinstance(name, str) else None
        if stream is None or stream.executor != "slurm":
            return True
        return slurm.submitted_count(station.spool) < station.config.slurm.max_submitted
    return ready


# -- the stage ----------------------------------------------------------------------


def serve(station: Station, *, once: bool = False, job_ids: list[str] | None = None,
          stop: threading.Event | None = None) -> Tally:
    """The body of ``dts run``: recover, then the given jobs, what is queued, or forever,
    with up to ``[station] max_parallel_runs`` runs at a time. Setting ``stop`` stops
    running processing and puts its jobs back.

    With Slurm streams (or jobs on the cluster) it also follows ``run/slurm/``: ``--once``
    collects what has ended, then submits what waits (and returns; what still runs is
    collected by the next one); forever, a follower thread polls beside the claimers;
    given job ids are submitted and followed until they end."""
    _recover(station)
    stop = stop if stop is not None else threading.Event()
    if any(s.executor == "slurm" and s.enabled for s in station.config.streams):
        for warning in slurm.check_ready(station):
            log.warning("%s", warning)
    follower = (slurm.Follower(station, functools.partial(collect, station))
                if slurm.follow_jobs(station) else None)
    proc = functools.partial(process, cancel=stop)
    if job_ids:
        tally = worker.process_ids(station, Queue.RUN, list(job_ids), proc)
        if follower is not None:
            tally.merge(follower.follow(set(job_ids) & set(tally.submitted), stop))
        return tally
    # engine down (a RETRY): give it time before the job's next try
    loop = worker.ClaimLoop(station, Queue.RUN, proc, stop=stop, name="dts-run",
                            claimers=station.config.station.max_parallel_runs,
                            pause=min(600.0, station.config.station.rescan_seconds),
                            ready=ready_for(station))
    if once:
        tally = follower.poll() if follower is not None else Tally()
        tally.merge(loop.drain())
        return tally
    if follower is None:
        return loop.serve()
    follower.wake = loop.wake
    followed: list[Tally] = []
    thread = threading.Thread(target=lambda: followed.append(follower.serve(stop)),
                              name="dts-slurm", daemon=True)
    thread.start()
    try:
        tally = loop.serve()
    finally:
        stop.set()
        thread.join(station.config.slurm.command_timeout * 2 + 5)
    for t in followed:
        tally.merge(t)
    return tally
