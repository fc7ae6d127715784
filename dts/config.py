"""Owns the station's configuration: ``dts.toml`` parsed once into typed values.

Every value is checked where it enters; a bad one raises ``ConfigError`` naming
the file, the key and the reason, so a station never starts half-configured.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import math
import os
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import jmespath
import jmespath.exceptions

from . import rules
from .errors import ConfigError

# A checkout: the package's parent holds configuration/ (the copy users edit) and spool/.
PACKAGE_ROOT = Path(__file__).resolve().parent.parent
# The embedded default as shipped inside the package (identical to configuration/'s copy).
PACKAGED_CONFIG = Path(__file__).resolve().parent / "data" / "dts.toml"
CHECKOUT_CONFIG = PACKAGE_ROOT / "configuration" / "dts.toml"
SPOOL_PLACEHOLDER = "{spool}"

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w|y)?\s*$")
# "y": a year of 365.25 days (the ten years of MAX_DURATION are counted the same way)
_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0,
          "y": 365.25 * 86400.0}
_MEMORY = re.compile(r"^\d+(\.\d+)?[bkmgBKMG]?$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# The longest duration any key or option takes: ten years (of 365.25 days). Longer is a
# typo (or TOML's inf), and would overflow the timedelta and datetime arithmetic later.
MAX_DURATION = 10 * 365.25 * 86400.0


def parse_duration(value: object) -> float:
    """Seconds from ``90``, ``2.5``, ``"90s"``, ``"30m"``, ``"7d"``, ``"5y"``; ValueError
    otherwise, also for NaN, infinity and anything longer than ``MAX_DURATION`` (ten years)."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    seconds: float | None = None
    if isinstance(value, (int, float)):
        if not math.isfinite(value):  # TOML has nan and inf; nan passes every comparison
            raise ValueError(f"not a duration: {value!r}")
        if value < 0:
            raise ValueError(f"negative duration: {value!r}")
        seconds = float(value)
    elif isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if seconds is None:
        raise ValueError(f"not a duration (seconds, or a number with ms/s/m/h/d/w/y): {value!r}")
    if not seconds <= MAX_DURATION:
        raise ValueError(f"longer than ten years: {value!r}")
    return seconds


def valid_ae_title(value: str) -> bool:
    """DICOM AE title: 1-16 characters of the default repertoire, no backslash, not blank."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= 16
        and value.strip() != ""
        and "\\" not in value
        and all(32 <= ord(c) < 127 for c in value)
    )


@dataclass(frozen=True)
class TLS:
    certificate: Path
    private_key: Path
    ca_certificates: Path | None = None
    require_client_certificate: bool = False


@dataclass(frozen=True)
class ClientTLS:
    """TLS towards a DICOM destination: whom to trust, and who we are."""

    ca_certificates: Path | None = None  # None: the system's trusted certificates
    certificate: Path | None = None      # with private_key: our client certificate
    private_key: Path | None = None
    verify_peer: bool = True             # false: encrypted, but the peer is not checked
    server_name: str | None = None       # the name its certificate must carry (default: host)


@dataclass(frozen=True)
class StationConfig:
    ae_title: str = "DTS"
    host: str = "0.0.0.0"
    port: int = 11112
    spool: Path = Path("spool")
    stable_seconds: float = 5.0
    check_called_ae: bool = False
    allowed_calling_ae: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    min_free_mb: int = 1024
    max_parallel_runs: int = 1
    # jobs dts watch sends at once (one slow destination must not hold up the others)
    max_parallel_sends: int = 4
    classify_rules: Path = Path("classifyRules.json")
    # The receiver's advertised and accepted maximum PDU length (dts.dicom.wire.DEFAULT_MAX_PDU;
    # 0: unlimited, see docs/architecture.md, "Bounded memory")
    max_pdu: int = 1048576
    max_associations: int = 16
    # worker processes serving the port (dts.receivepool); 0: one per core
    receive_workers: int = 0
    # Connections that have not sent an A-ASSOCIATE-RQ yet: a budget of their own, per peer
    # address and in total, the oldest closed first (docs/architecture.md, "No lock-out")
    max_pending_connections: int = 64
    max_pending_per_host: int = 8
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    max_attempts: int = 3
    send_retries: int = 5
    send_backoff: float = 30.0
    send_backoff_max: float = 3600.0
    rescan_seconds: float = 30.0
    retention: float | None = None
    clean_below_free_mb: int = 0
    tls: TLS | None = None
    # dts status --check: results waiting in review/ longer than this need a person
    review_alert_after: float = 4 * 3600.0


@dataclass(frozen=True)
class Destination:
    name: str
    ae_title: str | None = None
    host: str | None = None
    port: int | None = None
    calling_ae: str | None = None
    folder: Path | None = None
    tls: ClientTLS | None = None
    # output objects go here only if they match one of these {keyword: glob} tables
    # (every pattern of it); empty: everything (see _filter)
    filter: tuple[dict[str, str], ...] = ()
    # proof of delivery (dts.commitment, docs/delivery.md): a Storage Commitment request
    # after storing, answered within commitment_timeout; requested commitment_delay after
    # the last store (some archives commit only once their own intake is done)
    commitment: bool = False
    commitment_timeout: float = 600.0
    commitment_delay: float = 0.0
    verify: str | None = None  # "find": a C-FIND after storing finds every instance
    # a STOW-RS destination (dts.dicomweb): the DICOMweb service's base URL, how to log
    # in, whom to trust for HTTPS (None: the system's certificates) and the request timeout
    url: str | None = None
    auth: WebAuth | None = None
    ca_certificates: Path | None = None
    timeout: float = 60.0

    @property
    def is_folder(self) -> bool:
        return self.folder is not None

    @property
    def is_web(self) -> bool:
        return self.url is not None


@dataclass(frozen=True)
class WebAuth:
    """How dts logs in to a DICOMweb service: a bearer token, or user and password (HTTP
    Basic); each secret is read from its file when it is used (never kept in dts.toml)."""

    bearer_token_file: Path | None = None
    username: str | None = None
    password_file: Path | None = None


@dataclass(frozen=True)
class StowConfig:
    """``[stow]``: STOW-RS into the station (``POST /dicom-web/studies`` of dts web)."""

    enabled: bool = False
    token_file: Path | None = None   # a bearer token (one line); users with a role may too
    source: str = "STOW"             # stands for the calling AE title (streams' calling_ae)
    max_upload_mb: int = 2048        # one request's body, all parts together


@dataclass(frozen=True)
class Notify:
    """One ``[[notify]]`` webhook (dts.notify)."""

    url: str
    events: tuple[str, ...] = ("failed", "stuck")
    secret_file: Path | None = None
    timeout: float = 10.0
    stuck_after: float = 3600.0     # "stuck": a queue's oldest job older than this


NOTIFY_EVENTS = ("failed", "delivered", "stuck", "review")


PRIORS_METHODS = ("get", "move")
PRIOR_SELECTION = "prior"  # the selection name priors have in the job and the /input view


@dataclass(frozen=True)
class Priors:
    """A stream's ``priors`` table: earlier studies of the patient fetched before the run
    (``dts.priors``, docs/priors.md)."""

    source: str                      # ``from``: a configured DICOM destination's name
    max: int = 2                     # at most this many, the most recent first
    within: float | None = None      # seconds before the current study; None: any age
    # "same" (share a modality with the current study), "any", or a pattern every
    # modality code of a prior is matched against (fullmatch; a list becomes one)
    modality: str | tuple[str, ...] = "same"
    modality_pattern: re.Pattern[str] | None = None
    description: re.Pattern[str] | None = None  # searched in StudyDescription
    method: str = "get"              # C-GET, or C-MOVE to [station] ae_title
    required: bool = False           # none found: retry until max_attempts, then fail


@dataclass(frozen=True)
class Stream:
    name: str
    called_ae: re.Pattern[str]
    calling_ae: re.Pattern[str]
    when: Any = None  # compiled jmespath expression or None
    when_text: str | None = None
    select: dict[str, Any] = field(default_factory=dict)  # name -> compiled jmespath
    select_text: dict[str, str] = field(default_factory=dict)
    ror_select: Any = None  # a parsed rorselect.Statement or None
    ror_select_text: str | None = None
    per: str = "study"  # one run job per study, or per selected series ("series")
    image: str | None = None
    command: tuple[str, ...] | None = None
    parameters: dict[str, str] = field(default_factory=dict)
    timeout: float = 3600.0
    memory: str | None = None
    cpus: float | None = None
    gpus: str | None = None
    user: str | None = None
    network: bool = False
    pull: bool = False
    expect_output: bool = True
    allow_new_study: bool = False
    # the result builder (dts.builders): make DICOM of what results.json describes, each
    # kind in a new series described by this template ({stream}, {kind}, {model})
    build: bool = True
    series_description: str = "{stream} {kind}"
    destinations: tuple[str, ...] = ()
    enabled: bool = True
    # review: validated results wait in review/ for a person (dts review approve|reject);
    # shadow: run and validated like a live stream, kept in done/, never sent (docs/review.md)
    review: bool = False
    shadow: bool = False
    # contract "ror": run the image as the predecessor's `ror trigger` did (runner.py);
    # its call string, and its parameters with their JSON types (ROR_CONT_OPTIONS)
    contract: str = "dts"
    call: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    # where the processing runs: "local" (this machine: the engine or a process) or
    # "slurm" (a batch job on the cluster, [slurm]; dts.slurm)
    executor: str = "local"
    priors: Priors | None = None


CONTRACTS = ("dts", "ror")
EXECUTORS = ("local", "slurm")
# sbatch options dts sets itself for every job ([slurm] options may not give them)
SBATCH_OWN = ("--job-name", "-J", "--output", "-o", "--error", "-e", "--time", "-t",
              "--mem", "--cpus-per-task", "-c", "--gres", "--gpus", "-G", "--parsable",
              "--comment", "--export", "--chdir", "-D", "--wrap", "--requeue",
              "--no-requeue", "--partition", "-p", "--account", "-A", "--qos", "-q",
              "--wait", "-W", "--hold", "-H")


@dataclass(frozen=True)
class SlurmConfig:
    """``[slurm]``: how run jobs of ``executor = "slurm"`` streams go to the cluster
    (``dts.slurm``, docs/slurm.md)."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    options: tuple[str, ...] = ()          # more sbatch options, one argv item each
    spool_path: Path | None = None         # the spool as the nodes see it (default: same path)
    max_submitted: int = 100               # cluster jobs followed at a time
    poll_interval: float = 10.0            # how often squeue is asked about them
    command_timeout: float = 30.0          # deadline of every sbatch/squeue/scontrol/scancel
    runtime: str = "podman"                # the container runtime on the nodes
    runtime_command: tuple[str, ...] = ("podman",)   # its argv prefix (global options too)
    container_options: tuple[str, ...] = ()  # more `podman run` options (devices, mounts)
    bin_dir: Path | None = None            # where sbatch & co. are (default: PATH)
    # the spool's filesystem is not checked against the nodes (they mount this host's disk)
    assume_shared: bool = False


@dataclass(frozen=True)
class JournalConfig:
    url: str | None = None


@dataclass(frozen=True)
class WebConfig:
    """``[web]``: the tracking and configuration page (``dts web``, docs/web.md)."""

    enabled: bool = False              # dts watch starts and supervises dts web
    host: str = "127.0.0.1"
    port: int = 8080
    users_file: Path = Path("web/users.json")        # default: in the spool
    session_key_file: Path = Path("web/session.key")  # made once (0600) when absent
    certificate: Path | None = None    # with private_key: HTTPS
    private_key: Path | None = None
    max_upload_mb: int = 100           # the rule tester's uploads, all files together
    session_hours: float = 12.0        # a login lasts this long

    @property
    def tls(self) -> bool:
        return self.certificate is not None

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)


def is_loopback(host: str) -> bool:
    """``host`` names only this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Config:
    path: Path
    station: StationConfig
    destinations: dict[str, Destination]
    streams: tuple[Stream, ...]
    journal: JournalConfig
    web: WebConfig = WebConfig()
    stow: StowConfig = StowConfig()
    notify: tuple[Notify, ...] = ()
    slurm: SlurmConfig = SlurmConfig()

    @property
    def rules_path(self) -> Path:
        return self.station.classify_rules

    def stream(self, name: str) -> Stream | None:
        return next((s for s in self.streams if s.name == name), None)

    def destination_for_ae(self, ae_title: str) -> Destination | None:
        """The configured DICOM destination whose AE title is ``ae_title`` (for ``@sender``)."""
        return next(
            (d for d in self.destinations.values()
             if not d.is_folder and not d.is_web and d.ae_title == ae_title),
            None,
        )


class _Table:
    """Reads one TOML table, remembering which keys were used so unknown ones are refused."""

    def __init__(self, file: str, prefix: str, data: Any) -> None:
        self.file, self.prefix = file, prefix
        if not isinstance(data, dict):
            raise ConfigError(file, prefix, "must be a table")
        self.data: dict[str, Any] = data
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def fail(self, name: str, reason: str) -> ConfigError:
        return ConfigError(self.file, self.key(name), reason)

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        self.used.add(name)
        if name not in self.data:
            return default
        value = self.data[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if bool not in kinds and isinstance(value, bool):
            raise self.fail(name, f"expected {_kind_names(kinds)}, got {value!r}")
        if not isinstance(value, kinds):
            raise self.fail(name, f"expected {_kind_names(kinds)}, got {value!r}")
        return value

    def convert(self, name: str, fn: Callable[[Any], Any], default: Any = None) -> Any:
        self.used.add(name)
        if name not in self.data:
            return default
        try:
            return fn(self.data[name])
        except (ValueError, TypeError) as exc:
            raise self.fail(name, str(exc)) from None

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise self.fail(unknown[0], "unknown key")


def _kind_names(kinds: tuple[type, ...]) -> str:
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string",
             list: "a list", dict: "a table"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _regex(value: Any) -> re.Pattern[str]:
    if not isinstance(value, str):
        raise ValueError(f"expected a regular expression string, got {value!r}")
    try:
        return re.compile(value)
    except re.error as exc:
        raise ValueError(f"invalid regular expression {value!r}: {exc}") from None


def _jmespath(value: Any) -> Any:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a jmespath expression string, got {value!r}")
    try:
        return jmespath.compile(value)
    except jmespath.exceptions.JMESPathError as exc:
        raise ValueError(f"jmespath syntax error in {value!r}: {exc}") from None


def _port(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ValueError(f"expected a port number 0-65535, got {value!r}")
    return value


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected a non-negative integer, got {value!r}")
    return value


def _ae(value: Any) -> str:
    if not valid_ae_title(value):
        raise ValueError(f"not a valid AE title (1-16 printable characters, no backslash): {value!r}")
    return str(value)


def _host_pattern(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected an address or network, got {value!r}")
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"not an IP address or network: {value!r}") from None
    return value


def _string_list(item: Callable[[Any], str]) -> Callable[[Any], tuple[str, ...]]:
    def convert(value: Any) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise ValueError(f"expected a list, got {value!r}")
        return tuple(item(v) for v in value)

    return convert


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _path(base: Path) -> Callable[[Any], Path]:
    def convert(value: Any) -> Path:
        if not isinstance(value, str) or not value:
            raise ValueError(f"expected a path, got {value!r}")
        p = Path(os.path.expanduser(value))
        return Path(os.path.normpath(p if p.is_absolute() else base / p))

    return convert


def _folder(base: Path, spool: Path) -> Callable[[Any], Path]:
    """A path; ``{spool}`` at its start stands for the station's spool (results kept
    beside the jobs wherever ``--spool`` puts them)."""
    def convert(value: Any) -> Path:
        if isinstance(value, str) and value.startswith(SPOOL_PLACEHOLDER):
            rest = value[len(SPOOL_PLACEHOLDER):].lstrip("/")
            return Path(os.path.normpath(spool / rest)) if rest else spool
        if isinstance(value, str) and SPOOL_PLACEHOLDER in value:
            raise ValueError(f"{SPOOL_PLACEHOLDER} may only start a path, got {value!r}")
        return _path(base)(value)

    return convert


def _cpus(value: Any) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"must be a number more than 0, got {value!r}")
    return value


def _duration(value: Any) -> float:
    return parse_duration(value)


def _verify(value: Any) -> str:
    if value != "find":
        raise ValueError(f'the one check there is is "find" (a C-FIND after storing), '
                         f"got {value!r}")
    return "find"


def _series_description(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a non-empty text, got {value!r}")
    unknown = set(re.findall(r"\{([^}]*)\}", value)) - {"stream", "kind", "model"}
    if unknown:
        raise ValueError(f"unknown placeholder {{{sorted(unknown)[0]}}} (use {{stream}}, "
                         "{kind}, {model})")
    if "\\" in value or len(value) > 64:
        raise ValueError("at most 64 characters, no backslash (SeriesDescription is a LO)")
    return value


def _memory(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return str(value)
    if isinstance(value, str) and _MEMORY.match(value):
        return value
    raise ValueError(f"expected a memory size like '512m' or '8g', got {value!r}")


def _parameters(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ValueError(f"expected a table of names to values, got {value!r}")
    out: dict[str, str] = {}
    for k, v in value.items():
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", k):
            raise ValueError(f"parameter name {k!r} is not usable as an environment variable")
        if isinstance(v, (dict, list)):
            raise ValueError(f"parameter {k!r}: expected a string or number, got {v!r}")
        out[k] = str(v).lower() if isinstance(v, bool) else str(v)
    return out


def _ror_options(value: Any) -> dict[str, Any]:
    """The parameters of a ``contract = "ror"`` stream: a table, or a string holding a
    JSON object (ROR_CONT_OPTIONS as the predecessor wrote it); values keep their types."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ValueError(f"ROR_CONT_OPTIONS must be a JSON object; not valid JSON: "
                             f"{exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"ROR_CONT_OPTIONS must be a JSON object (a table of options), "
                         f"got {value!r}")
    try:
        json.dumps(value, allow_nan=False)
    except ValueError as exc:
        raise ValueError(f"not representable as JSON: {exc}") from None
    return dict(value)


def _filter(value: Any) -> tuple[dict[str, str], ...]:
    """``filter = { Keyword = "glob", ... }`` or a list of such tables (any one of them)."""
    tables = value if isinstance(value, list) else [value]
    out = []
    for table in tables:
        if not isinstance(table, dict) or not table:
            raise ValueError(f"expected a table of DICOM keywords to glob patterns (or a list "
                             f"of them), got {table!r}")
        for keyword, pattern in table.items():
            if rules.tag_for_keyword(keyword) is None:
                raise ValueError(f"{keyword!r} is not a DICOM attribute keyword")
            if not isinstance(pattern, str):
                raise ValueError(f"{keyword}: expected a glob pattern string, got {pattern!r}")
        out.append(dict(table))
    return tuple(out)


def _default_rules(base: Path) -> Path:
    """``classifyRules.json`` beside the configuration, else the one dts ships (a station
    configured in /etc/dts with a few keys classifies with the default rules)."""
    beside = base / "classifyRules.json"
    return beside if beside.exists() else PACKAGED_CONFIG.parent / "classifyRules.json"


def _station(file: str, data: Any, base: Path) -> StationConfig:
    t = _Table(file, "station", data)
    d = StationConfig()
    tls = None
    if "tls" in t.data:
        tt = _Table(file, "station.tls", t.get("tls", dict))
        tls = TLS(
            certificate=tt.convert("certificate", _path(base)),
            private_key=tt.convert("private_key", _path(base)),
            ca_certificates=tt.convert("ca_certificates", _path(base)),
            require_client_certificate=tt.get("require_client_certificate", bool, False),
        )
        tt.finish()
        if tls.certificate is None or tls.private_key is None:
            raise ConfigError(file, "station.tls", "needs certificate and private_key")
    station = StationConfig(
        ae_title=t.convert("ae_title", _ae, d.ae_title),
        host=t.get("host", str, d.host),
        port=t.convert("port", _port, d.port),
        spool=t.convert("spool", _path(base), base / "spool"),
        stable_seconds=t.convert("stable_seconds", _duration, d.stable_seconds),
        check_called_ae=t.get("check_called_ae", bool, d.check_called_ae),
        allowed_calling_ae=t.convert("allowed_calling_ae", _string_list(_ae), ()),
        allowed_hosts=t.convert("allowed_hosts", _string_list(_host_pattern), ()),
        min_free_mb=t.convert("min_free_mb", _positive_int, d.min_free_mb),
        max_parallel_runs=t.convert("max_parallel_runs", _positive_int, d.max_parallel_runs),
        max_parallel_sends=t.convert("max_parallel_sends", _positive_int, d.max_parallel_sends),
        classify_rules=t.convert("classify_rules", _path(base), _default_rules(base)),
        max_pdu=t.convert("max_pdu", _positive_int, d.max_pdu),
        max_associations=t.convert("max_associations", _positive_int, d.max_associations),
        receive_workers=t.convert("receive_workers", _positive_int, d.receive_workers),
        max_pending_connections=t.convert("max_pending_connections", _positive_int,
                                          d.max_pending_connections),
        max_pending_per_host=t.convert("max_pending_per_host", _positive_int,
                                       d.max_pending_per_host),
        dimse_timeout=t.convert("dimse_timeout", _duration, d.dimse_timeout),
        network_timeout=t.convert("network_timeout", _duration, d.network_timeout),
        max_attempts=t.convert("max_attempts", _positive_int, d.max_attempts),
        send_retries=t.convert("send_retries", _positive_int, d.send_retries),
        send_backoff=t.convert("send_backoff", _duration, d.send_backoff),
        send_backoff_max=t.convert("send_backoff_max", _duration, d.send_backoff_max),
        rescan_seconds=t.convert("rescan_seconds", _duration, d.rescan_seconds),
        retention=t.convert("retention", _duration, None),
        clean_below_free_mb=t.convert("clean_below_free_mb", _positive_int, 0),
        tls=tls,
        review_alert_after=t.convert("review_alert_after", _duration, d.review_alert_after),
    )
    t.finish()
    for key in ("max_parallel_runs", "max_parallel_sends"):
        if getattr(station, key) < 1:
            raise ConfigError(file, f"station.{key}", "must be at least 1")
    if station.max_attempts < 1:
        raise ConfigError(file, "station.max_attempts", "must be at least 1")
    for key in ("max_associations", "max_pending_connections", "max_pending_per_host"):
        if getattr(station, key) < 1:
            raise ConfigError(file, f"station.{key}", "must be at least 1")
    if station.max_pending_per_host > station.max_pending_connections:
        raise ConfigError(file, "station.max_pending_per_host",
                          "must not be more than max_pending_connections")
    if station.rescan_seconds <= 0:
        raise ConfigError(file, "station.rescan_seconds", "must be more than 0")
    return station


def _destination(file: str, index: int, data: Any, base: Path, spool: Path) -> Destination:
    t = _Table(file, f"destination[{index}]", data)
    name = t.get("name", str)
    if not name or not _NAME.match(name):
        raise t.fail("name", f"a destination needs a name of letters, digits, '_.-', got {name!r}")
    t.prefix = f"destination.{name}"
    tls = None
    if "tls" in t.data:
        tls = _client_tls(file, f"{t.prefix}.tls", t.get("tls", dict), base)
    dest = Destination(
        name=name,
        ae_title=t.convert("ae_title", _ae),
        host=t.get("host", str),
        port=t.convert("port", _port),
        calling_ae=t.convert("calling_ae", _ae),
        folder=t.convert("folder", _folder(base, spool)),
        tls=tls,
        filter=t.convert("filter", _filter, ()),
        commitment=t.get("commitment", bool, False),
        commitment_timeout=t.convert("commitment_timeout", _duration, 600.0),
        commitment_delay=t.convert("commitment_delay", _duration, 0.0),
        verify=t.convert("verify", _verify),
        url=t.convert("url", _web_url),
        auth=_web_auth(file, f"{t.prefix}.auth", t.get("auth", dict), base)
        if "auth" in t.data else None,
        ca_certificates=t.convert("ca_certificates", _readable(base)),
        timeout=t.convert("timeout", _duration, 60.0),
    )
    if dest.commitment_timeout <= 0:
        raise t.fail("commitment_timeout", "must be more than 0")
    for key in ("commitment_timeout", "commitment_delay"):
        if key in t.data and not dest.commitment:
            raise t.fail(key, "goes with commitment = true")
    t.finish()
    web_keys = [k for k in ("auth", "ca_certificates", "timeout") if k in t.data]
    if dest.url is not None:
        if dest.folder is not None or dest.ae_title or dest.host or dest.port or dest.tls:
            raise ConfigError(file, t.prefix, "either url (STOW-RS) or folder or "
                              "ae_title/host/port(/tls), not two of them")
        if dest.timeout <= 0:
            raise ConfigError(file, f"{t.prefix}.timeout", "must be more than 0")
        for key in ("commitment", "verify"):
            if getattr(dest, key):
                raise ConfigError(file, f"{t.prefix}.{key}", "is for DICOM destinations, "
                                  "not STOW-RS (url)")
        return dest
    if web_keys:
        raise ConfigError(file, f"{t.prefix}.{web_keys[0]}", "goes with url (a STOW-RS "
                          "destination)")
    if dest.folder is not None:
        if dest.ae_title or dest.host or dest.port or dest.tls:
            raise ConfigError(file, t.prefix, "either folder or ae_title/host/port(/tls), "
                              "not both")
        for key in ("commitment", "verify"):
            if getattr(dest, key):
                raise ConfigError(file, f"{t.prefix}.{key}", "is for DICOM destinations, "
                                  "not folders")
    elif not (dest.ae_title and dest.host and dest.port):
        raise ConfigError(file, t.prefix, "a DICOM destination needs ae_title, host and port "
                          "(or give folder, or url)")
    return dest


def _web_url(value: Any) -> str:
    """An http(s) URL with a host (a DICOMweb base URL or a webhook)."""
    from urllib.parse import urlsplit

    if not isinstance(value, str):
        raise TypeError(f"expected an http:// or https:// URL, got {value!r}")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http:// or https:// URL with a host, got {value!r}")
    if parts.username or parts.password:
        raise ValueError("no user or password in the URL (use auth = { ... } with a file)")
    if parts.query or parts.fragment:
        raise ValueError(f"no query or fragment in the URL, got {value!r}")
    return value.rstrip("/")


def _readable(base: Path) -> Callable[[Any], Path]:
    """A path to a file dts can read now."""
    def convert(value: Any) -> Path:
        path = _path(base)(value)
        if not path.is_file() or not os.access(path, os.R_OK):
            raise ValueError(f"cannot read {path}")
        return path

    return convert


def _web_auth(file: str, prefix: str, data: Any, base: Path) -> WebAuth:
    t = _Table(file, prefix, data)
    auth = WebAuth(bearer_token_file=t.convert("bearer_token_file", _readable(base)),
                   username=t.get("username", str),
                   password_file=t.convert("password_file", _readable(base)))
    t.finish()
    if auth.bearer_token_file is not None:
        if auth.username is not None or auth.password_file is not None:
            raise ConfigError(file, prefix, "either bearer_token_file or username and "
                              "password_file, not both")
    elif not (auth.username and auth.password_file):
        raise ConfigError(file, prefix, "give bearer_token_file, or username and "
                          "password_file")
    elif ":" in auth.username:
        raise ConfigError(file, f"{prefix}.username", "no ':' in an HTTP Basic user name")
    return auth


def _stow(file: str, data: Any, base: Path) -> StowConfig:
    t = _Table(file, "stow", data)
    d = StowConfig()
    stow = StowConfig(
        enabled=t.get("enabled", bool, d.enabled),
        token_file=t.convert("token_file", _readable(base)),
        source=t.convert("source", _ae, d.source),
        max_upload_mb=t.convert("max_upload_mb", _positive_int, d.max_upload_mb),
    )
    t.finish()
    if stow.max_upload_mb < 1:
        raise t.fail("max_upload_mb", "must be at least 1")
    return stow


def _notify(file: str, index: int, data: Any, base: Path) -> Notify:
    t = _Table(file, f"notify[{index}]", data)
    url = t.convert("url", _web_url)
    if url is None:
        raise t.fail("url", "a webhook needs a url")
    events = t.convert("events", _string_list(_str), Notify.events)
    bad = [e for e in events if e not in NOTIFY_EVENTS]
    if bad or not events:
        raise t.fail("events", f"expected a list of {', '.join(NOTIFY_EVENTS)}, got "
                               f"{bad[0] if bad else 'an empty list'!r}")
    notify = Notify(url=url, events=tuple(dict.fromkeys(events)),
                    secret_file=t.convert("secret_file", _readable(base)),
                    timeout=t.convert("timeout", _duration, 10.0),
                    stuck_after=t.convert("stuck_after", _duration, 3600.0))
    t.finish()
    if notify.timeout <= 0:
        raise t.fail("timeout", "must be more than 0")
    return notify


def _client_tls(file: str, prefix: str, data: Any, base: Path) -> ClientTLS:
    t = _Table(file, prefix, data)
    tls = ClientTLS(
        ca_certificates=t.convert("ca_certificates", _path(base)),
        certificate=t.convert("certificate", _path(base)),
        private_key=t.convert("private_key", _path(base)),
        verify_peer=t.get("verify_peer", bool, True),
        server_name=t.get("server_name", str),
    )
    t.finish()
    if (tls.certificate is None) != (tls.private_key is None):
        raise ConfigError(file, prefix, "certificate and private_key go together (a client "
                          "certificate), or neither")
    for key in ("ca_certificates", "certificate", "private_key"):
        path = getattr(tls, key)
        if path is not None and not os.access(path, os.R_OK):
            raise ConfigError(file, f"{prefix}.{key}", f"cannot read {path}")
    import ssl

    try:  # the files must make a context, or sending fails later for a reason found now
        ctx = ssl.create_default_context(
            cafile=str(tls.ca_certificates) if tls.ca_certificates else None)
        if tls.certificate is not None and tls.private_key is not None:
            ctx.load_cert_chain(str(tls.certificate), str(tls.private_key))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(file, prefix, f"unusable certificate or key: {exc}") from None
    return tls


def _stream(file: str, index: int, data: Any, destinations: dict[str, Destination]) -> Stream:
    t = _Table(file, f"stream[{index}]", data)
    name = t.get("name", str)
    if not name or not _NAME.match(name):
        raise t.fail("name", f"a stream needs a name of letters, digits, '_.-', got {name!r}")
    t.prefix = f"stream.{name}"
    select_raw = t.get("select", dict, {})
    select: dict[str, Any] = {}
    for sel_name, expr in select_raw.items():
        if not _NAME.match(sel_name):
            raise t.fail(f"select.{sel_name}", "selection names are letters, digits, '_.-'")
        try:
            select[sel_name] = _jmespath(expr)
        except ValueError as exc:
            raise t.fail(f"select.{sel_name}", str(exc)) from None
    ror_text = t.get("ror_select", str)
    ror_statement = None
    if ror_text is not None:
        if select_raw:
            raise t.fail("ror_select", "give either ror_select or select.<name>, not both "
                                       "(a ror_select statement names its own selections: "
                                       "WHERE series NAMED \"x\" HAS ...)")
        # imported here, not at the top: lark, re2 and pydicom's dictionary cost a
        # command that never reads a statement (dts status, log ...) 0.3 s (issue 16)
        from . import rorselect

        try:
            ror_statement = rorselect.parse(ror_text)
        except rorselect.RorSelectError as exc:
            raise t.fail("ror_select", f"not a ror select statement: {exc}") from None
    per = t.get("per", str, "study")
    if per not in ("study", "series"):
        raise t.fail("per", f"expected \"study\" (one run job per study) or \"series\" "
                            f"(one per selected series), got {per!r}")
    command = t.convert("command", _string_list(_str))
    contract = t.get("contract", str, "dts")
    ror = contract == "ror"
    stream = Stream(
        name=name,
        called_ae=t.convert("called_ae", _regex, re.compile(".*")),
        calling_ae=t.convert("calling_ae", _regex, re.compile(".*")),
        when=t.convert("when", _jmespath),
        when_text=t.data.get("when"),
        select=select,
        select_text={k: str(v) for k, v in select_raw.items()},
        ror_select=ror_statement,
        ror_select_text=ror_text,
        per=per,
        image=t.get("image", str),
        command=command,
        parameters={} if ror else t.convert("parameters", _parameters, {}),
        timeout=t.convert("timeout", _duration, 3600.0),
        memory=t.convert("memory", _memory),
        cpus=t.convert("cpus", _cpus),
        gpus=t.get("gpus", str),
        user=t.get("user", str),
        network=t.get("network", bool, False),
        pull=t.get("pull", bool, False),
        expect_output=t.get("expect_output", bool, True),
        allow_new_study=t.get("allow_new_study", bool, False),
        build=t.get("build", bool, True),
        series_description=t.convert("series_description", _series_description,
                                     "{stream} {kind}"),
        destinations=t.convert("destinations", _string_list(_str), ()),
        enabled=t.get("enabled", bool, True),
        review=t.get("review", bool, False),
        shadow=t.get("shadow", bool, False),
        contract=contract, call=t.get("call", str),
        options=t.convert("parameters", _ror_options, {}) if ror else {},
        executor=t.get("executor", str, "local"),
        priors=_priors(file, f"{t.prefix}.priors", t.get("priors", dict), destinations),
    )
    t.finish()
    _check_contract(file, t.prefix, stream)
    if stream.review and stream.shadow:
        raise ConfigError(file, f"{t.prefix}.review", "a shadow stream sends nothing, so "
                          "there is nothing to review: give review = true or shadow = true, "
                          "not both")
    _check_executor(file, t.prefix, stream)
    if stream.priors is not None:
        if stream.contract != "dts":
            raise ConfigError(file, f"{t.prefix}.priors", "priors go with contract = \"dts\" "
                              "(the ror contract's /data view has no place for them)")
        if PRIOR_SELECTION in stream.select:
            raise ConfigError(file, f"{t.prefix}.select.{PRIOR_SELECTION}",
                              f"the selection name {PRIOR_SELECTION!r} is taken by priors")
    if bool(stream.image) == bool(stream.command):
        raise ConfigError(file, t.prefix, "give exactly one of image or command")
    if stream.command is not None and not stream.command:
        raise ConfigError(file, f"{t.prefix}.command", "must not be empty")
    for dest in stream.destinations:
        if dest != "@sender" and dest not in destinations:
            raise ConfigError(file, f"{t.prefix}.destinations",
                              f"unknown destination {dest!r} (configured: "
                              f"{', '.join(sorted(destinations)) or 'none'}; or '@sender')")
    return stream


def _priors(file: str, prefix: str, data: Any,
            destinations: dict[str, Destination]) -> Priors | None:
    """A stream's ``priors = { from = "pacs", max = 2, within = "5y", ... }``."""
    if data is None:
        return None
    t = _Table(file, prefix, data)
    source = t.get("from", str)
    if source is None:
        raise ConfigError(file, f"{prefix}.from", "priors need from = \"<destination>\": the "
                          "PACS to query and retrieve from")
    dest = destinations.get(source)
    if dest is None or dest.is_folder:
        dicom = sorted(n for n, d in destinations.items() if not d.is_folder)
        raise ConfigError(file, f"{prefix}.from", f"{source!r} is not a configured DICOM "
                          f"destination (configured: {', '.join(dicom) or 'none'})")
    count = t.get("max", int, 2)
    if not 1 <= count <= 20:
        raise t.fail("max", f"expected 1 to 20 prior studies, got {count!r}")
    within = t.convert("within", _duration)
    if within is not None and within <= 0:
        raise t.fail("within", "must be more than 0 (leave it out for any age)")
    modality: Any = t.get("modality", (str, list), "same")
    pattern: re.Pattern[str] | None = None
    if isinstance(modality, list):
        if not modality or not all(isinstance(m, str) and re.fullmatch(r"[A-Z0-9_]{1,16}", m)
                                   for m in modality):
            raise t.fail("modality", f"expected a list of modality codes like [\"CT\", "
                                     f"\"MR\"], got {modality!r}")
        pattern = re.compile("|".join(re.escape(m) for m in modality))
        modality = tuple(modality)
    elif modality not in ("same", "any"):
        try:
            pattern = _regex(modality)
        except ValueError as exc:
            raise t.fail("modality", f"expected \"same\", \"any\", a list of modality codes "
                                     f"or a regular expression: {exc}") from None
    method = t.get("method", str, "get")
    if method not in PRIORS_METHODS:
        raise t.fail("method", f"expected \"get\" (C-GET) or \"move\" (C-MOVE to the "
                               f"station's ae_title), got {method!r}")
    priors = Priors(source=source, max=count, within=within, modality=modality,
                    modality_pattern=pattern, description=t.convert("description", _regex),
                    method=method, required=t.get("required", bool, False))
    t.finish()
    return priors


def _host(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected an address to listen on, got {value!r}")
    if value != "localhost":
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(f"not an IP address (or localhost): {value!r}") from None
    return value


def _web(file: str, data: Any, base: Path, spool: Path) -> WebConfig:
    t = _Table(file, "web", data)
    d = WebConfig()
    in_spool = _folder(base, spool)
    hours = t.get("session_hours", (int, float), d.session_hours)
    web = WebConfig(
        enabled=t.get("enabled", bool, d.enabled),
        host=t.convert("host", _host, d.host),
        port=t.convert("port", _port, d.port),
        users_file=t.convert("users_file", in_spool, spool / d.users_file),
        session_key_file=t.convert("session_key_file", in_spool, spool / d.session_key_file),
        certificate=t.convert("certificate", _path(base)),
        private_key=t.convert("private_key", _path(base)),
        max_upload_mb=t.convert("max_upload_mb", _positive_int, d.max_upload_mb),
        session_hours=float(hours),
    )
    t.finish()
    if not (math.isfinite(web.session_hours) and 0 < web.session_hours <= 24 * 366):
        raise t.fail("session_hours", f"expected hours between 0 and a year, got {hours!r}")
    if web.max_upload_mb < 1:
        raise t.fail("max_upload_mb", "must be at least 1")
    if (web.certificate is None) != (web.private_key is None):
        raise ConfigError(file, "web", "certificate and private_key go together (HTTPS), "
                          "or neither")
    for key in ("certificate", "private_key"):
        path = getattr(web, key)
        if path is not None and not os.access(path, os.R_OK):
            raise t.fail(key, f"cannot read {path}")
    return web


def _check_contract(file: str, prefix: str, stream: Stream) -> None:
    if stream.contract not in CONTRACTS:
        raise ConfigError(file, f"{prefix}.contract", f"expected one of {', '.join(CONTRACTS)}, "
                          f"got {stream.contract!r}")
    if stream.contract == "ror" and not stream.image:
        raise ConfigError(file, f"{prefix}.contract", "contract = \"ror\" runs a container "
                          "image: give image (not command)")
    if stream.call is not None and stream.contract != "ror":
        raise ConfigError(file, f"{prefix}.call", "call (ror's call string) goes with "
                          "contract = \"ror\"; a dts stream's image runs its own command")
    if stream.call is not None:
        try:
            if not shlex.split(stream.call):
                raise ValueError("empty")
        except ValueError as exc:
            raise ConfigError(file, f"{prefix}.call", f"not a usable call string: {exc}") \
                from None


def _check_executor(file: str, prefix: str, stream: Stream) -> None:
    if stream.executor not in EXECUTORS:
        raise ConfigError(file, f"{prefix}.executor", f"expected one of "
                          f"{', '.join(EXECUTORS)}, got {stream.executor!r}")
    if stream.executor != "slurm":
        return
    if stream.gpus is not None and not stream.gpus.strip().isdigit():
        raise ConfigError(file, f"{prefix}.gpus", "with executor = \"slurm\" gpus is a "
                          f"number of GPUs (--gres=gpu:N), got {stream.gpus!r}")
    if stream.user and stream.command:
        raise ConfigError(file, f"{prefix}.user", "a command on the cluster runs as the user "
                          "who submits it (user applies to an image on the cluster)")


def _options(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"expected a list of sbatch options (one argv item each, e.g. "
                         f"[\"--constraint=v100\"]), got {value!r}")
    for item in value:
        if not item.startswith("-"):
            raise ValueError(f"{item!r} is not an option (options start with '-'; give "
                             "\"--name=value\" as one item)")
        name = item.split("=", 1)[0]
        if name in SBATCH_OWN or any(item.startswith(o) and len(o) == 2 and len(item) > 2
                                     for o in SBATCH_OWN):
            raise ValueError(f"{item!r}: dts sets {name} itself (partition, account, qos "
                             "are keys of [slurm]; time, memory, cpus, gpus come from the "
                             "stream)")
    return tuple(value)


def _argv(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v
                                                           for v in value):
        raise ValueError(f"expected a non-empty list of argv items, got {value!r}")
    return tuple(value)


def _argv_items(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"expected a list of argv items, got {value!r}")
    return tuple(value)


def _slurm(file: str, data: Any, base: Path) -> SlurmConfig:
    t = _Table(file, "slurm", data)
    d = SlurmConfig()
    slurm = SlurmConfig(
        partition=t.get("partition", str),
        account=t.get("account", str),
        qos=t.get("qos", str),
        options=t.convert("options", _options, ()),
        spool_path=t.convert("spool_path", _path(base)),
        max_submitted=t.convert("max_submitted", _positive_int, d.max_submitted),
        poll_interval=t.convert("poll_interval", _duration, d.poll_interval),
        command_timeout=t.convert("command_timeout", _duration, d.command_timeout),
        runtime=t.get("runtime", str, d.runtime),
        runtime_command=t.convert("runtime_command", _argv, d.runtime_command),
        container_options=t.convert("container_options", _argv_items, ()),
        bin_dir=t.convert("bin_dir", _path(base)),
        assume_shared=t.get("assume_shared", bool, False),
    )
    t.finish()
    for key in ("partition", "account", "qos"):
        value = getattr(slurm, key)
        if value is not None and not _NAME.match(value):
            raise t.fail(key, f"expected a name of letters, digits, '_.-', got {value!r}")
    if slurm.max_submitted < 1:
        raise t.fail("max_submitted", "must be at least 1")
    if not 0.05 <= slurm.poll_interval <= 3600:
        raise t.fail("poll_interval", "expected between 50ms and 1h")
    if not 1 <= slurm.command_timeout <= 3600:
        raise t.fail("command_timeout", "expected between 1s and 1h")
    if slurm.runtime != "podman":
        raise t.fail("runtime", f"expected \"podman\" (the container runtime the batch "
                     f"script runs on the nodes), got {slurm.runtime!r}")
    return slurm


def embedded_config() -> Path:
    """The embedded default: a checkout's ``configuration/dts.toml`` (the copy users edit,
    relative paths resolving in the checkout), else the copy shipped inside the package."""
    return CHECKOUT_CONFIG if CHECKOUT_CONFIG.is_file() else PACKAGED_CONFIG


def default_spool() -> Path:
    """Where an installed package's embedded configuration keeps its spool (never inside
    site-packages): ``/var/spool/dts`` for root, else ``$XDG_STATE_HOME/dts/spool``
    (``~/.local/state/dts/spool``)."""
    if os.geteuid() == 0:
        return Path("/var/spool/dts")
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"),
                                                             ".local", "state")
    return Path(state) / "dts" / "spool"


def load(path: str | os.PathLike[str] | None = None,
         spool: str | os.PathLike[str] | None = None) -> Config:
    """Load and check ``dts.toml``; ``None`` means the embedded default. ``spool`` (the
    ``--spool`` option) replaces ``[station] spool``, ``{spool}`` in folders included."""
    cfg_path = Path(path) if path is not None else embedded_config()
    if spool is None and path is None and cfg_path == PACKAGED_CONFIG:
        spool = default_spool()
    file = str(cfg_path)
    try:
        with open(cfg_path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(file, "", "no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, "", f"not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(file, "", exc.strerror or str(exc)) from None
    base = cfg_path.resolve().parent
    top = _Table(file, "", raw)
    station = _station(file, top.get("station", dict, {}), base)
    if spool is not None:
        station = dataclasses.replace(station, spool=Path(os.path.abspath(spool)))
    destinations: dict[str, Destination] = {}
    for i, d in enumerate(top.get("destination", list, [])):
        dest = _destination(file, i, d, base, station.spool)
        if dest.name in destinations:
            raise ConfigError(file, f"destination.{dest.name}", "defined twice")
        destinations[dest.name] = dest
    streams: list[Stream] = []
    for i, s in enumerate(top.get("stream", list, [])):
        stream = _stream(file, i, s, destinations)
        if any(x.name == stream.name for x in streams):
            raise ConfigError(file, f"stream.{stream.name}", "defined twice")
        streams.append(stream)
    jt = _Table(file, "journal", top.get("journal", dict, {}))
    journal = JournalConfig(url=jt.get("url", str))
    jt.finish()
    web = _web(file, top.get("web", dict, {}), base, station.spool)
    stow = _stow(file, top.get("stow", dict, {}), base)
    notify = tuple(_notify(file, i, n, base) for i, n in enumerate(top.get("notify", list, [])))
    slurm = _slurm(file, top.get("slurm", dict, {}), base)
    top.finish()
    config = Config(path=cfg_path.resolve(), station=station, destinations=destinations,
                    streams=tuple(streams), journal=journal, web=web, stow=stow,
                    notify=notify, slurm=slurm)
    # a bad rule file is refused now, not at the first classification
    rules.load_station_rules(config.rules_path, config.path)
    return config


# -- the effective configuration, as `dts config show` prints it ---------------------------

SECRET_KEYS = ("password", "token", "secret")  # key names whose values are never shown
MASK = "***"


def mask_url(url: str) -> str:
    """A URL with its password replaced by ``***`` (``postgresql://dts:***@db/dts``)."""
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:/@]*):([^@]*)@", url)
    return f"{match.group(1)}:{MASK}@{url[match.end():]}" if match else url


def _plain(value: Any) -> Any:
    """A configuration value as TOML/JSON can hold it (None: left out)."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, re.Pattern):
        return value.pattern
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: p for k, v in value.items() if (p := _plain(v)) is not None}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain({f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
    return value


def _masked(data: Any) -> Any:
    if isinstance(data, dict):
        # a *_file key names where a secret is kept, not the secret: shown as it is
        return {k: (MASK if any(s in k.lower() for s in SECRET_KEYS) and isinstance(v, str)
                    and not k.endswith("_file") else _masked(v)) for k, v in data.items()}
    if isinstance(data, list):
        return [_masked(v) for v in data]
    return data


def _destination_entry(dest: Destination) -> Any:
    entry = _plain(dest)
    if not dest.is_web:
        entry.pop("timeout", None)  # a STOW-RS destination's key
    if len(dest.filter) == 1:
        entry["filter"] = dict(dest.filter[0])
    elif not dest.filter:
        entry.pop("filter", None)
    if not dest.commitment:  # the defaults of a key not used: loadable again
        for key in ("commitment", "commitment_timeout", "commitment_delay"):
            entry.pop(key, None)
    return entry


def effective(config: Config) -> dict[str, Any]:
    """Every key with its value after defaults, in the layout of ``dts.toml`` (loadable
    again), secrets masked: passwords in URLs, and keys named like a password or token."""
    streams = []
    for s in config.streams:
        entry = _plain(s)
        entry.pop("when", None)
        entry.pop("select", None)
        when = entry.pop("when_text", None)
        if when is not None:
            entry["when"] = when
        if s.select_text:
            entry["select"] = dict(s.select_text)
        entry.pop("select_text", None)
        options = entry.pop("options", {})
        if s.contract == "ror":
            entry["parameters"] = options
        entry.pop("ror_select", None)
        if "priors" in entry:  # as written: from = ..., the pattern not repeated
            entry["priors"].pop("modality_pattern", None)
            entry["priors"] = {"from": entry["priors"].pop("source"), **entry["priors"]}
        ror = entry.pop("ror_select_text", None)
        if ror is not None:
            entry["ror_select"] = ror
        streams.append(entry)
    out: dict[str, Any] = {
        "station": _plain(config.station),
        "destination": [_destination_entry(d) for d in config.destinations.values()],
        "stream": streams,
    }
    if config.journal.url is not None:
        out["journal"] = {"url": mask_url(config.journal.url)}
    out["web"] = _plain(config.web)
    if config.stow != StowConfig():
        out["stow"] = _plain(config.stow)
    if config.notify:
        out["notify"] = [_plain(n) for n in config.notify]
    if config.slurm != SlurmConfig() or any(s.executor == "slurm" for s in config.streams):
        out["slurm"] = _plain(config.slurm)
    return _masked({k: v for k, v in out.items() if v != []})
