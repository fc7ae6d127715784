"""The shared claim loop: an unexpected error never loses a job nor retries it forever."""

from __future__ import annotations

from pathlib import Path

from dts import worker
from dts.spool import Claim, Job, Queue, State
from dts.station import Station


def _broken(station: Station, claim: Claim) -> worker.Outcome:
    raise RuntimeError("stage bug")


def _publish(station: Station, data: bytes | None = None) -> str:
    job = station.spool.create_tmp_job()
    if data is None:
        job.write({"attempts": 0, "study_uid": "1.2.3"})
    else:
        job.job_file.write_bytes(data)
    station.spool.publish(job, Queue.CLASSIFY)
    return job.id


def test_a_job_that_always_trips_the_stage_fails_after_max_attempts(base_config: Path) -> None:
    station = Station.open(base_config)
    assert station.config.station.max_attempts == 3
    jid = _publish(station)
    outcomes = []
    for _ in range(3):
        tally = worker.serve(station, Queue.CLASSIFY, _broken, once=True)
        outcomes.append(tally.exit_code)
    assert outcomes == [75, 75, 1]
    assert station.spool.list(Queue.CLASSIFY, State.NEW) == []
    failed = Job(station.spool.dir(Queue.FAILED) / jid)
    data = failed.read()
    assert data["attempts"] == 3 and "stage bug" in data["error"]
    assert data["study_uid"] == "1.2.3"  # job.json kept, only annotated
    events = [e["event"] for e in failed.events()]
    assert events == ["internal-error", "internal-error", "failed"]


def test_an_unreadable_job_json_goes_to_failed_untouched(base_config: Path) -> None:
    station = Station.open(base_config)
    jid = _publish(station, b"{not json")

    def reads_job(station: Station, claim: Claim) -> worker.Outcome:
        claim.job.read()
        return worker.Outcome.DONE

    tally = worker.serve(station, Queue.CLASSIFY, reads_job, once=True)
    assert tally.failed == [jid] and tally.exit_code == 1
    failed = Job(station.spool.dir(Queue.FAILED) / jid)
    assert failed.job_file.read_bytes() == b"{not json"  # evidence kept as it was
    [ev] = failed.events()
    assert ev["event"] == "failed" and "unreadable job.json" in ev["message"]
