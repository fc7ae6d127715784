"""``dts config import-legacy``: the predecessor's three files (../shared/seed-config)
translated into a station that loads and does what the old one did, the report, the
exit codes, bad input; and end to end: the imported station receives a study with dcmtk
storescu, runs the seed's model image in the ror contract, the result reaches Orthanc and
its value is a ``dts_results`` row in PostgreSQL."""

from __future__ import annotations

import base64
import json
import shutil
import signal
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from pydicom import dcmread
from pydicom.uid import generate_uid

from dts import legacy
from dts.journal import EventFilter, read_events
from dts.spool import Queue, Spool
from tests.helpers import (
    REPO,
    STORESCU,
    free_port,
    make_instance,
    run_dts,
    start_dts,
    stop_process,
    wait_for,
)
from tests.plugins.database import PostgresServer
from tests.plugins.engine import Engine
from tests.plugins.peers import Orthanc
from tests.rormodel import build_ror_image

SEED = REPO.parent / "shared" / "seed-config"
SELECT = json.loads((SEED / "select_statements.json").read_text())["AIcore"]["select"]


@pytest.fixture
def seed(tmp_path: Path) -> Path:
    """A copy of the seed configuration the test may change."""
    folder = tmp_path / "legacy"
    shutil.copytree(SEED, folder)
    return folder


def _import(src: Path, out: Path, *args: str) -> Any:
    return run_dts("config", "import-legacy", str(src), "--out", str(out), *args)


def test_seed_config_imports_into_a_station_that_loads(tmp_path: Path) -> None:
    out = tmp_path / "etc"
    proc = _import(SEED, out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = proc.stdout
    for line in ("config.json: timeout  ->  station.stable_seconds",
                 "config.json: Streams[0].trigger.AETitleCalled  ->  stream.AIcore.called_ae",
                 "select_statements.json: AIcore.select  ->  stream.AIcore.ror_select",
                 "select_statements.json: AIcore.ROR_CONT_OPTIONS  ->  stream.AIcore.parameters",
                 "config.json: Streams[0].destination[0]  ->  destination.dicom_qr_scp",
                 "config.json: logging[0]  ->  journal.url",
                 "classifyRules.json  ->  station.classify_rules"):
        assert line in report, report
    assert "DECIDE" not in report
    # every exec step of the old plumbing is accounted for, with its reason
    for step, why in ((1, "done by dts itself"), (2, "done by dts itself"),
                      (4, "done by dts itself"), (6, "done by dts itself"),
                      (7, "done by dts itself"), (0, "not carried over")):
        [entry] = [ln for ln in report.splitlines()
                   if ln.startswith(f"config.json: Streams[0].trigger-study[{step}]")]
        note = report.splitlines()[report.splitlines().index(entry) + 1]
        assert why in note, (step, note)
    assert "call string: 'python /app/segm.py /data'" in report
    assert (out / "classifyRules.json").read_bytes() == (SEED / "classifyRules.json").read_bytes()
    check = run_dts("config", "check", str(out / "dts.toml"))
    assert check.returncode == 0, check.stderr
    # the effective configuration (contract, call, typed parameters, filter) loads again
    shown = run_dts("--config", str(out / "dts.toml"), "config", "show", check=True).stdout
    (out / "shown.toml").write_text(shown)
    assert run_dts("config", "check", str(out / "shown.toml")).returncode == 0
    again_shown = tomllib.loads(shown)
    assert again_shown["stream"][0]["parameters"]["-b"] == 0.95
    assert again_shown["destination"][0]["filter"] == {"SeriesDescription": "*"}
    toml = tomllib.loads((out / "dts.toml").read_text())
    assert toml["station"]["stable_seconds"] == 16
    [dest] = toml["destination"]
    assert dest == {"name": "dicom_qr_scp", "ae_title": "DICOM_QR_SCP",
                    "host": "sectradcmimport.ihelse.net", "port": 7280,
                    "filter": {"SeriesDescription": "*"}}
    [stream] = toml["stream"]
    assert stream == {
        "name": "AIcore", "called_ae": "^AICORE1$", "calling_ae": ".*", "ror_select": SELECT,
        "image": "segm_ec_vibe:latest", "contract": "ror",
        "parameters": {"--z-score-mean": 20, "--z-score-std": 55, "-b": 0.95},
        "call": "python /app/segm.py /data", "destinations": ["dicom_qr_scp"]}
    # --json for scripts; the files exist now: refused without --force, replaced with it
    again = _import(SEED, out, "--json")
    assert again.returncode == 2 and "exists already; give --force" in again.stderr
    forced = _import(SEED, out, "--json", "--force")
    assert forced.returncode == 0, forced.stderr
    data = json.loads(forced.stdout)
    assert data["exit_code"] == 0 and data["decisions"] == []
    assert sorted(Path(p).name for p in data["written"]) == ["classifyRules.json", "dts.toml"]
    assert {"legacy": "config.json: arrived", "dts": "", "decide": False} .items() <= \
        next(e for e in data["entries"] if e["legacy"] == "config.json: arrived").items()


@pytest.mark.parametrize("file,change,where", [
    ("config.json", lambda t: t.replace('"timeout": 16,', '"timeout": 16, // seconds'),
     "config.json: line 5, column 20: a comment (after key 'timeout'): JSON has no comments"),
    ("config.json", lambda t: t.replace('"AETitleCaller": ".*"', '"AETitleCaller": ".*",'),
     "config.json: line 17, column 38: a trailing comma (after key 'AETitleCaller')"),
    ("config.json", lambda t: t.replace('"^AICORE1$"', "5"),
     "config.json: line 16: Streams[0].trigger.AETitleCalled: expected a string, got 5"),
    ("config.json", lambda t: t.replace('"7280"', '"http"'),
     "config.json: line 23: Streams[0].destination[0].PORT: not a port number: 'http'"),
    ("config.json", lambda t: t.replace('"timeout": 16', '"timeout": "16s"'),
     "config.json: line 5: timeout: expected a number, got \"16s\""),
    ("select_statements.json", lambda t: t.replace('"{\\"--z-score-mean', '"[{\\"--z-score-mean')
     .replace('0.95}"', '0.95}]"'),
     "select_statements.json: line 4: AIcore.ROR_CONT_OPTIONS: expected a JSON object"),
    ("select_statements.json", lambda t: t.replace('"docker_image": "segm_ec_vibe:latest"',
                                                   '"docker_image": ["segm_ec_vibe"]'),
     "select_statements.json: line 5: AIcore.docker_image: expected a string"),
])
def test_unreadable_legacy_input_exits_2_naming_file_line_and_key(
        tmp_path: Path, seed: Path, file: str, change: Any, where: str) -> None:
    path = seed / file
    changed = change(path.read_text())
    assert changed != path.read_text()
    path.write_text(changed)
    out = tmp_path / "out"
    proc = _import(seed, out)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert where in proc.stderr, proc.stderr
    assert not out.exists()  # nothing written


def test_missing_config_json_exits_2(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    proc = _import(tmp_path / "empty", tmp_path / "out")
    assert proc.returncode == 2 and "config.json: no such file" in proc.stderr


def test_untranslatable_select_statement_is_reported_and_the_stream_disabled(
        tmp_path: Path, seed: Path) -> None:
    sel = json.loads((seed / "select_statements.json").read_text())
    sel["AIcore"]["select"] = "SELECT series FROM study WHERE series named \"X\" has ((("
    (seed / "select_statements.json").write_text(json.dumps(sel))
    out = tmp_path / "out"
    proc = _import(seed, out, "--json")
    assert proc.returncode == 1, proc.stderr
    [decision] = json.loads(proc.stdout)["decisions"]
    assert decision["legacy"] == "select_statements.json: AIcore.select"
    assert "not a ror select statement" in decision["note"]
    assert run_dts("config", "check", str(out / "dts.toml")).returncode == 0
    text = (out / "dts.toml").read_text()
    [stream] = tomllib.loads(text)["stream"]
    assert stream["enabled"] is False and "ror_select" not in stream
    assert "# disabled by the import: ror_select is not usable: not a ror select" in text
    assert '# ror_select = "SELECT series FROM study WHERE series named \\"X\\" has ((("' in text


def test_stream_without_select_statement_is_written_disabled(tmp_path: Path,
                                                             seed: Path) -> None:
    sel = json.loads((seed / "select_statements.json").read_text())
    del sel["AIcore"]["select"]
    (seed / "select_statements.json").write_text(json.dumps(sel))
    proc = _import(seed, tmp_path / "out", "--json")
    assert proc.returncode == 1, proc.stderr
    [decision] = json.loads(proc.stdout)["decisions"]
    assert decision["legacy"] == "select_statements.json: AIcore"
    assert "no select statement" in decision["note"]
    [stream] = tomllib.loads((tmp_path / "out" / "dts.toml").read_text())["stream"]
    assert stream["enabled"] is False and stream["image"] == "segm_ec_vibe:latest"


def test_exec_action_beyond_the_plumbing_is_for_a_person_to_decide(tmp_path: Path,
                                                                   seed: Path) -> None:
    cfg = json.loads((seed / "config.json").read_text())
    cfg["Streams"][0]["trigger-study"].append(
        {"type": "exec", "cmd": ["/usr/local/bin/notify.sh", "@PATH@"]})
    cfg["Streams"][0]["trigger-series"] = [{"type": "exec", "cmd": ["echo", "series"]}]
    cfg["Streams"][0]["description"] = "VIBE\nsegmentation"  # a comment of one line
    (seed / "config.json").write_text(json.dumps(cfg, indent=2))
    proc = _import(seed, tmp_path / "out", "--json")
    assert proc.returncode == 1, proc.stderr
    decisions = {d["legacy"]: d for d in json.loads(proc.stdout)["decisions"]}
    notify = decisions["config.json: Streams[0].trigger-study[8] (/usr/local/bin/notify.sh "
                       "@PATH@)"]
    assert 'command = ["/usr/local/bin/notify.sh", "{input}"]' in notify["note"]
    assert decisions["config.json: Streams[0].trigger-series"]["dts"] == "stream.AIcore.per"
    assert run_dts("config", "check", str(tmp_path / "out" / "dts.toml")).returncode == 0
    assert "# VIBE segmentation\n" in (tmp_path / "out" / "dts.toml").read_text()
    text = _import(seed, tmp_path / "out", "--force")  # the readable report says it too
    assert text.returncode == 1
    assert "    DECIDE: an exec action that is not the old station's plumbing" in text.stdout
    assert "to decide: config.json: Streams[0].trigger-study[8]" in text.stderr


def test_translate_core_returns_entries_without_printing(capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    t = legacy.translate(SEED)
    assert t.exit_code == 0 and t.rules == SEED / "classifyRules.json"
    assert "ror_select = " in t.toml
    assert capsys.readouterr() == ("", "")


# -- end to end ---------------------------------------------------------------------------

def _series(folder: Path, study: str, patient: str, accession: str, number: int,
            protocol: str, agent: str, n: int = 2, modality: str = "MR") -> str:
    series = generate_uid()
    for i in range(n):
        sop = generate_uid()
        make_instance(folder / series / f"{sop}.dcm", study_uid=study, series_uid=series,
                      sop_uid=sop, patient_id=patient, accession=accession, modality=modality,
                      series_number=number, instance_number=i + 1, ProtocolName=protocol,
                      SeriesDescription=protocol, ContrastBolusAgent=agent,
                      sop_class="1.2.840.10008.5.1.4.1.1.4")
    return series


def _storescu(port: int, folder: Path, called: str) -> None:
    proc = subprocess.run([STORESCU, "-aet", "MODALITY", "-aec", called, "+sd", "+r",
                           "127.0.0.1", str(port), str(folder)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_seed_station_end_to_end(tmp_path: Path, engine: Engine, orthanc: Orthanc,
                                 postgres: PostgresServer) -> None:
    build_ror_image(engine, tmp_path)
    out = tmp_path / "etc"
    assert _import(SEED, out).returncode == 0
    # the AIcore study: two VIBE series whose protocols and contrast agent match, and two
    # unrelated series; a second study whose contrast agent does not match
    study, other = generate_uid(), generate_uid()
    vibe = tmp_path / "vibe"
    old = _series(vibe, study, "PAT-V", "ACC-V", 3, "fl3d_vibe_tra_ 2mm_2min", "Dotarem 10ml")
    new = _series(vibe, study, "PAT-V", "ACC-V", 5, "t1_vibe_dixon_tra_p2 FOV 250 _2min",
                  "Dotarem 10ml")
    _series(vibe, study, "PAT-V", "ACC-V", 1, "localizer", "")
    _series(vibe, study, "PAT-V", "ACC-V", 2, "t2_tse_tra", "Dotarem 10ml")
    none = tmp_path / "none"
    _series(none, other, "PAT-N", "ACC-N", 3, "fl3d_vibe_tra_ 2mm_2min", "Gadovist")
    _series(none, other, "PAT-N", "ACC-N", 5, "t1_vibe_dixon_tra_p2 FOV 250 _2min", "Gadovist")

    # what a site edits after the import: where the station listens, the PACS (here an
    # Orthanc), the journal database; and, for this test's model, the result it returns
    cfg = tomllib.loads((out / "dts.toml").read_text())
    port = free_port()
    cfg["station"].update(host="127.0.0.1", port=port, spool=str(tmp_path / "spool"),
                          stable_seconds=1, rescan_seconds=5, min_free_mb=0)
    cfg["destination"][0].update(ae_title=orthanc.aet, host="127.0.0.1", port=orthanc.port)
    result = make_instance(tmp_path / "result.dcm", study_uid=study, series_uid=generate_uid(),
                           patient_id="PAT-V", modality="OT", rows=4, cols=4,
                           SeriesDescription="AI segmentation")
    cfg["stream"][0]["parameters"]["payload"] = base64.b64encode(result.read_bytes()).decode()
    cfg["journal"] = {"url": postgres.create_database("legacy")}
    (out / "dts.toml").write_text(tomli_w.dumps(cfg))
    config = out / "dts.toml"

    proc = start_dts("watch", config=config, env=engine.env, log=tmp_path / "watch.log")
    spool = Spool(tmp_path / "spool")
    try:
        wait_for(lambda: proc.poll() is None and any(
            e["event"] == "receiver-started" for e in read_events(spool, EventFilter())),
            30, what="dts watch to listen")
        _storescu(port, vibe, "AICORE1")
        _storescu(port, none, "AICORE1")
        orthanc.wait_for_instances(1, timeout=90)

        def settled() -> bool:
            return len(spool.list(Queue.DONE)) >= 2 and \
                len(spool.list(Queue.UNMATCHED)) == 1
        wait_for(settled, 90, what="both studies classified and the run job done")
        rows = wait_for(lambda: postgres.query(
            "legacy", "select accession, stream, name, value, record_id from dts_results "
                      "order by id") if postgres.query(
            "legacy", "select to_regclass('dts_results') is not null")[0][0] == "t" else [],
            30, what="dts_results rows")
    finally:
        code = stop_process(proc, signal.SIGTERM)
    assert code == 0, (tmp_path / "watch.log").read_text()[-3000:]
    assert set(orthanc.sop_uids()) == {str(dcmread(result, stop_before_pixels=True).SOPInstanceUID)}
    assert rows == [["ACC-V", "AIcore", "tumor_size", "42.5", "PAT-V"],
                    ["ACC-V", "AIcore", "num_files", "4", "PAT-V"]]
    # the run job saw exactly the two VIBE series, under the select statement's names
    [run_job] = [j for j in spool.list(Queue.DONE) if j.endswith(".AIcore")]
    data = json.loads((spool.dir(Queue.DONE) / run_job / "job.json").read_text())
    assert data["selection"] == {"VIBEDIXON_OLD": [old], "VIBEDIXON_NEW": [new]}
    assert data["destinations"]["dicom_qr_scp"]["status"] == "done"
    [unmatched] = spool.list(Queue.UNMATCHED)
    assert json.loads((spool.dir(Queue.UNMATCHED) / unmatched / "job.json")
                      .read_text())["study_uid"] == other
