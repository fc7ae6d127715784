"""Owns ``spool/priors/``: the prior studies run jobs wait for by C-MOVE, and the
receiver's routing of them (``dts.priors`` does the rest).

Before a C-MOVE the run stage registers what it waits for (``expect``):
``spool/priors/expect/<StudyInstanceUID>/<job>.json`` holding the job, the PatientID, the
AE title of the PACS and a deadline, written under ``tmp/`` and renamed. The receiver
asks ``expected`` (one stat) about every instance it stores and ``route`` about those of
an expected study: an instance from that AE title and of that patient goes, fsynced, to
``spool/priors/<job>/<Study>/<Series>/<SOP>.dcm`` (hard links for a second job waiting
for the same study), never into ``incoming/``; one of another patient is refused for
good and noted in ``spool/priors/<job>/refused.jsonl`` for the run stage to name; one
from another AE title is refused for now (0xA700) while the expectation lasts. An
expectation past its deadline is ignored; ``sweep`` removes it, and ``dts clean`` what
jobs no longer in ``run/cur/`` left here.

No DICOM library is imported here: ``dts clean`` uses this module too.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from .errors import TemporaryFailure
from .spool import Spool, dump_json, fsync_dir, isotime, parse_isotime, utcnow

log = logging.getLogger(__name__)

EXPECT_DIR = "expect"          # spool/priors/expect/<Study>/<job>.json
REFUSED_FILE = "refused.jsonl"  # spool/priors/<job>/refused.jsonl
# How long an expectation holds after the C-MOVE began; the run stage removes it as soon
# as the C-MOVE ends, so this only matters after it died.
EXPECT_SECONDS = 3600.0

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700      # "refused for now": a sender may try again later
CANNOT_UNDERSTAND = 0xC000     # refused for good: not what was asked for

_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def place(src: str, dest_dir: str, name: str, tmp: str, *, move: bool,
          synced: bool = False) -> str:
    """Put the received file ``src`` as ``dest_dir/name`` durably (renamed when ``move``
    and on the same filesystem, else copied through ``tmp``; ``synced``: ``src`` is
    fsynced already)."""
    new = not os.path.isdir(dest_dir)
    os.makedirs(dest_dir, exist_ok=True)
    if new:
        fsync_dir(os.path.dirname(dest_dir))
    dest = os.path.join(dest_dir, name)
    if move:
        if not synced:
            _fsync_file(src)
        os.rename(src, dest)
    else:
        part = os.path.join(tmp, f".prior-copy-{os.getpid()}-{name}")
        shutil.copyfile(src, part)
        _fsync_file(part)
        os.rename(part, dest)
    fsync_dir(dest_dir)
    return dest


def expect(spool: Spool, study_uid: str, job_id: str, patient_id: str, calling_ae: str,
           seconds: float = EXPECT_SECONDS) -> Path:
    """Register that ``job_id`` waits for ``study_uid`` from ``calling_ae`` (atomic)."""
    folder = spool.priors / EXPECT_DIR / study_uid
    body = dump_json({"job": job_id, "study_uid": study_uid, "patient_id": patient_id,
                      "calling_ae": calling_ae, "created_at": isotime(),
                      "deadline": isotime(utcnow() + timedelta(seconds=seconds))})
    part = spool.tmp / f".prior-expect-{job_id}-{study_uid}.json"
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, body)
        os.fsync(fd)
    finally:
        os.close(fd)
    dest = folder / f"{job_id}.json"
    for _ in range(5):  # another job's forget() may remove the empty folder meanwhile
        folder.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(part, dest)
            break
        except FileNotFoundError:
            continue
    else:
        part.unlink(missing_ok=True)
        raise TemporaryFailure(f"priors: cannot register the expected study {study_uid}")
    fsync_dir(folder)
    fsync_dir(folder.parent)
    return dest


def forget(expectation: Path) -> None:
    expectation.unlink(missing_ok=True)
    try:
        expectation.parent.rmdir()
    except OSError:
        pass  # another job waits for the same study


def expected(expect_root: str, study_uid: str) -> bool:
    """Whether some job waits for ``study_uid`` (one stat: asked for every instance)."""
    return os.path.isdir(os.path.join(expect_root, study_uid))


def _live(folder: str, now: datetime) -> list[dict[str, Any]]:
    out = []
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    for name in names:
        path = os.path.join(folder, name)
        try:
            with open(path, "rb") as fh:
                entry = json.loads(fh.read(65536))
            deadline = parse_isotime(str(entry["deadline"]))
            job_id = str(entry["job"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if deadline < now or not _JOB_ID.fullmatch(job_id):
            continue  # stale: the run stage that wrote it is gone (sweep removes it)
        out.append(entry)
    return out


def route(spool: Spool, tmp: str, calling_ae: str,
          header: dict[str, str | None], path: str) -> tuple[int, str] | None:
    """The receiver's question for an instance (its UIDs checked, its file fsynced)
    of a study some job waits for: None when no live expectation holds it (receive it
    as usual), else the status to answer and, for a failure, why. Stored instances go
    to ``spool/priors/<job>/<Study>/<Series>/<SOP>.dcm`` for every job waiting."""
    study = str(header.get("study_uid"))
    waiting = _live(os.path.join(spool.priors, EXPECT_DIR, study), utcnow())
    if not waiting:
        return None
    ours = [e for e in waiting if e.get("calling_ae") == calling_ae]
    if not ours:
        peers = ", ".join(sorted({str(e.get("calling_ae")) for e in waiting}))
        return OUT_OF_RESOURCES, (f"study {study} is being retrieved as a prior from {peers}; "
                                  f"not accepted from {calling_ae!r} meanwhile")
    patient = (header.get("patient_id") or "").strip()
    series, sop = str(header.get("series_uid")), str(header.get("sop_uid"))
    placed: str | None = None
    for entry in ours:
        job_id = str(entry["job"])
        if patient != str(entry.get("patient_id") or ""):
            why = (f"instance {sop} of study {study}: its PatientID is another patient's than "
                   f"job {job_id}'s, which retrieves it as a prior")
            _note_refusal(spool, job_id, why)
            return CANNOT_UNDERSTAND, why
    try:
        for entry in ours:
            dest_dir = os.path.join(spool.priors, str(entry["job"]), study, series)
            if placed is None:
                placed = place(path, dest_dir, sop + ".dcm", tmp,
                               move=os.path.dirname(path) == tmp, synced=True)
            else:  # a second job waits for the same study: a hard link
                os.makedirs(dest_dir, exist_ok=True)
                dest = os.path.join(dest_dir, sop + ".dcm")
                if not os.path.exists(dest):
                    os.link(placed, dest)
                fsync_dir(dest_dir)
    except OSError as exc:
        return OUT_OF_RESOURCES, f"cannot store prior instance {sop}: {exc.strerror or exc}"
    return SUCCESS, ""


def _note_refusal(spool: Spool, job_id: str, why: str) -> None:
    folder = spool.priors / job_id
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / REFUSED_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, json.dumps({"time": isotime(), "reason": why}).encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        log.error("priors: cannot note a refusal for %s: %s", job_id, exc)


def refusals(staging: Path) -> list[str]:
    try:
        lines = (staging / REFUSED_FILE).read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            out.append(str(json.loads(line)["reason"]))
        except (ValueError, KeyError, TypeError):
            continue
    return out


def sweep(spool: Spool, *, active: set[str] | None = None, dry_run: bool = False) -> list[str]:
    """Remove expectations past their deadline and, when ``active`` (the ids of the jobs
    in ``run/cur/``) is given, the expectations and ``spool/priors/<job>/`` folders of
    every other job (only a run stage holding the job waits for them); what was removed,
    relative to ``spool/priors``."""
    removed: list[str] = []
    root = spool.priors / EXPECT_DIR
    now = utcnow()
    try:
        studies = sorted(os.listdir(root))
    except FileNotFoundError:
        studies = []
    for study in studies:
        folder = root / study
        live = {str(e["job"]) for e in _live(str(folder), now)}
        if active is not None:
            live &= active
        try:
            names = sorted(os.listdir(folder))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for name in names:
            if name.removesuffix(".json") in live:
                continue
            removed.append(f"{EXPECT_DIR}/{study}/{name}")
            if not dry_run:
                (folder / name).unlink(missing_ok=True)
        if not dry_run:
            try:
                folder.rmdir()
            except OSError:
                pass
    if active is None:
        return removed
    try:
        entries = sorted(os.listdir(spool.priors))
    except FileNotFoundError:
        return removed
    for name in entries:
        if name == EXPECT_DIR or name in active:
            continue
        removed.append(name)
        if not dry_run:
            shutil.rmtree(spool.priors / name, ignore_errors=True)
    return removed
