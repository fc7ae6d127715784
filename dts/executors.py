"""Owns how a stream's processing is run: in a container (Docker Engine API) or as a command.

Both executors keep one contract (README "What the processing sees"): the processing reads a
prepared input view (``/input`` in a container, ``{input}`` for a command), writes
into an output folder, gets the stream's parameters and ``DTS_INPUT``,
``DTS_OUTPUT``, ``DTS_JOB`` in its environment, is killed at its timeout, and its
stdout/stderr end up in the job's ``logs/``. An executor reports what happened as
a ``RunResult``; deciding what that means for the job is the runner's business.
An unreachable engine is a ``TemporaryFailure``; a missing image a ``JobFailed``.

Nothing from the DICOM data or the configuration ever passes through a shell:
commands are argv lists, containers get their environment and mounts through
the API.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Stream
from .errors import JobFailed, TemporaryFailure
from .jobrecord import RunningInfo

JOB_LABEL = "dts.job"
STREAM_LABEL = "dts.stream"
STDOUT_LOG = "run-stdout.log"
STDERR_LOG = "run-stderr.log"
_PLACEHOLDER = re.compile(r"\{(input|output|job|python)\}")
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
# how often a waiting run looks at its cancel event
_SLICE = 2.0


class Cancelled(Exception):
    """The run was stopped because the station is shutting down (not the job's fault)."""


@dataclass
class Task:
    """One run: where the input view and output are, and what to run them with."""

    job_id: str
    stream: Stream
    input_dir: Path      # the prepared view: <selection>/<series>/*.dcm and task.json
    output_dir: Path
    logs_dir: Path
    environment: dict[str, str]   # stream parameters and DTS_PARAMETERS (DTS_INPUT... added)


@dataclass
class RunResult:
    exit_code: int | None
    duration: float
    reason: str | None = None     # None: ran to its end; "timeout", "oom"
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.reason is None and self.exit_code == 0


def parameter_environment(stream: Stream) -> dict[str, str]:
    if stream.contract == "ror":
        # as `ror trigger --envs` set it: the options object as one JSON string (compact,
        # so the predecessor's ROR_CONT_OPTIONS text comes out as it was written)
        ror = {"DTS_PARAMETERS": json.dumps(stream.options, sort_keys=True)}
        if stream.options:
            ror["ROR_CONT_OPTIONS"] = json.dumps(stream.options, separators=(",", ":"))
        return ror
    env = dict(stream.parameters)
    env["DTS_PARAMETERS"] = json.dumps(stream.parameters, sort_keys=True)
    return env


# ror's call string placeholders (ror.go callProgram), as seen inside the container.
# Deliberate difference: ror put {output} and {output_json} under the read-only /data;
# here they are in /output, the folder that is kept.
ROR_PLACEHOLDERS = (("{}", "/data/"), ("{input}", "/data/input"), ("{output}", "/output"),
                    ("{descr}", "/data/descr.json"), ("{output_json}", "/output/output.json"))


def ror_command(call: str) -> list[str]:
    """ror's call string as the container's argv: placeholders first, then split as a
    shell would (quotes, backslashes), never run through one."""
    for placeholder, value in ROR_PLACEHOLDERS:
        call = call.replace(placeholder, value)
    return shlex.split(call)


def container_name(job_id: str) -> str:
    return "dts-" + _NAME_UNSAFE.sub("_", job_id)[:200]


def log_tail(logs_dir: Path, lines: int = 20, limit: int = 4000) -> str:
    """The last lines of the run's stderr (or stdout if stderr is empty), for error reports."""
    for name in (STDERR_LOG, STDOUT_LOG):
        try:
            with open(logs_dir / name, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                fh.seek(max(0, size - 64 * 1024))
                text = fh.read().decode("utf-8", "replace")
        except FileNotFoundError:
            continue
        text = "\n".join(text.rstrip().splitlines()[-lines:])
        if text.strip():
            return text[-limit:]
    return ""


# -- command executor ------------------------------------------------------------


def substitute(argv: tuple[str, ...] | list[str], values: dict[str, str]) -> list[str]:
    """Replace ``{input}``, ``{output}``, ``{job}``, ``{python}`` inside argv items; any
    other brace text stays as written. The result is an argv list, never a shell line."""
    return [_PLACEHOLDER.sub(lambda m: values[m.group(1)], item) for item in argv]


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (field 22 of /proc/PID/stat), to tell a
    recycled pid from the process we started."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read().decode("ascii", "replace")
    except OSError:
        return None
    return data.rsplit(")", 1)[-1].split()[19]


class CommandExecutor:
    """Runs the stream's ``command`` on the host, in a process group of its own."""

    kind = "command"

    def run(self, task: Task, *, cancel: threading.Event | None = None,
            started: Callable[[dict[str, Any]], None] | None = None) -> RunResult:
        assert task.stream.command is not None
        argv = substitute(task.stream.command, {
            "input": str(task.input_dir), "output": str(task.output_dir),
            "job": task.job_id, "python": sys.executable})
        env = {k: v for k, v in os.environ.items() if not k.startswith("DTS_")}
        env.update(task.environment)
        env.update(DTS_INPUT=str(task.input_dir), DTS_OUTPUT=str(task.output_dir),
                   DTS_JOB=task.job_id)
        task.logs_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        with open(task.logs_dir / STDOUT_LOG, "wb") as out, \
                open(task.logs_dir / STDERR_LOG, "wb") as err:
            user, _, group = (task.stream.user or "").partition(":")
            try:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                        env=env, cwd=task.output_dir, start_new_session=True,
                                        close_fds=True, user=_id(user), group=_id(group))
            except (OSError, ValueError) as exc:
                raise JobFailed(f"cannot start {argv[0]!r}"
                                f"{' as ' + str(task.stream.user) if task.stream.user else ''}: "
                                f"{getattr(exc, 'strerror', None) or exc}") from None
            if started is not None:
                started({"executor": self.kind, "pid": proc.pid,
                         "start_time": process_start_time(proc.pid)})
            reason = _wait_process(proc, task.stream.timeout, cancel)
        return RunResult(exit_code=proc.returncode, duration=time.monotonic() - t0,
                         reason=reason, provenance={"executor": self.kind, "command": argv})


def _id(text: str) -> int | str | None:
    """A user or group for Popen: a number, a name, or None (as dts itself runs)."""
    return None if not text else int(text) if text.isdigit() else text


def _wait_process(proc: subprocess.Popen[bytes], timeout: float,
                  cancel: threading.Event | None) -> str | None:
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            kill_group(proc.pid)
            proc.wait()
            return "timeout"
        try:
            proc.wait(min(remaining, _SLICE if cancel is not None else remaining))
        except subprocess.TimeoutExpired:
            if cancel is not None and cancel.is_set():
                kill_group(proc.pid)
                proc.wait()
                raise Cancelled() from None
            continue
        # the leader is gone; children it left behind in its group go with it
        kill_group(proc.pid)
        return None


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def stop_processes_of_job(job_id: str, skip_pgid: int | None = None) -> list[int]:
    """Kill the process groups of every process that runs with ``DTS_JOB=<job_id>``.

    This closes the window between starting a command and recording its pid in
    job.json: a ``dts run`` killed inside it leaves a process that only its
    environment identifies. Called under the job's lock, when no live worker can be
    running that job, so every such process is an orphan.
    """
    marker = f"DTS_JOB={job_id}".encode()
    # a command on the host has its output folder in the job; a container sees /output
    # and is the engine's to remove (by its dts.job label), not ours to kill
    output_suffix = f"/{job_id}/output".encode()
    killed: list[int] = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                env = fh.read().split(b"\0")
        except OSError:
            continue  # gone, or not ours to read
        if marker in env and any(v.startswith(b"DTS_OUTPUT=") and v.endswith(output_suffix)
                                 for v in env):
            pid = int(entry)
            try:
                pgid = os.getpgid(pid)
            except ProcessLookupError:
                continue
            if pgid == skip_pgid:
                continue  # already killed as the recorded process group
            if pgid != os.getpgid(0):
                kill_group(pgid)
            else:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
            killed.append(pid)
    return killed


def stop_orphaned_process(info: RunningInfo) -> bool:
    """Kill the process group a dead ``dts run`` left running (job.json ``running``);
    True if there was one."""
    pid = info.get("pid")
    if not isinstance(pid, int) or pid <= 1:
        return False
    if info.get("start_time") is None or process_start_time(pid) != info.get("start_time"):
        return False  # gone, or the pid belongs to someone else by now
    kill_group(pid)
    return True


# -- docker executor ---------------------------------------------------------------


def _docker() -> Any:
    import docker  # imported lazily: the command executor works without an engine

    return docker


def engine_address() -> str:
    return os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"


def connect(timeout: float = 60.0) -> Any:
    """A docker client for ``DOCKER_HOST``; TemporaryFailure if the engine does not answer."""
    docker = _docker()
    try:
        client = docker.from_env(timeout=int(timeout))
        client.ping()
    except Exception as exc:
        raise TemporaryFailure(f"container engine at {engine_address()} is unreachable: "
                               f"{_short(exc)}") from None
    return client


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 300 else text[:300] + "..."


def device_requests(gpus: str | None) -> list[Any]:
    """``gpus`` as in ``docker run --gpus``: "all", a count, or "device=0,1"."""
    if not gpus:
        return []
    docker = _docker()
    value = gpus.strip()
    if value == "all":
        return [docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])]
    if value.isdigit():
        return [docker.types.DeviceRequest(count=int(value), capabilities=[["gpu"]])]
    if value.startswith("device="):
        ids = [d.strip() for d in value[len("device="):].split(",") if d.strip()]
        return [docker.types.DeviceRequest(device_ids=ids, capabilities=[["gpu"]])]
    raise JobFailed(f"gpus = {gpus!r}: expected 'all', a number, or 'device=0,1'")


def remove_job_containers(client: Any, job_id: str) -> list[str]:
    """Force-remove every container labelled with ``job_id``; their short ids."""
    removed = []
    for c in client.containers.list(all=True, filters={"label": f"{JOB_LABEL}={job_id}"}):
        try:
            c.remove(force=True)
        except _docker().errors.NotFound:
            pass
        removed.append(c.short_id)
    return removed


class DockerExecutor:
    """Runs the stream's ``image`` through the Docker Engine API (Docker or podman)."""

    kind = "docker"

    def run(self, task: Task, *, cancel: threading.Event | None = None,
            started: Callable[[dict[str, Any]], None] | None = None) -> RunResult:
        docker = _docker()
        stream = task.stream
        assert stream.image is not None
        client = connect()
        try:
            image = self._image(client, stream)
            remove_job_containers(client, task.job_id)  # left by an earlier attempt
            env = dict(task.environment)
            ror = stream.contract == "ror"
            inside = "/data" if ror else "/input"
            env.update(DTS_INPUT=inside + "/input" if ror else inside, DTS_OUTPUT="/output",
                       DTS_JOB=task.job_id)
            kwargs: dict[str, Any] = dict(
                name=container_name(task.job_id),
                environment=env,
                volumes={str(task.input_dir): {"bind": inside, "mode": "ro"},
                         str(task.output_dir): {"bind": "/output", "mode": "rw"}},
                labels={JOB_LABEL: task.job_id, STREAM_LABEL: stream.name},
                security_opt=["no-new-privileges"],
                detach=True,
            )
            if ror and stream.call:
                kwargs["command"] = ror_command(stream.call)
            if not stream.network:
                kwargs["network_mode"] = "none"
            if stream.memory:
                # no swap beyond the limit: a model over its memory is stopped, not slowed
                kwargs["mem_limit"] = kwargs["memswap_limit"] = _memory(stream.memory)
            if stream.cpus:
                kwargs["nano_cpus"] = int(stream.cpus * 1e9)
            if stream.user:
                kwargs["user"] = stream.user
            if stream.gpus:
                kwargs["device_requests"] = device_requests(stream.gpus)
            try:
                container = client.containers.create(image.id, **kwargs)
            except docker.errors.APIError as exc:
                if _engine_side(exc):
                    raise TemporaryFailure(f"container engine refused to create the container: "
                                           f"{_short(exc)}") from None
                raise JobFailed(f"cannot create the container: {_short(exc)}") from None
            try:
                result = self._run(client, container, task, image, cancel, started)
                if ror:
                    result.provenance["contract"] = "ror"
                    if "command" in kwargs:
                        result.provenance["command"] = kwargs["command"]
                return result
            finally:
                try:
                    container.remove(force=True)
                except Exception:
                    pass  # on_recovered / the next attempt find it by its label
        except (TemporaryFailure, JobFailed, Cancelled):
            raise
        except docker.errors.APIError as exc:
            if not _alive(client):
                raise TemporaryFailure(f"lost the container engine at {engine_address()}: "
                                       f"{_short(exc)}") from None
            raise JobFailed(f"container engine error: {_short(exc)}") from None
        except Exception as exc:  # connection lost mid-run and the like
            if not _alive(client):
                raise TemporaryFailure(f"lost the container engine at {engine_address()}: "
                                       f"{_short(exc)}") from None
            raise
        finally:
            client.close()

    def _image(self, client: Any, stream: Stream) -> Any:
        docker = _docker()
        assert stream.image is not None
        try:
            return client.images.get(stream.image)
        except docker.errors.ImageNotFound:
            if not stream.pull:
                raise JobFailed(
                    f"image {stream.image!r} is not present on the container engine at "
                    f"{engine_address()}; load it there (docker/podman load or build) or set "
                    "pull = true in the stream") from None
        try:
            return client.images.pull(stream.image)
        except docker.errors.APIError as exc:
            raise JobFailed(f"cannot pull image {stream.image!r}: {_short(exc)}") from None

    def _run(self, client: Any, container: Any, task: Task, image: Any,
             cancel: threading.Event | None,
             started: Callable[[dict[str, Any]], None] | None) -> RunResult:
        stream = task.stream
        if started is not None:
            started({"executor": self.kind, "container": container.id,
                     "engine": engine_address()})
        t0 = time.monotonic()
        container.start()
        deadline = t0 + stream.timeout
        reason: str | None = None
        status: dict[str, Any] | None = None
        while status is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                _kill(container)
                reason = "timeout"
                status = container.wait(timeout=60)
                break
            if cancel is not None and cancel.is_set():
                _kill(container)
                raise Cancelled()
            try:
                status = container.wait(timeout=max(1, min(remaining, _SLICE)))
            except Exception:
                if not _alive(client):
                    raise
        duration = time.monotonic() - t0
        container.reload()
        state = container.attrs.get("State", {})
        exit_code = state.get("ExitCode", status.get("StatusCode") if status else None)
        oom_killed = bool(state.get("OOMKilled"))
        if reason is None and oom_killed:
            reason = "oom"
        elif reason is None and exit_code == 137 and stream.memory:
            # SIGKILL that we did not send, with a memory limit set: the kernel's OOM
            # killer (podman on cgroup v1 does not report OOMKilled)
            reason = "oom"
        self._save_logs(container, task.logs_dir)
        return RunResult(exit_code=exit_code, duration=duration, reason=reason, provenance={
            "executor": self.kind, "image": stream.image, "image_id": image.id,
            "image_digests": list(image.attrs.get("RepoDigests") or []),
            "container": container.id, "engine": engine_address(),
            "oom_killed": oom_killed})

    @staticmethod
    def _save_logs(container: Any, logs_dir: Path) -> None:
        logs_dir.mkdir(parents=True, exist_ok=True)
        for name, out, err in ((STDOUT_LOG, True, False), (STDERR_LOG, False, True)):
            with open(logs_dir / name, "wb") as fh:
                fh.writelines(container.logs(stdout=out, stderr=err, stream=True, follow=False))


def _kill(container: Any) -> None:
    try:
        container.kill()
    except _docker().errors.APIError:
        pass  # it ended by itself meanwhile; wait() tells how


def _alive(client: Any) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False


def _engine_side(exc: Any) -> bool:
    code = getattr(getattr(exc, "response", None), "status_code", None)
    return code in (502, 503, 504)


def _memory(value: str) -> str:
    # docker wants a unit letter in lower case; a bare number means bytes
    return value.lower()


def stop_orphaned_container(job_id: str) -> list[str]:
    """Remove the containers of ``job_id`` left running by a ``dts run`` that died."""
    client = connect(timeout=30)
    try:
        return remove_job_containers(client, job_id)
    finally:
        client.close()


def executor_for(stream: Stream) -> CommandExecutor | DockerExecutor:
    return DockerExecutor() if stream.image else CommandExecutor()
