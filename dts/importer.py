"""Owns ``dts import``: DICOM files from disk enter the spool as if they had been received.

Files are grouped by study; each study becomes one job in ``classify/new/`` with the
same layout and job.json as a received one (``source: import``). Files are hard-linked
into the job when the spool is on the same filesystem, else copied through the job's
folder under ``tmp/``; either way the job is only published once complete.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .dicom.header import read_header
from .errors import UsageError
from .journal import Event, Stage, Status
from .receiver import check_uids, job_data
from .spool import Queue, fsync_dir, isotime
from .station import Station


@dataclass
class Skipped:
    path: Path
    reason: str
    refused: bool  # True: DICOM we will not take (bad UIDs); False: not DICOM at all


@dataclass
class Imported:
    job_id: str
    study_uid: str
    instances: int
    series: int


@dataclass
class ImportResult:
    jobs: list[Imported] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def refused(self) -> list[Skipped]:
        return [s for s in self.skipped if s.refused]


def _files(paths: list[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames.sort()
                for name in sorted(filenames):
                    yield Path(dirpath) / name
        elif path.exists():
            yield path
        else:
            raise UsageError(f"no such file or folder: {path}")


def import_paths(station: Station, paths: list[Path], *, calling_ae: str | None = None,
                 called_ae: str | None = None) -> ImportResult:
    """Import every DICOM file under ``paths``; one published job per study."""
    result = ImportResult()
    studies: dict[str, dict[str, object]] = {}
    files: dict[str, list[tuple[Path, str, str]]] = {}
    for path in _files([Path(p) for p in paths]):
        try:
            header = read_header(path)
        except ValueError:
            result.skipped.append(Skipped(path, "not a DICOM file", refused=False))
            continue
        why = check_uids(header)
        if why is not None:
            result.skipped.append(Skipped(path, why, refused=True))
            continue
        study = str(header["study_uid"])
        if study not in studies:
            studies[study] = {"patient_id": header.get("patient_id"),
                              "accession": header.get("accession")}
            files[study] = []
        files[study].append((path, str(header["series_uid"]), str(header["sop_uid"])))
    for study_uid, entries in files.items():
        result.jobs.append(_import_study(station, study_uid, entries, studies[study_uid],
                                         calling_ae, called_ae))
    return result


def _import_study(station: Station, study_uid: str, entries: list[tuple[Path, str, str]],
                  info: dict[str, object], calling_ae: str | None,
                  called_ae: str | None) -> Imported:
    spool = station.spool
    job = spool.create_tmp_job()
    try:
        job.input_dir.mkdir()
        for n, (src, series_uid, sop_uid) in enumerate(entries):
            series_dir = job.input_dir / series_uid
            series_dir.mkdir(exist_ok=True)
            tmp = job.path / f".import-{n}"
            try:
                os.link(src, tmp)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EACCES, errno.EMLINK):
                    raise
                shutil.copyfile(src, tmp)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, series_dir / f"{sop_uid}.dcm")  # a duplicate SOP: the later wins
        for series_dir in job.input_dir.iterdir():
            fsync_dir(series_dir)
        meta = {"calling_ae": calling_ae, "called_ae": called_ae or station.config.station.ae_title,
                "peer": None, "peer_port": None, "received_at": isotime(), "source": "import",
                **info}
        data = job_data(study_uid, meta, job.input_dir)
        job.write(data)
        station.journal.emit(
            Stage.RECEIVE, Event.RECEIVED, Status.OK,
            f"study {study_uid}: {data['instances']} instance(s) in {len(data['series'])} "
            "series imported from disk", job=job, job_data=data, instances=data["instances"],
            calling_ae=data.get("calling_ae"), called_ae=data.get("called_ae"),
            source="import")
        spool.publish(job, Queue.CLASSIFY)
    except BaseException:
        shutil.rmtree(job.path, ignore_errors=True)
        raise
    return Imported(job.id, study_uid, int(data["instances"]), len(data["series"]))
