"""Owns the Slurm side of the run stage: batch jobs written, submitted, followed, cancelled.

A run job of an ``executor = "slurm"`` stream is not run by ``dts run`` itself. The run
stage prepares its input view and output as for any run (``runner.process``), moves the
job into ``run/slurm/`` (``spool.State.SLURM``), writes the batch files into
``<job>/slurm/`` (``write_batch``) and hands them to ``sbatch`` (``Cluster.submit``).
From then on no dts process holds the job: the ``Follower`` of any ``dts run`` or ``dts
watch`` asks Slurm what became of it (``squeue`` by name, ``scontrol show job``, ``sacct``
where accounting is configured, and the exit file the batch script leaves in the job as
the last word) and, once the cluster job has ended, hands it back to the run stage
(``runner.collect``) under the job's lock, which checks the output and publishes it as
for a local run.

Identity: a cluster job is named ``dts-<job id>`` (``job_name``) and carries
``dts:<token>`` as its comment. The token is made once per intended run and written to
job.json (``slurm.token``) before ``sbatch`` is called, so a submission that was
interrupted (dts killed, sbatch timed out while the controller accepted it) is found
again by name and token and followed, never submitted a second time.

The batch script (``BATCH_SCRIPT``) is the same text for every job. What it runs is read
from ``<job>/slurm/argv`` (argv items separated by NUL bytes, run without a shell, from
the job's ``output/``): ``podman run`` of the stream's image with ``/input`` read-only,
``/output``, the parameters and no network, or the stream's command. The environment
reaches it through ``sbatch --export=ALL`` of the environment dts gives sbatch; no DICOM
or configuration value is ever part of a shell text. It writes the node's name into
``slurm/node`` when it starts and the processing's exit code into ``slurm/exit``, and
when Slurm cancels it (``scancel``, the time limit) it runs ``slurm/cleanup`` (removes
the container, which does not belong to the job's process tree).

Every Slurm command runs with a deadline (``[slurm] command_timeout``); a controller
that does not answer is a ``SlurmUnreachable`` (a temporary failure: exit 75).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .config import SlurmConfig, Stream
from .errors import JobFailed, TemporaryFailure, UsageError
from .executors import container_name, parameter_environment, ror_command, substitute
from .jobrecord import SlurmInfo
from .journal import Event, Stage, Status
from .spool import Claim, Job, Queue, Spool, SpoolError, State, isotime, parse_isotime
from .station import Station
from .worker import Outcome, Tally

log = logging.getLogger(__name__)

BATCH_DIR = "slurm"          # <job>/slurm: the batch files and what the script leaves
SCRIPT = "job.sh"
ARGV = "argv"
CLEANUP = "cleanup"
EXIT = "exit"
NODE = "node"
NAME_PREFIX = "dts-"
COMMENT_PREFIX = "dts:"
COMMANDS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo", "sacct")
# The follower looks for orphaned cluster jobs every this many polls.
SWEEP_EVERY = 10
# The script's exit status when it cannot see its own folder on the node.
NOT_SHARED_EXIT = 97
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")

# Slurm's job states (squeue %T, scontrol JobState), by what dts does with them.
COMPLETED = "COMPLETED"
RERUN = frozenset({"NODE_FAIL", "PREEMPTED", "BOOT_FAIL"})   # run again, attempt counted
FAILED = frozenset({"FAILED", "OUT_OF_MEMORY", "TIMEOUT", "CANCELLED", "DEADLINE",
                    "REVOKED"})
ENDED = FAILED | RERUN | {COMPLETED}
RUNNING = frozenset({"RUNNING", "COMPLETING", "SUSPENDED", "STOPPED", "SIGNALING",
                     "STAGE_OUT", "RESIZING"})
# dts's own states of a submission before Slurm knows it (job.json slurm.state)
SUBMITTING = "SUBMITTING"     # in run/slurm, sbatch called or about to be
UNSUBMITTED = "UNSUBMITTED"   # sbatch failed for a temporary reason; back in run/new
VANISHED = "VANISHED"         # Slurm forgot the job and it left no exit code behind

# sbatch's messages that mean the controller (or munge) could not be reached: a temporary
# failure. Any other refusal is Slurm's answer about the job itself.
_UNREACHABLE = re.compile(
    r"unable to contact slurm controller|socket timed out|connection refused|"
    r"temporarily unable|zero bytes were transmitted|communication connection failure|"
    r"connection timed out|munge|protocol authentication error|network is unreachable|"
    r"no route to host|transport endpoint|slurmctld.*(busy|down)|slurm_receive_msg",
    re.IGNORECASE)

BATCH_SCRIPT = r"""#!/bin/bash
# The batch script of a dts run job on Slurm, written by dts: the same text for every job.
# Its one argument is the job's slurm/ folder as the node sees it. What it runs is in that
# folder, never in this text: argv (the processing's argv items, NUL-separated, run without
# a shell from the job's output/) and cleanup (what removes a container when Slurm stops
# the job). It leaves the node's name in node and the processing's exit code in exit.
set -u
dir=${1:?"usage: job.sh JOB/slurm"}
if ! cd -- "$dir" 2>/dev/null || [ ! -r argv ]; then
    echo "dts: $dir is not visible on $(hostname): the spool must be on a filesystem the" \
         "cluster's nodes share ([slurm] spool_path: where they see it)" >&2
    exit 97
fi
mapfile -d '' -t argv < argv
undo=()
if [ -s cleanup ]; then mapfile -d '' -t undo < cleanup; fi
child=
stop() {
    trap '' TERM INT
    if [ "${#undo[@]}" -gt 0 ]; then "${undo[@]}" >/dev/null 2>&1; fi
    if [ -n "$child" ]; then kill -TERM "$child" 2>/dev/null; wait "$child" 2>/dev/null; fi
    exit 143
}
trap stop TERM INT
hostname > node.tmp && mv -f node.tmp node
(cd ../output && exec "${argv[@]}") &
child=$!
wait "$child"
code=$?
printf '%s\n' "$code" > exit.tmp && mv -f exit.tmp exit
exit "$code"
"""


class SlurmUnreachable(TemporaryFailure):
    """slurmctld (or munge) does not answer: try again later. ``uncertain``: the request
    may have reached slurmctld all the same (a timeout, not a refused connection)."""

    def __init__(self, message: str, uncertain: bool = False) -> None:
        super().__init__(message)
        self.uncertain = uncertain


# sbatch's messages that say the request never reached slurmctld (nothing was submitted)
_NOT_SENT = re.compile(r"connect failure|connection refused|munge|no route to host|"
                       r"network is unreachable|protocol authentication error", re.IGNORECASE)


class SubmissionRefused(JobFailed):
    """sbatch refused the job; the message is Slurm's reason."""


def job_name(job_id: str) -> str:
    """The cluster job's name: ``dts-<job id>`` (characters squeue's --name list and a
    shell-less argv can carry)."""
    return NAME_PREFIX + _NAME_UNSAFE.sub("_", job_id)


def station_id(spool: Spool) -> str:
    """This station (host and spool) in a few characters: the start of its tokens, so
    that the orphan sweep cancels only cluster jobs this station submitted."""
    text = f"{socket.gethostname()}:{spool.root}"
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def new_token(spool: Spool) -> str:
    return f"{station_id(spool)}-{secrets.token_hex(6)}"


# -- what Slurm says about a job ----------------------------------------------------------


@dataclass
class ClusterJob:
    """One cluster job as squeue/scontrol/sacct (or the batch script's files) tell it."""

    job_id: str
    name: str
    state: str
    node: str | None = None
    comment: str = ""
    reason: str | None = None
    exit_code: int | None = None
    signal: int | None = None
    start: str | None = None      # ISO-8601 UTC
    end: str | None = None
    source: str = "squeue"        # squeue, scontrol, sacct, exit-file, none

    @property
    def token(self) -> str | None:
        return self.comment[len(COMMENT_PREFIX):] if self.comment.startswith(
            COMMENT_PREFIX) else None

    @property
    def ended(self) -> bool:
        return self.state in ENDED or self.state == VANISHED

    @property
    def started(self) -> bool:
        return self.state in RUNNING or (self.ended and bool(self.node))


def _state(text: str) -> str:
    """``CANCELLED by 0`` -> ``CANCELLED``; ``CANCELLED+`` (sacct) -> ``CANCELLED``."""
    return text.strip().split(" ", 1)[0].rstrip("+").upper() if text.strip() else ""


def _slurm_time(text: str | None) -> str | None:
    """Slurm's local time (``2026-12-02T05:02:43``) as ISO-8601 UTC; None for Unknown/None."""
    if not text or not text[:1].isdigit():
        return None
    try:
        return isotime(datetime.fromisoformat(text).astimezone(UTC))
    except ValueError:
        return None


def _exit_pair(text: str | None) -> tuple[int | None, int | None]:
    """``3:0`` -> (3, 0)."""
    if not text:
        return None, None
    code, _, sig = text.partition(":")
    try:
        return int(code), int(sig or 0)
    except ValueError:
        return None, None


def parse_scontrol(line: str) -> dict[str, str]:
    """``scontrol show job -o`` output as a dict (values may hold spaces: a word without
    ``=`` belongs to the value before it)."""
    out: dict[str, str] = {}
    key: str | None = None
    for word in line.strip().split(" "):
        name, eq, value = word.partition("=")
        if eq and re.match(r"^[A-Za-z][A-Za-z0-9_/:]*$", name):
            key = name
            out[key] = value
        elif key is not None and word:
            out[key] += " " + word
    return out


# -- the commands ---------------------------------------------------------------------------


class Cluster:
    """Slurm's client commands for one station, each run with a deadline."""

    def __init__(self, config: SlurmConfig) -> None:
        self.config = config
        self._accounting: bool | None = None

    def command(self, name: str) -> str:
        if self.config.bin_dir is not None:
            return str(self.config.bin_dir / name)
        return shutil.which(name) or name

    def missing(self) -> list[str]:
        """The client commands dts needs that cannot be found."""
        out = []
        for name in ("sbatch", "squeue", "scontrol", "scancel"):
            path = self.command(name)
            if not (os.path.isfile(path) and os.access(path, os.X_OK)):
                out.append(name)
        return out

    def run(self, name: str, args: list[str], env: dict[str, str] | None = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [self.command(name), *args]
        try:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                                  text=True, env=env, timeout=self.config.command_timeout,
                                  check=False)
        except subprocess.TimeoutExpired:
            raise SlurmUnreachable(f"{name} did not answer within "
                                   f"{self.config.command_timeout:g} s ([slurm] "
                                   "command_timeout)", uncertain=True) from None
        except OSError as exc:
            raise UsageError(f"cannot run {argv[0]}: {exc.strerror or exc} (install Slurm's "
                             "client commands, or set [slurm] bin_dir)") from None
        if check and proc.returncode != 0:
            raise SlurmUnreachable(f"{name} failed: {_message(proc)}")
        return proc

    # -- submitting ---------------------------------------------------------------------
    def submit(self, argv: list[str], env: dict[str, str]) -> str:
        """Run sbatch; the new job's id. SlurmUnreachable or SubmissionRefused."""
        proc = self.run("sbatch", argv, env=env, check=False)
        if proc.returncode != 0:
            message = _message(proc)
            if _UNREACHABLE.search(proc.stderr or ""):
                raise SlurmUnreachable(f"sbatch could not reach Slurm: {message}",
                                       uncertain=not _NOT_SENT.search(proc.stderr or ""))
            raise SubmissionRefused(f"sbatch refused the job: {message}")
        job_id = (proc.stdout or "").strip().splitlines()[-1:] or [""]
        value = job_id[0].split(";", 1)[0].strip()
        if not re.match(r"^[0-9]+(_[0-9]+)?$", value):
            raise SlurmUnreachable(f"sbatch answered {proc.stdout.strip()!r}, not a job id",
                                   uncertain=True)
        return value

    def cancel(self, job_id: str) -> None:
        proc = self.run("scancel", [job_id], check=False)
        if proc.returncode != 0 and "invalid job id" not in (proc.stderr or "").lower() \
                and "already completing or completed" not in (proc.stderr or "").lower():
            raise SlurmUnreachable(f"scancel {job_id} failed: {_message(proc)}")

    # -- asking -------------------------------------------------------------------------
    def queue(self, names: Iterable[str]) -> dict[str, list[ClusterJob]]:
        """Every job Slurm's controller knows by these names (finished ones too, for
        MinJobAge after their end): name -> jobs, newest first."""
        names = sorted(set(names))
        out: dict[str, list[ClusterJob]] = {n: [] for n in names}
        for i in range(0, len(names), 50):
            chunk = names[i:i + 50]
            proc = self.run("squeue", ["--noheader", "--states=all", f"--name={','.join(chunk)}",
                                       "--format=%i|%j|%T|%N|%r|%k"])
            for line in proc.stdout.splitlines():
                parts = line.split("|", 5)
                if len(parts) < 6:
                    continue
                job_id, name, state, node, reason, comment = (p.strip() for p in parts)
                if name in out:
                    out[name].append(ClusterJob(job_id=job_id, name=name, state=_state(state),
                                                node=node or None, comment=comment,
                                                reason=None if reason in ("None", "") else reason))
        for jobs in out.values():
            jobs.sort(key=lambda j: _id_key(j.job_id), reverse=True)
        return out

    def show(self, job_id: str) -> ClusterJob | None:
        """``scontrol show job``: the exit code, node and times; None when the controller
        no longer knows the job."""
        proc = self.run("scontrol", ["show", "job", "--oneliner", job_id], check=False)
        if proc.returncode != 0:
            if "invalid job id" in (proc.stderr or "").lower():
                return None
            raise SlurmUnreachable(f"scontrol show job {job_id} failed: {_message(proc)}")
        fields = parse_scontrol(proc.stdout.splitlines()[0] if proc.stdout.strip() else "")
        if not fields.get("JobId"):
            return None
        code, sig = _exit_pair(fields.get("ExitCode"))
        node = fields.get("BatchHost") or fields.get("NodeList")
        return ClusterJob(job_id=fields["JobId"], name=fields.get("JobName", ""),
                          state=_state(fields.get("JobState", "")),
                          node=None if node in (None, "", "(null)") else node,
                          comment=fields.get("Comment", "") if fields.get("Comment") != "(null)"
                          else "", reason=fields.get("Reason"), exit_code=code, signal=sig,
                          start=_slurm_time(fields.get("StartTime")),
                          end=_slurm_time(fields.get("EndTime")), source="scontrol")

    def accounting(self) -> bool:
        """Is job accounting configured (so that sacct knows finished jobs)?"""
        if self._accounting is None:
            proc = self.run("scontrol", ["show", "config"])
            kind = re.search(r"^AccountingStorageType\s*=\s*(\S+)", proc.stdout, re.MULTILINE)
            self._accounting = bool(kind and kind.group(1) not in ("accounting_storage/none",
                                                                  "(null)"))
        return self._accounting

    def sacct(self, name: str) -> list[ClusterJob]:
        fields = "JobID,JobName,State,ExitCode,NodeList,Comment,Start,End"
        proc = self.run("sacct", ["--noheader", "--parsable2", "--allocations",
                                  f"--name={name}", "--starttime=now-30days",
                                  f"--format={fields}"])
        out = []
        for line in proc.stdout.splitlines():
            parts = line.split("|")
            if len(parts) < 8 or parts[1] != name:
                continue
            code, sig = _exit_pair(parts[3])
            out.append(ClusterJob(job_id=parts[0], name=parts[1], state=_state(parts[2]),
                                  exit_code=code, signal=sig, node=parts[4] or None,
                                  comment=parts[5], start=_slurm_time(parts[6]),
                                  end=_slurm_time(parts[7]), source="sacct"))
        return sorted(out, key=lambda j: _id_key(j.job_id), reverse=True)

    def mine(self) -> list[ClusterJob]:
        """The submitting user's jobs that are pending or running (squeue's default)."""
        proc = self.run("squeue", ["--noheader", "--me", "--format=%i|%j|%T|%k"])
        out = []
        for line in proc.stdout.splitlines():
            parts = [p.strip() for p in line.split("|", 3)]
            if len(parts) == 4:
                out.append(ClusterJob(job_id=parts[0], name=parts[1], state=_state(parts[2]),
                                      comment=parts[3]))
        return out

    def nodes(self) -> list[tuple[str, str]]:
        """(node name, node address) of every node of the cluster."""
        proc = self.run("sinfo", ["--noheader", "--Node", "--format=%N|%o"])
        pairs = {tuple(p.strip() for p in line.split("|", 1)) for line in
                 proc.stdout.splitlines() if "|" in line}
        return sorted((a, b) for a, b in pairs)


def _id_key(job_id: str) -> tuple[int, int]:
    base, _, task = job_id.partition("_")
    try:
        return int(base), int(task or 0)
    except ValueError:
        return 0, 0


def _message(proc: subprocess.CompletedProcess[str]) -> str:
    """Slurm's own words: the last error line(s), without the ``sbatch: error:`` prefix."""
    lines = [re.sub(r"^\S+: error:\s*", "", ln).strip()
             for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
    failed = [ln for ln in lines if "submission failed" in ln.lower()]
    text = failed[-1] if failed else "; ".join(lines[-2:])
    text = re.sub(r"^Batch job submission failed:\s*", "", text)
    return text or f"exit status {proc.returncode}"


# -- the batch files -------------------------------------------------------------------


@dataclass(frozen=True)
class Paths:
    """A job's folders as the nodes see them (``[slurm] spool_path``)."""

    spool: Spool
    config: SlurmConfig

    def node(self, path: Path) -> str:
        if self.config.spool_path is None:
            return str(path)
        return str(self.config.spool_path / path.relative_to(self.spool.root))


def sbatch_minutes(timeout: float) -> int:
    """The stream's timeout as sbatch ``--time`` minutes (Slurm counts whole minutes)."""
    return max(1, math.ceil(timeout / 60))


def sbatch_memory(memory: str) -> str:
    """A stream's ``memory`` (``512m``, ``8g``, bytes) as sbatch ``--mem`` (MiB)."""
    m = re.match(r"^(\d+(?:\.\d+)?)([bkmgBKMG]?)$", memory.strip())
    if not m:
        raise JobFailed(f"memory = {memory!r}: not a size sbatch understands")
    scale = {"": 1, "b": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}[m.group(2).lower()]
    return f"{max(1, math.ceil(float(m.group(1)) * scale / 1024 ** 2))}M"


def environment(job: Job, stream: Stream, view: str, output: str) -> dict[str, str]:
    """The environment sbatch passes to the job (``--export=ALL``): dts's own without
    ``DTS_*``, the stream's parameters, ``DTS_PARAMETERS``, ``DTS_JOB``, ``DTS_INPUT``,
    ``DTS_OUTPUT`` (for an image, the paths inside the container)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DTS_")}
    env.update(parameter_environment(stream))
    if stream.image:
        ror = stream.contract == "ror"
        env.update(DTS_INPUT="/data/input" if ror else "/input", DTS_OUTPUT="/output")
    else:
        env.update(DTS_INPUT=view, DTS_OUTPUT=output)
    env["DTS_JOB"] = job.id
    return env


def processing_argv(job: Job, stream: Stream, cfg: SlurmConfig, paths: Paths,
                    names: Iterable[str]) -> tuple[list[str], list[str]]:
    """(what the batch script runs, what it runs to clean up when stopped)."""
    view = paths.node(job.path / "view")
    output = paths.node(job.output_dir)
    if not stream.image:
        assert stream.command is not None
        argv = substitute(stream.command, {"input": view, "output": output, "job": job.id,
                                           "python": sys.executable})
        return argv, []
    for p in (view, output):
        if ":" in p or "," in p:
            raise JobFailed(f"the job's folder {p} holds ':' or ',', which podman's volume "
                            "option cannot carry: move the spool")
    ror = stream.contract == "ror"
    inside = "/data" if ror else "/input"
    name = container_name(job.id)
    runtime = list(cfg.runtime_command)
    argv = [*runtime, "run", "--rm", "--replace", f"--name={name}",
            f"--label=dts.job={job.id}", f"--label=dts.stream={stream.name}",
            "--security-opt=no-new-privileges", f"--pull={'missing' if stream.pull else 'never'}",
            f"--volume={view}:{inside}:ro", f"--volume={output}:/output:rw"]
    if not stream.network:
        argv.append("--network=none")
    for var in sorted(set(names)):
        argv.append(f"--env={var}")   # the value comes from the job's environment
    if stream.memory:
        mem = stream.memory.lower()
        argv += [f"--memory={mem}", f"--memory-swap={mem}"]
    if stream.cpus:
        argv.append(f"--cpus={stream.cpus:g}")
    if stream.user:
        argv.append(f"--user={stream.user}")
    argv += list(cfg.container_options)
    assert stream.image is not None
    argv.append(stream.image)
    if ror and stream.call:
        argv += ror_command(stream.call)
    return argv, [*runtime, "rm", "--force", "--time=0", name]


def sbatch_argv(job: Job, stream: Stream, cfg: SlurmConfig, paths: Paths,
                token: str) -> list[str]:
    """sbatch's options and the script; every value one argv item, never a shell text."""
    folder = job.path / BATCH_DIR
    argv = ["--parsable", f"--job-name={job_name(job.id)}", f"--comment={COMMENT_PREFIX}{token}",
            "--no-requeue", "--export=ALL", f"--chdir={paths.node(folder)}",
            f"--output={paths.node(job.logs_dir / 'run-stdout.log')}",
            f"--error={paths.node(job.logs_dir / 'run-stderr.log')}",
            f"--time={sbatch_minutes(stream.timeout)}"]
    if cfg.partition:
        argv.append(f"--partition={cfg.partition}")
    if cfg.account:
        argv.append(f"--account={cfg.account}")
    if cfg.qos:
        argv.append(f"--qos={cfg.qos}")
    if stream.memory:
        argv.append(f"--mem={sbatch_memory(stream.memory)}")
    if stream.cpus:
        argv.append(f"--cpus-per-task={math.ceil(stream.cpus)}")
    if stream.gpus:
        argv.append(f"--gres=gpu:{int(stream.gpus)}")
    argv += list(cfg.options)
    # the script as this host reads it (sbatch sends its text), its folder as nodes see it
    argv += [str(folder / SCRIPT), paths.node(folder)]
    return argv


def _nul_file(path: Path, items: list[str]) -> None:
    if any("\0" in item for item in items):
        raise JobFailed("an argv item holds a NUL byte")
    path.write_bytes(b"".join(item.encode() + b"\0" for item in items))


def write_batch(job: Job, stream: Stream, cfg: SlurmConfig, spool: Spool,
                token: str) -> tuple[list[str], dict[str, str], list[str]]:
    """Write ``<job>/slurm/`` (script, argv, cleanup) for the job where it is now (in
    run/slurm/); (sbatch's arguments, its environment, the processing's argv)."""
    paths = Paths(spool, cfg)
    folder = job.path / BATCH_DIR
    shutil.rmtree(folder, ignore_errors=True)  # what an earlier attempt left
    folder.mkdir()
    job.logs_dir.mkdir(exist_ok=True)
    for name in ("run-stdout.log", "run-stderr.log"):
        (job.logs_dir / name).unlink(missing_ok=True)
    env = environment(job, stream, paths.node(job.path / "view"), paths.node(job.output_dir))
    names = [*parameter_environment(stream), "DTS_JOB", "DTS_INPUT", "DTS_OUTPUT"]
    argv, cleanup = processing_argv(job, stream, cfg, paths, names)
    script = folder / SCRIPT
    script.write_text(BATCH_SCRIPT)
    script.chmod(0o755)
    _nul_file(folder / ARGV, argv)
    _nul_file(folder / CLEANUP, cleanup)
    return sbatch_argv(job, stream, cfg, paths, token), env, argv


def left_by_script(job: Job, info: SlurmInfo) -> ClusterJob | None:
    """What the batch script left in the job (exit code, node): the last word on a job
    Slurm no longer knows."""
    folder = job.path / BATCH_DIR
    try:
        code = int((folder / EXIT).read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        node: str | None = (folder / NODE).read_text().strip() or None
    except OSError:
        node = info.get("node")
    return ClusterJob(job_id=str(info.get("job_id") or ""), name=str(info.get("name") or ""),
                      state=COMPLETED if code == 0 else "FAILED", node=node,
                      comment=COMMENT_PREFIX + str(info.get("token") or ""), exit_code=code,
                      source="exit-file")


def script_node(job: Job) -> str | None:
    """The node the batch script started on (None: it never started, or not visibly)."""
    try:
        return (job.path / BATCH_DIR / NODE).read_text().strip() or None
    except OSError:
        return None


# -- the start check ----------------------------------------------------------------------

_LOCAL_FS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "overlay", "f2fs",
                       "vfat", "exfat", "zfs", "ramfs", "reiserfs", "jfs"})


def filesystem_type(path: Path) -> str | None:
    """The type of the filesystem ``path`` is on (/proc/self/mountinfo)."""
    try:
        target = os.path.realpath(path)
        best, kind = "", None
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                left, _, right = line.partition(" - ")
                fields, rest = left.split(), right.split()
                if len(fields) < 5 or not rest:
                    continue
                mount = fields[4].replace("\\040", " ")
                if (target == mount or target.startswith(mount.rstrip("/") + "/")) and \
                        len(mount) >= len(best):
                    best, kind = mount, rest[0]
        return kind
    except OSError:
        return None


def _this_host(name: str, address: str) -> bool:
    host = socket.gethostname()
    if name in (host, host.split(".")[0]) or address in (host, host.split(".")[0]):
        return True
    if address.startswith("127.") or address in ("::1", "localhost"):
        return True
    try:
        return address == socket.gethostbyname(host)
    except OSError:
        return False


def shared_verdict(fs_type: str | None, nodes: list[tuple[str, str]]) -> str | None:
    """Why the spool cannot be shared with these nodes, or None (it can be)."""
    others = [n for n, addr in nodes if not _this_host(n, addr)]
    if fs_type in _LOCAL_FS and others:
        shown = ", ".join(others[:5]) + (" ..." if len(others) > 5 else "")
        return (f"it is on a local filesystem of this host ({fs_type}), and the cluster's "
                f"nodes {shown} are other machines")
    return None


def check_ready(station: Station) -> list[str]:
    """At the start of ``dts run``/``dts watch`` with a Slurm stream: Slurm's commands are
    there, ``[slurm] spool_path`` shows this spool, and the spool is on a filesystem the
    nodes can share. UsageError (exit 2) naming the problem; warnings (a list) for what
    could not be checked now."""
    cfg = station.config.slurm
    cluster = Cluster(cfg)
    missing = cluster.missing()
    if missing:
        raise UsageError(f"executor = \"slurm\": {', '.join(missing)} not found "
                         f"({'in ' + str(cfg.bin_dir) if cfg.bin_dir else 'on PATH'}): "
                         "install Slurm's client commands, or set [slurm] bin_dir")
    spool = station.spool
    node_root = cfg.spool_path or spool.root
    if cfg.spool_path is not None:
        probe = spool.tmp / f".slurm-probe-{secrets.token_hex(8)}"
        probe.write_text(probe.name)
        try:
            seen = (cfg.spool_path / "tmp" / probe.name).read_text()
        except OSError:
            seen = None
        finally:
            probe.unlink(missing_ok=True)
        if seen != probe.name:
            raise UsageError(f"[slurm] spool_path = {cfg.spool_path}: it does not show this "
                             f"station's spool {spool.root} (a probe file written there is "
                             "not visible under it); give the path under which this host "
                             "and the nodes see the spool")
    warnings: list[str] = []
    if cfg.assume_shared:
        return warnings
    try:
        nodes = cluster.nodes()
    except (SlurmUnreachable, UsageError) as exc:
        warnings.append(f"could not list the cluster's nodes to check that the spool is "
                        f"shared with them: {exc}")
        return warnings
    why = shared_verdict(filesystem_type(node_root), nodes)
    if why:
        raise UsageError(f"the spool {node_root} cannot be seen by the cluster's nodes: {why}. "
                         "Put the spool on the filesystem the nodes share (and set [slurm] "
                         "spool_path if they mount it elsewhere), or set [slurm] "
                         "assume_shared = true if they mount this host's disk")
    return warnings


# -- following ---------------------------------------------------------------------------

Collect = Callable[[Claim, ClusterJob], Outcome]
OnResult = Callable[[str, Outcome], None]


@dataclass
class Follower:
    """Follows the jobs in ``run/slurm/`` on the cluster: one ``poll`` asks squeue about all
    of them at once, records state changes (``started`` with the node), hands ended ones
    to ``collect`` (the run stage) and resolves interrupted submissions."""

    station: Station
    collect: Collect
    on_result: OnResult | None = None
    wake: Callable[[], None] | None = None
    cluster: Cluster = field(init=False)
    down_since: float | None = field(default=None, init=False)
    polls: int = field(default=0, init=False)
    suspects: set[str] = field(default_factory=set, init=False)

    def __post_init__(self) -> None:
        self.cluster = Cluster(self.station.config.slurm)

    @property
    def interval(self) -> float:
        return self.station.config.slurm.poll_interval

    def serve(self, stop: threading.Event) -> Tally:
        """Poll every ``[slurm] poll_interval`` until ``stop``."""
        tally = Tally()
        while not stop.is_set():
            try:
                tally.merge(self.poll())
            except Exception:
                log.exception("following the Slurm jobs failed")
            stop.wait(self.interval)
        return tally

    def follow(self, job_ids: set[str], stop: threading.Event) -> Tally:
        """Poll until none of ``job_ids`` is on the cluster any more (``dts run JOB``)."""
        tally = Tally()
        spool = self.station.spool
        while not stop.is_set():
            tally.merge(self.poll())
            if not job_ids & set(spool.list(Queue.RUN, State.SLURM)):
                break
            stop.wait(self.interval)
        return tally

    def poll(self) -> Tally:
        tally = Tally()
        spool = self.station.spool
        self.polls += 1
        if self.polls % SWEEP_EVERY == 1:
            try:
                self.sweep()
            except (SlurmUnreachable, UsageError) as exc:
                log.warning("looking for orphaned cluster jobs failed: %s", exc)
        folder = spool.dir(Queue.RUN, State.SLURM)
        infos: dict[str, SlurmInfo] = {}
        for job_id in spool.list(Queue.RUN, State.SLURM):
            try:
                infos[job_id] = Job(folder / job_id).read().get("slurm") or {}
            except SpoolError:
                infos[job_id] = {}
        if not infos:
            return tally
        asked = isotime()
        try:
            known = self.cluster.queue(str(i.get("name") or job_name(j)) for j, i in infos.items())
        except SlurmUnreachable as exc:
            self._down(str(exc))
            for job_id in infos:
                tally.add(job_id, Outcome.RETRY)
            return tally
        self._up()
        for job_id in infos:
            claim = spool.hold(job_id, Queue.RUN, State.SLURM)
            if claim is None:
                continue  # another follower has it this moment, or it moved on
            with claim:
                try:
                    outcome = self._step(claim, known, asked)
                except SlurmUnreachable as exc:
                    self._down(str(exc))
                    outcome = Outcome.RETRY
            if outcome is None:
                continue
            tally.add(job_id, outcome)
            if self.on_result is not None:
                try:
                    self.on_result(job_id, outcome)
                except Exception:
                    log.exception("on_result failed")
        if self.wake is not None and len(spool.list(Queue.RUN, State.SLURM)) < len(infos):
            self.wake()  # a slot of max_submitted is free: run/new may submit again
        return tally

    def sweep(self) -> list[str]:
        """Cancel the cluster jobs this station submitted whose dts job is no longer in
        run/ (its folder removed or moved by hand): seen so in two sweeps in a row, so a
        job moving between run/ folders at the moment of looking is never taken for one."""
        spool = self.station.spool
        prefix = station_id(spool) + "-"
        active = [j for j in self.cluster.mine()
                  if (j.token or "").startswith(prefix) and not j.ended]
        names = {job_name(j) for state in (State.SLURM, State.CUR, State.NEW)
                 for j in spool.list(Queue.RUN, state)}
        candidates = {j.job_id for j in active if j.name not in names}
        confirmed, self.suspects = candidates & self.suspects, candidates - self.suspects
        for j in active:
            if j.job_id not in confirmed:
                continue
            self.cluster.cancel(j.job_id)
            self.station.journal.emit(Stage.RUN, Event.ORPHAN_STOPPED, Status.WARNING,
                                      f"cancelled slurm job {j.job_id} ({j.name}): its dts "
                                      "job is no longer in run/ (removed by hand?)",
                                      slurm_job_id=j.job_id, slurm_name=j.name)
        return sorted(confirmed)

    def _step(self, claim: Claim, known: dict[str, list[ClusterJob]],
              asked: str) -> Outcome | None:
        job = claim.job
        data = job.read()
        info: SlurmInfo = data.get("slurm") or {}
        name = str(info.get("name") or job_name(job.id))
        token = info.get("token")
        mine = [j for j in known.get(name, []) if token and j.token == token]
        cj = next((j for j in mine if j.job_id == str(info.get("job_id"))), None) or \
            (mine[0] if mine else None)
        if cj is None and str(info.get("submitted_at") or "") >= asked:
            return None  # submitted after squeue answered: asked about in the next round
        if cj is None and not info.get("job_id"):
            return self._unsubmitted(claim, data, info)
        if cj is None:
            cj = self._after_the_controller(job, info)
        elif cj.ended:
            cj = self.cluster.show(cj.job_id) or cj  # the exit code, the node, the times
        changed = self._record(claim, data, info, cj)
        if not cj.ended:
            if changed:
                job.write(data)
            return None
        job.write(data)
        claim.move_keep(Queue.RUN, State.CUR)
        return self.collect(claim, cj)

    def _after_the_controller(self, job: Job, info: SlurmInfo) -> ClusterJob:
        """A submitted job the controller no longer lists: sacct (where accounting is
        configured), then the batch script's exit file; else it vanished."""
        name, token = str(info.get("name") or job_name(job.id)), info.get("token")
        if self.cluster.accounting():
            rows = [j for j in self.cluster.sacct(name) if j.token == token]
            match = next((j for j in rows if j.job_id == str(info.get("job_id"))), None) or \
                (rows[0] if rows else None)
            if match is not None and match.ended:
                return match
            if match is not None:
                return match
        left = left_by_script(job, info)
        if left is not None:
            return left
        return ClusterJob(job_id=str(info.get("job_id") or ""), name=name, state=VANISHED,
                          comment=COMMENT_PREFIX + str(token or ""), node=info.get("node"),
                          source="none")

    def _unsubmitted(self, claim: Claim, data: Any, info: SlurmInfo) -> Outcome | None:
        """In run/slurm/ with no job id and unknown to Slurm: its dts died between moving it
        here and recording sbatch's answer. Wait until an sbatch it started cannot still
        land (``command_timeout``), then put it back to run/new: it is submitted again
        there, after one more look by name."""
        since = info.get("submitting_at")
        grace = self.station.config.slurm.command_timeout
        try:
            age = time.time() - parse_isotime(str(since)).timestamp() if since else grace
        except ValueError:
            age = grace
        if age < grace:
            return None
        data["attempts"] = int(data.get("attempts") or 0) + 1
        info["state"] = UNSUBMITTED
        data["slurm"] = info
        claim.job.write(data)
        self.station.journal.emit(Stage.RUN, Event.RECOVERED, Status.WARNING,
                                  f"{claim.id}: its submission to Slurm was interrupted and "
                                  "Slurm does not know it; moved back to run/new",
                                  job=claim.job, job_data=data)
        claim.move(Queue.RUN)
        return Outcome.RETRY

    def _record(self, claim: Claim, data: Any, info: SlurmInfo, cj: ClusterJob) -> bool:
        """Note what Slurm says in job.json (and ``started`` once it ran); changed?"""
        before = dict(info)
        if cj.job_id:
            info["job_id"] = cj.job_id
        info["state"] = cj.state
        if cj.node:
            info["node"] = cj.node
        if cj.reason and cj.reason != "None":
            info["reason"] = cj.reason
        else:
            info.pop("reason", None)
        if cj.started and not info.get("started_at"):
            info["started_at"] = cj.start or isotime()
            node = cj.node or script_node(claim.job) or "?"
            info["node"] = node
            data["slurm"] = info
            self.station.journal.emit(
                Stage.RUN, Event.STARTED, Status.INFO,
                f"slurm job {cj.job_id} running on {node}", job=claim.job, job_data=data,
                executor="slurm", slurm_job_id=cj.job_id, node=node,
                attempt=int(data.get("attempts") or 0) + 1)
        data["slurm"] = info
        return dict(info) != before

    def _down(self, message: str) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            self.station.journal.emit(Stage.RUN, Event.SLURM_UNREACHABLE, Status.WARNING,
                                      f"{message}; the jobs on the cluster are followed again "
                                      "when it answers")
        log.warning("%s", message)

    def _up(self) -> None:
        if self.down_since is not None:
            log.info("Slurm answers again after %.0f s", time.monotonic() - self.down_since)
            self.down_since = None


def follow_jobs(station: Station) -> bool:
    """Does this station need a follower: a Slurm stream, or jobs on the cluster?"""
    return any(s.executor == "slurm" and s.enabled for s in station.config.streams) or \
        bool(station.spool.list(Queue.RUN, State.SLURM))


def cancel(station: Station, info: SlurmInfo) -> str | None:
    """scancel the cluster job of a job record (``dts requeue``); its id, or None when
    there was none to cancel."""
    job_id = info.get("job_id")
    if not job_id or info.get("collected_at"):
        return None
    Cluster(station.config.slurm).cancel(str(job_id))
    return str(job_id)


def submitted_count(spool: Spool) -> int:
    return len(spool.list(Queue.RUN, State.SLURM))


def cluster_jobs(spool: Spool) -> list[dict[str, Any]]:
    """The jobs on the cluster as job.json records them (``dts status``)."""
    out = []
    folder = spool.dir(Queue.RUN, State.SLURM)
    for job_id in spool.list(Queue.RUN, State.SLURM):
        try:
            info = Job(folder / job_id).read().get("slurm") or {}
        except SpoolError:
            info = {}
        out.append({"job": job_id, "slurm_job_id": info.get("job_id"),
                    "state": info.get("state"), "node": info.get("node"),
                    "submitted_at": info.get("submitted_at"),
                    "started_at": info.get("started_at")})
    return out
