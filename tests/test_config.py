"""Configuration: the embedded default loads; every bad value is refused naming file and key."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dts import config
from dts.errors import ConfigError
from tests.helpers import run_dts

RULES = Path(__file__).resolve().parent.parent / "configuration" / "classifyRules.json"


def _write(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "dts.toml"
    p.write_text(f'[station]\nclassify_rules = "{RULES}"\n' + body)
    return p


def test_embedded_default_loads() -> None:
    cfg = config.load()
    assert cfg.station.ae_title == "DTS"
    assert cfg.station.port == 11112
    assert cfg.station.spool.name == "spool"
    assert cfg.station.spool.parent == config.PACKAGE_ROOT
    assert cfg.streams, "the default configuration ships a stream"


@pytest.mark.parametrize("value, seconds", [
    (90, 90.0), (2.5, 2.5), ("90s", 90.0), ("30m", 1800.0), ("7d", 604800.0), ("2h", 7200.0),
    ("250ms", 0.25),
])
def test_durations(value: object, seconds: float) -> None:
    assert config.parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["soon", "-5s", -1, True, "5 parsecs", None,
                                   float("nan"), float("inf"), float("-inf"), "nan", "inf",
                                   3.2e8, "3653d", "522w", 2**63 - 1])
def test_bad_durations(value: object) -> None:
    with pytest.raises(ValueError):
        config.parse_duration(value)


def test_ten_years_is_the_longest_duration() -> None:
    assert config.parse_duration("3652d") == 3652 * 86400.0
    assert config.parse_duration(config.MAX_DURATION) == config.MAX_DURATION


STATION_DURATIONS = ["stable_seconds", "dimse_timeout", "network_timeout", "send_backoff",
                     "send_backoff_max", "rescan_seconds", "retention", "review_alert_after"]


def test_every_station_duration_key_is_listed() -> None:
    floats = {f.name for f in dataclasses.fields(config.StationConfig)
              if "float" in str(f.type)}
    assert floats == set(STATION_DURATIONS)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e12", '"4000d"'])
@pytest.mark.parametrize("key", STATION_DURATIONS + ["stream.timeout", "stream.cpus"])
def test_nan_infinite_and_absurd_numbers_are_refused(tmp_path: Path, key: str,
                                                     value: str) -> None:
    """TOML allows nan and inf, and nan passes every `< 0` check: each is refused at load."""
    if key.startswith("stream."):
        if key == "stream.cpus" and value in ("1e12", '"4000d"'):
            return  # a number of CPUs has no ceiling here, and a string is refused anyway
        name = key.split(".")[1]
        body = f'[[stream]]\nname = "a"\ncommand = ["true"]\n{name} = {value}\n'
        where = f"stream.a.{name}"
    else:
        body, where = f"{key} = {value}\n", f"station.{key}"
    path = _write(tmp_path, body)
    with pytest.raises(ConfigError) as err:
        config.load(path)
    assert (err.value.file, err.value.key) == (str(path), where), err.value.reason
    assert value.strip('"') in err.value.reason or "ten years" in err.value.reason


@pytest.mark.parametrize("body, key, reason", [
    ('port = 70000\n', "station.port", "port number"),
    ('ae_title = "THIS_AE_TITLE_IS_TOO_LONG"\n', "station.ae_title", "AE title"),
    ('stable_seconds = "soon"\n', "station.stable_seconds", "duration"),
    ('stabel_seconds = 3\n', "station.stabel_seconds", "unknown key"),
    ('allowed_hosts = ["not-an-address"]\n', "station.allowed_hosts", "not an IP"),
    ('check_called_ae = "yes"\n', "station.check_called_ae", "true/false"),
    ('max_parallel_runs = 0\n', "station.max_parallel_runs", "at least 1"),
    ('max_parallel_sends = 0\n', "station.max_parallel_sends", "at least 1"),
    ('receive_workers = -2\n', "station.receive_workers", "non-negative integer"),
    ('receive_workers = "all"\n', "station.receive_workers", "non-negative integer"),
    ('[[stream]]\nname = "a"\ncommand = ["true"]\nwhen = "series[?"\n', "stream.a.when",
     "jmespath syntax error"),
    ('[[stream]]\nname = "a"\ncommand = ["true"]\nselect.x = "length("\n', "stream.a.select.x",
     "jmespath"),
    ('[[stream]]\nname = "a"\ncommand = ["true"]\ncalled_ae = "(["\n', "stream.a.called_ae",
     "regular expression"),
    ('[[stream]]\nname = "a"\n', "stream.a", "exactly one of image or command"),
    ('[[stream]]\nname = "a"\ncommand = ["true"]\ndestinations = ["nowhere"]\n',
     "stream.a.destinations", "unknown destination 'nowhere'"),
    ('[[destination]]\nname = "pacs"\nae_title = "PACS"\n', "destination.pacs",
     "needs ae_title, host and port"),
    ('[[stream]]\nname = "a"\ncommand = ["true"]\nmemory = "lots"\n', "stream.a.memory",
     "memory size"),
    ('[[stream]]\nname = "a"\ncommand = ["true"]\nparameters = { "bad-name" = 1 }\n',
     "stream.a.parameters", "environment variable"),
])
def test_bad_values_name_file_key_reason(tmp_path: Path, body: str, key: str,
                                         reason: str) -> None:
    path = _write(tmp_path, body)
    with pytest.raises(ConfigError) as err:
        config.load(path)
    assert err.value.file == str(path)
    assert err.value.key == key
    assert reason in err.value.reason


def test_not_toml(tmp_path: Path) -> None:
    p = tmp_path / "dts.toml"
    p.write_text("[station\nport = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(p)


def test_cli_refuses_bad_config_with_exit_2(tmp_path: Path) -> None:
    path = _write(tmp_path, 'port = "eleven"\n')
    proc = run_dts("status", config=path, spool=tmp_path / "spool")
    assert proc.returncode == 2
    assert f"{path}: station.port" in proc.stderr
    assert proc.stdout == ""


def test_environment_selects_config_and_spool(tmp_path: Path) -> None:
    path = _write(tmp_path, 'ae_title = "ENVSTATION"\n')
    spool = tmp_path / "elsewhere"
    proc = run_dts("status", "--json", env={"DTS_CONFIG": str(path), "DTS_SPOOL": str(spool)})
    assert proc.returncode == 0, proc.stderr
    assert (spool / "classify" / "new").is_dir()
    assert f'"spool": "{spool}"' in proc.stdout


def test_relative_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    p = tmp_path / "etc" / "dts.toml"
    p.write_text(f'[station]\nspool = "../var/spool"\nclassify_rules = "{RULES}"\n'
                 '[[destination]]\nname = "out"\nfolder = "reports"\n')
    cfg = config.load(p)
    assert cfg.station.spool == tmp_path / "var" / "spool"
    assert cfg.destinations["out"].folder == tmp_path / "etc" / "reports"


# -- the embedded default as package data ---------------------------------------------------

@pytest.mark.parametrize("name", ["dts.toml", "classifyRules.json"])
def test_packaged_copy_is_the_checkout_copy(name: str) -> None:
    """configuration/ is the copy users edit in a checkout; dts/data/ ships in the wheel.
    Edit configuration/<name>, then copy it to dts/data/<name>."""
    checkout = config.PACKAGE_ROOT / "configuration" / name
    packaged = config.PACKAGED_CONFIG.parent / name
    assert packaged.read_bytes() == checkout.read_bytes(), f"{packaged} differs from {checkout}"


def test_packaged_default_keeps_its_spool_outside_the_package(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(config, "CHECKOUT_CONFIG", tmp_path / "no-checkout" / "dts.toml")
    monkeypatch.setattr(config.os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    cfg = config.load()
    assert cfg.path == config.PACKAGED_CONFIG
    assert cfg.station.spool == tmp_path / "state" / "dts" / "spool"
    assert cfg.destinations["reports"].folder == tmp_path / "state" / "dts" / "spool" / "reports"
    assert cfg.station.classify_rules == config.PACKAGED_CONFIG.parent / "classifyRules.json"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert config.default_spool() == tmp_path / "home" / ".local" / "state" / "dts" / "spool"
    monkeypatch.setattr(config.os, "geteuid", lambda: 0)
    assert config.default_spool() == Path("/var/spool/dts")
    # --spool wins over the default
    assert config.load(spool=tmp_path / "mine").station.spool == tmp_path / "mine"


def test_rule_file_beside_the_configuration_else_the_shipped_one(tmp_path: Path) -> None:
    path = tmp_path / "dts.toml"
    path.write_text(f'[station]\nspool = "{tmp_path / "spool"}"\n')
    assert config.load(path).station.classify_rules == \
        config.PACKAGED_CONFIG.parent / "classifyRules.json"
    (tmp_path / "classifyRules.json").write_text("[]")
    assert config.load(path).station.classify_rules == tmp_path / "classifyRules.json"
    named = tmp_path / "named.toml"
    named.write_text('[station]\nclassify_rules = "missing.json"\n')
    with pytest.raises(ConfigError) as err:  # a file named but missing is an error
        config.load(named)
    assert err.value.key == "station.classify_rules" and "no such file" in err.value.reason


def test_folder_in_the_spool_follows_the_spool(tmp_path: Path) -> None:
    path = _write(tmp_path, f'spool = "{tmp_path / "a"}"\n'
                  '[[destination]]\nname = "out"\nfolder = "{spool}/results"\n')
    assert config.load(path).destinations["out"].folder == tmp_path / "a" / "results"
    moved = config.load(path, spool=tmp_path / "b")
    assert moved.station.spool == tmp_path / "b"
    assert moved.destinations["out"].folder == tmp_path / "b" / "results"
    bad = _write(tmp_path, '[[destination]]\nname = "out"\nfolder = "/x/{spool}"\n')
    with pytest.raises(ConfigError) as err:
        config.load(bad)
    assert err.value.key == "destination.out.folder" and "{spool}" in err.value.reason


# -- dts config check / show ------------------------------------------------------------------

def test_config_check_ok_and_broken(tmp_path: Path) -> None:
    ok = run_dts("config", "check")
    assert ok.returncode == 0, ok.stderr
    assert "configuration/dts.toml: ok" in ok.stdout
    broken = _write(tmp_path, 'stable_seconds = "soon"\n')
    proc = run_dts("config", "check", str(broken))
    assert proc.returncode == 2
    assert f"{broken}: station.stable_seconds" in proc.stderr and "duration" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "spool").exists(), "a check creates nothing"
    missing = run_dts("config", "check", str(tmp_path / "nope.toml"))
    assert missing.returncode == 2 and "no such file" in missing.stderr


def test_config_show_masks_secrets_and_loads_again(tmp_path: Path) -> None:
    path = _write(tmp_path, f'spool = "{tmp_path / "spool"}"\n'
                  '[[stream]]\nname = "s"\ncommand = ["true"]\n'
                  'parameters = { api_token = "tok-123", level = "7" }\n'
                  '[journal]\nurl = "postgresql://user:s3cr3t-pw@db.example/dts"\n')
    as_json = run_dts("config", "show", "--json", config=path)
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert data["journal"]["url"] == "postgresql://user:***@db.example/dts"
    assert data["stream"][0]["parameters"] == {"api_token": "***", "level": "7"}
    assert data["station"]["max_attempts"] == 3, "defaults are filled in"
    assert "s3cr3t-pw" not in as_json.stdout and "tok-123" not in as_json.stdout
    as_toml = run_dts("config", "show", config=path)
    assert as_toml.returncode == 0, as_toml.stderr
    assert "s3cr3t-pw" not in as_toml.stdout and "tok-123" not in as_toml.stdout
    again = tmp_path / "effective.toml"
    again.write_text(as_toml.stdout)
    reloaded = config.load(again)
    assert config.effective(reloaded) == data


@pytest.mark.slow
def test_wheel_install_runs_without_a_configuration(tmp_path: Path) -> None:
    """pip install of the built wheel into a fresh venv; in an empty folder `dts status`
    and `dts config check` work with the embedded configuration."""
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                            str(wheels), str(config.PACKAGE_ROOT)],
                           capture_output=True, text=True, timeout=300, check=False)
    assert build.returncode == 0, build.stderr
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    # dts from the wheel; its dependencies from this test's environment (no download).
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "deps.pth").write_text("\n".join(p for p in sys.path if p.endswith("site-packages")))
    wheel = next(wheels.glob("dts-*.whl"))
    install = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-deps",
                              "--no-index", str(wheel)],
                             capture_output=True, text=True, timeout=300, check=False)
    assert install.returncode == 0, install.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path / "home"),
           "XDG_STATE_HOME": str(tmp_path / "state")}
    python = str(venv / "bin" / "python")
    where = subprocess.run([python, "-c", "import dts, sys; print(dts.__file__)"], cwd=empty,
                           env=env, capture_output=True, text=True, timeout=60, check=True)
    assert str(site) in where.stdout, "the wheel's dts is the one imported"
    expected = ("/var/spool/dts" if os.geteuid() == 0
                else str(tmp_path / "state" / "dts" / "spool"))
    created = not Path(expected).exists()
    try:
        status = subprocess.run([python, "-m", "dts", "status", "--json"], cwd=empty, env=env,
                                capture_output=True, text=True, timeout=60, check=False)
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["spool"] == expected
        check = subprocess.run([python, "-m", "dts", "config", "check"], cwd=empty, env=env,
                               capture_output=True, text=True, timeout=60, check=False)
        assert check.returncode == 0, check.stderr
        assert f"{site}/dts/data/dts.toml: ok" in check.stdout
        broken = tmp_path / "broken.toml"
        broken.write_text('[station]\nmax_attempts = "many"\n')
        refused = subprocess.run([python, "-m", "dts", "config", "check", str(broken)],
                                 cwd=empty, env=env, capture_output=True, text=True,
                                 timeout=60, check=False)
        assert refused.returncode == 2 and "station.max_attempts" in refused.stderr
        secret = tmp_path / "secret.toml"
        secret.write_text('[journal]\nurl = "postgresql://user:s3cr3t-pw@host/db"\n')
        shown = subprocess.run([python, "-m", "dts", "--config", str(secret), "config", "show",
                                "--json"], cwd=empty, env=env, capture_output=True, text=True,
                               timeout=60, check=False)
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["journal"]["url"] == "postgresql://user:***@host/db"
        assert list(empty.iterdir()) == []
    finally:
        if created and expected == "/var/spool/dts":
            shutil.rmtree(expected, ignore_errors=True)
