"""``dts import``: files and folders from disk enter the spool as if received."""

from __future__ import annotations

import json
import os
from pathlib import Path

from click.testing import CliRunner
from pydicom.uid import generate_uid

from dts.cli import cli
from dts.spool import Job
from tests.helpers import make_instance, make_study, run_dts
from tests.test_receive import write_station_config


def _job(spool: Path, job_id: str) -> Job:
    return Job(spool / "classify" / "new" / job_id)


def test_import_folder_one_job_per_study_skips_non_dicom(tmp_path: Path) -> None:
    config = write_station_config(tmp_path, 11112)
    spool = tmp_path / "spool"
    data = tmp_path / "cdrom"
    one = make_study(data / "one", n_series=2, per_series=2, accession="A1")
    two = make_study(data / "two", n_series=1, per_series=3, accession="A2")
    (data / "DICOMDIR.txt").write_text("not dicom at all")
    (data / "one" / "README").write_bytes(b"\x00" * 300)
    done = run_dts("import", "--calling-ae", "CDROM", str(data), config=config)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("warning: skipped") == 2
    assert "DICOMDIR.txt" in done.stderr and "not a DICOM file" in done.stderr
    lines = [line.split("\t") for line in done.stdout.splitlines()]
    assert len(lines) == 2
    by_study = {study: (job_id, int(n)) for job_id, study, n in lines}
    assert by_study[one["study_uid"]][1] == 4 and by_study[two["study_uid"]][1] == 3
    job = _job(spool, by_study[one["study_uid"]][0])
    data_one = job.read()
    assert data_one["calling_ae"] == "CDROM" and data_one["called_ae"] == "DTS"
    assert data_one["accession"] == "A1" and data_one["instances"] == 4
    assert (data_one["stream"], data_one["attempts"], data_one["error"]) == (None, 0, None)
    assert data_one["source"] == "import"
    assert {d.name for d in job.input_dir.iterdir()} == set(one["series"])
    # same filesystem: hard links, not copies
    stored = next(job.input_dir.rglob("*.dcm"))
    assert os.stat(stored).st_nlink == 2
    assert [e["event"] for e in job.events()] == ["received"]
    assert not [p for p in (spool / "tmp").iterdir() if p.name != ".run"]


def test_import_refuses_invalid_uids_clearly_and_keeps_the_rest(tmp_path: Path) -> None:
    config = write_station_config(tmp_path, 11112)
    good = make_instance(tmp_path / "in" / "good.dcm", study_uid=generate_uid(),
                         series_uid=generate_uid())
    make_instance(tmp_path / "in" / "bad.dcm", study_uid="1.2;touch /tmp/p",
                  series_uid=generate_uid())
    result = CliRunner().invoke(cli, ["--config", str(config), "import", "--json",
                                      str(good.parent)])
    assert result.exit_code == 1, result.output
    assert "refused" in result.stderr and "bad.dcm" in result.stderr
    assert "Study Instance UID '1.2;touch /tmp/p' is not a valid UID" in result.stderr
    out = json.loads(result.stdout)
    assert len(out["jobs"]) == 1 and out["jobs"][0]["instances"] == 1
    assert [s["refused"] for s in out["skipped"]] == [True]
    assert not list((tmp_path / "spool" / "incoming").iterdir())


def test_import_missing_path_is_a_usage_error(tmp_path: Path) -> None:
    config = write_station_config(tmp_path, 11112)
    done = run_dts("import", str(tmp_path / "nope"), config=config)
    assert done.returncode == 2 and "no such file" in done.stderr
