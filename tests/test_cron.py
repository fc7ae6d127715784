"""The operating files: crontab lines run for real, systemd units verified, logrotate run.

The files in cron/ and configuration/ name the installed paths (/opt/dts, /etc/dts,
/var/lib/dts); each test substitutes this checkout's and a test spool's, then executes
them with the real tools (sh, flock, systemd-analyze, logrotate).
"""

from __future__ import annotations

import fcntl
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from dts.journal import Journal, Stage, Status
from dts.spool import Queue, Spool, State
from tests import helpers
from tests.helpers import REPO, free_port, make_study, wait_for

DTS_BIN = Path(sys.executable).parent / "dts"
CRONTAB = REPO / "cron" / "dts.crontab"
SYSTEMD = REPO / "configuration" / "systemd"
LOGROTATE = REPO / "configuration" / "logrotate" / "dts"


def queue_study(spool: Spool, folder: Path, study: dict[str, Any], *,
                accession: str = "ACC001", calling_ae: str = "PACS") -> str:
    """A complete study in classify/new, as the receiver publishes it."""
    job = spool.create_tmp_job()
    for series_uid, sops in study["series"].items():
        (job.input_dir / series_uid).mkdir(parents=True)
        for sop in sops:
            os.link(folder / series_uid / f"{sop}.dcm", job.input_dir / series_uid / f"{sop}.dcm")
    job.write({"study_uid": study["study_uid"], "patient_id": "PAT001", "accession": accession,
               "calling_ae": calling_ae, "called_ae": "DTS", "peer": "127.0.0.1",
               "instances": sum(len(s) for s in study["series"].values()),
               "series": {k: len(v) for k, v in study["series"].items()},
               "source": "test", "stream": None, "attempts": 0, "error": None})
    Journal(spool).emit(Stage.RECEIVE, "received", Status.OK, "queued by the test", job=job)
    spool.publish(job, Queue.CLASSIFY)
    return job.id


def station_config(tmp_path: Path, *, port: int = 0, extra: str = "",
                   destinations: str = '["reports"]', stable: float = 1) -> Path:
    """A station with the example module as its stream and a folder destination."""
    return helpers.station_config(
        tmp_path, name="station.toml",
        station={"ae_title": "DTS", "host": "127.0.0.1", "port": port, "stable_seconds": stable,
                 "rescan_seconds": 2, "send_backoff": "1s"},
        station_text=extra,
        destinations=[{"name": "reports", "folder": str(tmp_path / "reports")}],
        streams=[{"name": "series-statistics",
                  "command": ["{python}", "-m", "dts.examples.series_statistics", "{input}",
                              "{output}"],
                  "parameters": {"threshold": "300"}, "timeout": "2m"}],
        stream_text=f"destinations = {destinations}")


# -- cron ---------------------------------------------------------------------------------

def parse_crontab(path: Path, user: str = "dts") -> tuple[dict[str, str], list[str]]:
    """Variables and the command part of every active /etc/cron.d-style line."""
    env: dict[str, str] = {}
    commands: list[str] = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)$", line)
        if m:
            env[m.group(1)] = m.group(2)
            continue
        fields = line.split(None, 6)
        assert len(fields) == 7, f"not a cron.d line (5 time fields, user, command): {raw}"
        assert fields[5] == user, raw
        commands.append(fields[6])
    return env, commands


def _cron_env(tmp_path: Path, config: Path, spool: Path) -> dict[str, str]:
    env, _ = parse_crontab(CRONTAB)
    assert {"DTS", "DTS_CONFIG", "DTS_SPOOL", "LOCKS"} <= set(env)
    env.update(DTS=str(DTS_BIN), DTS_CONFIG=str(config), DTS_SPOOL=str(spool),
               LOCKS=str(spool / "tmp" / ".run"), HOME=str(tmp_path),
               PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}")
    return env


def _cron_line(word: str) -> str:
    _, commands = parse_crontab(CRONTAB)
    found = [c for c in commands if f" {word}" in c]
    assert len(found) == 1, (word, commands)
    return found[0]


def test_crontab_pipeline_line_moves_a_study_through(tmp_path: Path) -> None:
    config = station_config(tmp_path)
    spool = Spool(tmp_path / "spool").ensure()
    study = make_study(tmp_path / "study", n_series=2, per_series=3)
    jid = queue_study(spool, tmp_path / "study", study)
    env = _cron_env(tmp_path, config, spool.root)
    line = _cron_line("classify --once")
    proc = subprocess.run(["/bin/sh", "-c", line], env=env, capture_output=True, text=True,
                          timeout=180, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""  # cron mails output: nothing when all went well
    # one cron tick: classified, run and sent
    assert spool.list(Queue.DONE) == sorted([jid, f"{jid}.series-statistics"])
    report = tmp_path / "reports" / f"{jid}.series-statistics"
    assert (report / "statistics.json").exists()
    events = [json.loads(x) for x in
              (spool.dir(Queue.DONE) / f"{jid}.series-statistics" / "events.jsonl")
              .read_text().splitlines()]
    assert {"classify", "run", "send"} <= {e["stage"] for e in events}


def test_crontab_stage_is_skipped_while_its_lock_is_held(tmp_path: Path) -> None:
    config = station_config(tmp_path)
    spool = Spool(tmp_path / "spool").ensure()
    study = make_study(tmp_path / "study", n_series=1, per_series=2)
    jid = queue_study(spool, tmp_path / "study", study)
    env = _cron_env(tmp_path, config, spool.root)
    # a classify from the previous minute still running
    fd = os.open(spool.run_dir / "cron-classify.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        proc = subprocess.run(["/bin/sh", "-c", _cron_line("classify --once")], env=env,
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)
    finally:
        os.close(fd)
    assert proc.returncode == 0, proc.stderr  # run and send still went (nothing to do)
    assert spool.list(Queue.CLASSIFY, State.NEW) == [jid]
    assert spool.list(Queue.DONE) == []


def test_crontab_clean_and_journal_lines(tmp_path: Path) -> None:
    config = station_config(tmp_path)
    spool = Spool(tmp_path / "spool").ensure()
    job = spool.create_tmp_job()
    job.write({"study_uid": "1.2.3"})
    spool.publish(job, Queue.DONE)
    old = time.time() - 8 * 86400
    for p in (job.path / "job.json", job.path):
        os.utime(p, (old, old))
    env = _cron_env(tmp_path, config, spool.root)
    proc = subprocess.run(["/bin/sh", "-c", _cron_line("clean --older-than")], env=env,
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert spool.list(Queue.DONE) == []
    # without [journal] url the journal line has nothing to do, and says nothing
    proc = subprocess.run(["/bin/sh", "-c", _cron_line("log --sync-db")], env=env,
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


# -- systemd --------------------------------------------------------------------------------

def _installed_units(tmp_path: Path) -> Path:
    """The units with this checkout's dts in place of /opt/dts/.venv/bin/dts."""
    out = tmp_path / "units"
    out.mkdir()
    for f in SYSTEMD.iterdir():
        text = f.read_text().replace("/opt/dts/.venv/bin/dts", str(DTS_BIN))
        (out / f.name).write_text(text)
    return out


def _sections(text: str) -> dict[str, dict[str, list[str]]]:
    out: dict[str, dict[str, list[str]]] = {}
    section = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            out[section] = {}
            continue
        key, _, value = line.partition("=")
        assert section is not None, line
        out[section].setdefault(key, []).append(value)
    return out


@pytest.mark.peers
def test_systemd_units_verify_and_name_real_commands(tmp_path: Path) -> None:
    units = _installed_units(tmp_path)
    names = sorted(p.name for p in units.iterdir())
    assert {"dts-watch.service", "dts-receive.service"} <= set(names)
    for timer in (n for n in names if n.endswith(".timer")):
        assert timer.replace(".timer", ".service") in names, timer
    watch = _sections((units / "dts-watch.service").read_text())["Service"]
    assert watch["Type"] == ["simple"] and watch["KillSignal"] == ["SIGTERM"]
    assert watch["Restart"] == ["on-failure"] and watch["ProtectSystem"] == ["strict"]
    for name in names:
        svc = _sections((units / name).read_text())
        if name.endswith(".service"):
            exec_start = svc["Service"]["ExecStart"][0].split()
            assert exec_start[0] == str(DTS_BIN)
            # the command line parses: `dts <args> --help` exits 0
            proc = subprocess.run([str(DTS_BIN), *exec_start[1:], "--help"], capture_output=True,
                                  text=True, timeout=60)
            assert proc.returncode == 0, (name, proc.stderr)
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return  # the structural checks above are all a machine without systemd can do
    proc = subprocess.run([analyze, "verify", "--man=no", *names], cwd=units,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    problems = [line for line in proc.stderr.splitlines()
                if "Unknown key" in line or "Failed to parse" in line or "not executable" in
                line or "Invalid" in line]
    assert problems == []


# -- logrotate ------------------------------------------------------------------------------

def _logrotate_conf(tmp_path: Path, spool: Path, config: Path) -> Path:
    text = LOGROTATE.read_text()
    text = text.replace("/var/lib/dts/spool", str(spool))
    text = text.replace("/opt/dts/.venv/bin/dts --config /etc/dts/dts.toml",
                        f"{DTS_BIN} --config {config}")
    user = "root" if os.geteuid() == 0 else os.environ.get("USER", "nobody")
    text = text.replace("su dts dts", f"su {user} {user}").replace("0750 dts dts",
                                                                   f"0750 {user} {user}")
    conf = tmp_path / "logrotate.conf"
    conf.write_text(text)
    return conf


def _day_files(spool: Spool) -> dict[str, Path]:
    days = {"old": "2026-01-10", "yesterday": "2026-01-14", "today": "2026-01-15"}
    files = {}
    for which, day in days.items():
        path = spool.log_dir / f"{day}.jsonl"
        path.write_text(json.dumps({"time": f"{day}T10:00:00.000000Z", "stage": "watch",
                                    "event": which, "status": "info", "message": which}) + "\n")
        files[which] = path
    now = time.time()
    os.utime(files["old"], (now - 5 * 86400, now - 5 * 86400))
    os.utime(files["yesterday"], (now - 86400, now - 86400))
    return files


def _run_logrotate(conf: Path, state: Path, files: dict[str, Path]) -> subprocess.CompletedProcess:
    # a state file that says every journal file was last looked at long ago
    state.write_text("logrotate state -- version 2\n" +
                     "".join(f'"{p}" 2026-1-1-0:0:0\n' for p in files.values()))
    return subprocess.run(["/usr/sbin/logrotate", "-s", str(state), str(conf)],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.peers
def test_logrotate_archives_only_finished_days(tmp_path: Path) -> None:
    config = station_config(tmp_path)
    spool = Spool(tmp_path / "spool").ensure()
    files = _day_files(spool)
    proc = _run_logrotate(_logrotate_conf(tmp_path, spool.root, config), tmp_path / "state",
                          files)
    assert proc.returncode == 0, proc.stderr
    assert not files["old"].exists()
    assert files["yesterday"].exists() and files["today"].exists()
    archived = spool.log_dir / "archive" / f"{files['old'].name}.1.gz"
    assert json.loads(gzip.decompress(archived.read_bytes()))["event"] == "old"


def test_logrotate_waits_while_the_journal_database_is_down(tmp_path: Path) -> None:
    down = f"postgresql://dts@127.0.0.1:{free_port()}/dts"  # nobody listens there
    config = station_config(tmp_path)
    config.write_text(config.read_text() + f'\n[journal]\nurl = "{down}"\n')
    spool = Spool(tmp_path / "spool").ensure()
    files = _day_files(spool)
    proc = _run_logrotate(_logrotate_conf(tmp_path, spool.root, config), tmp_path / "state",
                          files)
    assert proc.returncode != 0  # the prerotate shipping failed: nothing moves
    assert all(p.exists() for p in files.values())
    assert not list((spool.log_dir / "archive").glob("*.gz"))


@pytest.fixture(autouse=True)
def _tools() -> None:
    for tool in ("/usr/bin/flock", "/usr/sbin/logrotate"):
        assert os.path.exists(tool), f"{tool} is missing: make system-deps installs it"
    wait_for(lambda: DTS_BIN.exists(), 1, what="the dts entry point of the venv")


# -- bin/dts-install -----------------------------------------------------------------------

@pytest.mark.peers
def test_dts_install_fills_in_this_hosts_paths(tmp_path: Path) -> None:
    import pwd

    user = pwd.getpwuid(os.getuid()).pw_name
    root, spool_dir = tmp_path / "root", tmp_path / "srv" / "spool"
    proc = subprocess.run([str(REPO / "bin" / "dts-install"), "--root", str(root), "--user", user,
                           "--config", "/etc/dts/dts.toml", "--spool", str(spool_dir), "--cron"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "systemctl" in proc.stderr
    units = root / "etc" / "systemd" / "system"
    assert sorted(p.name for p in units.iterdir()) == sorted(p.name for p in SYSTEMD.iterdir())
    watch = _sections((units / "dts-watch.service").read_text())["Service"]
    assert watch["ExecStart"][0].startswith(f"{REPO}/.venv/bin/dts watch")
    assert watch["User"] == [user] and watch["ReadWritePaths"] == [str(spool_dir.parent)]
    assert f"DTS_SPOOL={spool_dir}" in watch["Environment"]
    analyze = shutil.which("systemd-analyze")
    if analyze is not None:
        names = sorted(p.name for p in units.iterdir())
        check = subprocess.run([analyze, "verify", "--man=no", *names], cwd=units,
                               capture_output=True, text=True, timeout=120)
        assert check.returncode == 0 and "Unknown key" not in check.stderr, check.stderr
    assert f"{spool_dir}/log/*.jsonl" in (root / "etc" / "logrotate.d" / "dts").read_text()
    # the configuration it wrote loads, with the spool given
    config = root / "etc" / "dts" / "dts.toml"
    st = json.loads(subprocess.run([str(DTS_BIN), "--config", str(config), "status", "--json"],
                                   capture_output=True, text=True, timeout=60, check=True).stdout)
    assert st["spool"] == str(spool_dir)
    # and its cron line moves a study through (only the configuration's place differs)
    env, commands = parse_crontab(root / "etc" / "cron.d" / "dts", user)
    env.update(DTS_CONFIG=str(config), HOME=str(tmp_path))
    spool = Spool(spool_dir).ensure()
    study = make_study(tmp_path / "study", n_series=1, per_series=2)
    jid = queue_study(spool, tmp_path / "study", study)
    line = next(c for c in commands if "classify --once" in c)
    run = subprocess.run(["/bin/sh", "-c", line], env=env, capture_output=True, text=True,
                         timeout=180)
    assert run.returncode == 0, run.stderr
    assert f"{jid}.series-statistics" in spool.list(Queue.DONE)
