"""Configuration: the embedded default loads; every bad value is refused naming file and key."""

from __future__ import annotations

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


@pytest.mark.parametrize("value", ["soon", "-5s", -1, True, "5 parsecs", None])
def test_bad_durations(value: object) -> None:
    with pytest.raises(ValueError):
        config.parse_duration(value)


@pytest.mark.parametrize("body, key, reason", [
    ('port = 70000\n', "station.port", "port number"),
    ('ae_title = "THIS_AE_TITLE_IS_TOO_LONG"\n', "station.ae_title", "AE title"),
    ('stable_seconds = "soon"\n', "station.stable_seconds", "duration"),
    ('stabel_seconds = 3\n', "station.stabel_seconds", "unknown key"),
    ('allowed_hosts = ["not-an-address"]\n', "station.allowed_hosts", "not an IP"),
    ('check_called_ae = "yes"\n', "station.check_called_ae", "true/false"),
    ('max_parallel_runs = 0\n', "station.max_parallel_runs", "at least 1"),
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
