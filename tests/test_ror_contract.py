"""``contract = "ror"``: a model image of the predecessor runs as ``ror trigger`` ran it
(ror.go ``callProgram``/``copyFiles``), checked from inside the container with the real
engine; its ``output/output.json`` becomes job.json ``results``; the configuration keys."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid

from dts import config as config_mod
from dts import runner
from dts.errors import ConfigError
from dts.executors import ror_command
from dts.spool import Job, Queue, Spool, State
from dts.station import Station
from tests.helpers import make_instance, make_study, station_config
from tests.plugins.engine import Engine, make_run_job
from tests.rormodel import build_ror_image


@pytest.fixture(scope="module")
def ror_image(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_ror_image(engine, tmp_path_factory.mktemp("ror-image"))


def _payload(tmp_path: Path, study_uid: str, patient_id: str = "PAT001") -> str:
    path = make_instance(tmp_path / "payload" / "r.dcm", study_uid=study_uid,
                         series_uid=generate_uid(), modality="OT", rows=4, cols=4,
                         patient_id=patient_id)
    return base64.b64encode(path.read_bytes()).decode()


def _ror_job(tmp_path: Path) -> tuple[Job, dict[str, Any], list[str]]:
    study = make_study(tmp_path / "study", n_series=3, per_series=2, modality="MR",
                       SeriesDescription="t1/vibe", ProtocolName="fl3d_vibe")
    series = list(study["series"])
    path, _ = make_run_job(tmp_path / "spool", "segm", study=study,
                           selection={"VIBEDIXON_OLD": [series[0]],
                                      "VIBEDIXON_NEW": [series[2]]})
    doc = json.loads((path / "study.json").read_text())
    doc["series"][0]["ClassifyType"] = ["MR", "VIBE_OLD"]
    (path / "study.json").write_text(json.dumps(doc))
    return Job(path), study, series


def _config(tmp_path: Path, image: str, options: dict[str, Any], call: str) -> Path:
    return station_config(tmp_path, streams=[{
        "name": "segm", "image": image, "contract": "ror", "call": call,
        "parameters": options, "timeout": "2m"}])


def test_ror_layout_environment_and_results_seen_from_inside(
        tmp_path: Path, engine: Engine, docker_host: str, ror_image: str) -> None:
    job, study, series = _ror_job(tmp_path)
    options = {"--z-score-mean": 20, "--z-score-std": 55, "-b": 0.95, "mode": "ok",
               "payload": _payload(tmp_path, study["study_uid"])}
    call = 'python /app/segm.py {} "{input}" {descr} {output} {output_json}'
    config = _config(tmp_path, "segm_ec_vibe:latest", options, call)
    assert runner.serve(Station.open(config), once=True).done == [job.id]
    job = Job(tmp_path / "spool" / "send" / "new" / job.id)
    out = job.output_dir
    # the placeholders, as ror replaced them (output ones in the writable /output)
    assert (out / "argv.txt").read_text().split() == [
        "/data/", "/data/input", "/data/descr.json", "/output", "/output/output.json"]
    # ROR_CONT_OPTIONS: the options object as compact JSON, types kept
    assert (out / "options.txt").read_text() == json.dumps(options, separators=(",", ":"))
    assert json.loads((out / "options.txt").read_text())["-b"] == 0.95
    # the /data layout: input/<Modality>_<NNNNNN>.dcm numbered over the selection in
    # order, the sorted view of relative links, descr.json; nothing else (no task.json)
    series_dir = "input_view_dicom_series/PAT001_Doe^Jane/20261126_101500/1_t1_vibe"
    names = [f"MR_{i:06d}.dcm" for i in range(4)]
    layout = (out / "layout.txt").read_text().split()
    assert layout == sorted(["."] + ["./descr.json", "./input"] + [f"./input/{n}" for n in names]
                            + ["./input_view_dicom_series",
                               "./input_view_dicom_series/PAT001_Doe^Jane",
                               "./input_view_dicom_series/PAT001_Doe^Jane/20261126_101500",
                               "./" + series_dir,
                               "./" + series_dir.replace("1_t1_vibe", "3_t1_vibe")]
                           + [f"./{series_dir}/{n}" for n in names[:2]]
                           + [f"./{series_dir.replace('1_t1', '3_t1')}/{n}" for n in names[2:]])
    links = (out / "links.txt").read_text().splitlines()
    assert links[0] == f"{series_dir}/MR_000000.dcm -> ../../../../input/MR_000000.dcm"
    assert links[-1] == "links-readable"
    descr = json.loads((out / "descr-seen.json").read_text())
    assert [(d["NameFromSelect"], d["SeriesInstanceUID"], d["NumFiles"]) for d in descr] == [
        ("VIBEDIXON_OLD", series[0], 2), ("VIBEDIXON_NEW", series[2], 2)]
    assert descr[0]["ClassifyTypes"] == ["MR", "VIBE_OLD"] and descr[1]["ClassifyTypes"] == []
    assert descr[0]["InputViewDICOMSeriesPath"] == series_dir
    assert descr[0]["StudyInstanceUID"] == study["study_uid"]
    assert descr[0]["SeriesDescription"] == "t1/vibe" and descr[0]["Modality"] == "MR"
    assert descr[0]["ProcessDataPath"] == "/data"
    # every protection of dts still holds: /data read-only, no network
    assert (out / "ro.txt").read_text().strip() == "data-read-only"
    assert (out / "net.txt").read_text().split() == ["lo"]
    env = dict(line.split("=", 1) for line in (out / "env.txt").read_text().splitlines()
               if "=" in line)
    assert env["DTS_JOB"] == job.id and env["DTS_INPUT"] == "/data/input"
    assert "mode" not in env and "MODE" not in env  # options travel only as JSON
    # output.json -> results, one journal event each; the DICOM result validated
    data = job.read()
    assert data["run"]["contract"] == "ror"
    assert data["run"]["command"][:2] == ["python", "/app/segm.py"]
    assert [(r["name"], r["value"], r["record_id"], r["event_name"], r["key"])
            for r in data["results"]] == [
        ("tumor_size", "42.5", "PAT001", "baseline", "tumor"),
        ("num_files", 4, "PAT001", "baseline", "files")]
    assert "output.json" in data["other_files"] and len(data["outputs"]) == 1
    results = [e for e in job.events() if e["event"] == "result"]
    assert [e["result"]["name"] for e in results] == ["tumor_size", "num_files"]
    assert results[0]["message"] == "tumor_size = 42.5"
    assert results[0]["accession"] == "ACC001" and results[0]["stream"] == "segm"


def test_output_json_of_the_wrong_shape_fails_the_job_naming_the_record(
        tmp_path: Path, engine: Engine, docker_host: str, ror_image: str) -> None:
    job, study, _ = _ror_job(tmp_path)
    config = _config(tmp_path, ror_image, {"mode": "bad-json",
                                           "payload": _payload(tmp_path, study["study_uid"])},
                     "python /app/segm.py /data")
    assert runner.serve(Station.open(config), once=True).failed == [job.id]
    data = Job(tmp_path / "spool" / "failed" / job.id).read()
    assert data["failure"]["reason"] == "invalid-results"
    assert 'output.json: record "tumor": event_name, field_name, value missing' in data["error"]
    assert "results" not in data
    spool = Spool(tmp_path / "spool")
    assert spool.list(Queue.SEND, State.NEW) == []
    produced = tmp_path / "spool" / "produced"
    assert not produced.exists() or not list(produced.iterdir())  # nothing may leave


def test_ror_call_string_is_split_like_ror_does() -> None:
    assert ror_command('/bin/bash -c "/app/work.sh {}"') == ["/bin/bash", "-c",
                                                             "/app/work.sh /data/"]
    assert ror_command("/app/work.sh {input} {output}") == ["/app/work.sh", "/data/input",
                                                            "/output"]


@pytest.mark.parametrize("stream,key,reason", [
    ({"command": ["true"], "contract": "ror"}, "stream.s.contract", "give image"),
    ({"image": "x", "contract": "ror", "parameters": "[1, 2]"}, "stream.s.parameters",
     "must be a JSON object"),
    ({"image": "x", "contract": "ror", "parameters": "{nope"}, "stream.s.parameters",
     "not valid JSON"),
    ({"image": "x", "call": "run {}"}, "stream.s.call", 'contract = "ror"'),
    ({"image": "x", "contract": "ror", "call": 'run "unclosed'}, "stream.s.call",
     "not a usable call string"),
    ({"image": "x", "contract": "legacy"}, "stream.s.contract", "expected one of dts, ror"),
])
def test_ror_contract_configuration_is_checked_at_load(
        tmp_path: Path, stream: dict[str, Any], key: str, reason: str) -> None:
    path = station_config(tmp_path, streams=[{"name": "s", **stream}])
    with pytest.raises(ConfigError) as err:
        config_mod.load(path)
    assert err.value.key == key and reason in err.value.reason, str(err.value)


def test_ror_parameters_keep_their_types_and_show_again(tmp_path: Path) -> None:
    text = '{"--z-score-mean":20,"--z-score-std":55,"-b":0.95}'
    path = station_config(tmp_path, streams=[{"name": "s", "image": "x", "contract": "ror",
                                              "call": "python /app/segm.py /data",
                                              "parameters": text}])
    cfg = config_mod.load(path)
    [s] = cfg.streams
    assert s.options == {"--z-score-mean": 20, "--z-score-std": 55, "-b": 0.95}
    assert s.parameters == {}
    shown = config_mod.effective(cfg)["stream"][0]
    assert shown["parameters"] == s.options and shown["contract"] == "ror"
    assert "options" not in shown
