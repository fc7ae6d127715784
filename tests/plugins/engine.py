"""Pytest fixtures for the run stage: a real container engine and run jobs.

``engine`` (session): podman's Docker-compatible API service on a unix socket of
its own, with its own containers.conf (``CONTAINERS_CONF``), storage (``--root``,
``--runroot``) and runtime (runc), so tests neither need nor touch a system
engine. Test images are made locally without a registry: ``podman import`` of a
root filesystem holding Debian's static busybox and ``/bin/model``, a shell
script whose behaviour the stream's ``MODE`` parameter picks (see MODEL).

``make_run_job`` writes a job into ``run/new/`` as ``dts classify`` leaves it.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import make_study, wait_for

PODMAN = "/usr/bin/podman"
RUNC = "/usr/sbin/runc"
BUSYBOX = "/bin/busybox"
TEST_IMAGE = "localhost/dts-test-model:1"

CONTAINERS_CONF = """\
[containers]
default_ulimits = []

[engine]
cgroup_manager = "cgroupfs"
"""

# The test "model". Parameters arrive as environment variables; PAYLOAD is a base64
# DICOM file the test prepared (busybox cannot write DICOM itself).
MODEL = r"""#!/bin/sh
emit() { [ -n "$PAYLOAD" ] && echo "$PAYLOAD" | base64 -d > /output/result.dcm; }
case "$MODE" in
ok)
    echo "model: starting job $DTS_JOB"
    find /input -type f | sort > /output/input-files.txt
    env | sort > /output/env.txt
    if [ -f /sys/fs/cgroup/cpu.max ]; then  # cgroup v2: "quota period", bytes
        cat /sys/fs/cgroup/cpu.max /sys/fs/cgroup/memory.max > /output/limits.txt 2>&1
    else
        cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us /sys/fs/cgroup/cpu/cpu.cfs_period_us \
            /sys/fs/cgroup/memory/memory.limit_in_bytes > /output/limits.txt 2>&1
    fi
    emit
    echo "model: done" ;;
fail)
    echo "model: loading weights"
    echo "model: CUDA error: out of luck" >&2
    exit 3 ;;
sleep)
    echo "model: sleeping"
    sleep 600 ;;
oom)
    echo "model: allocating"
    x=$(head -c 400000000 /dev/zero | tr '\000' a)
    echo "model: survived ${#x}" ;;
readonly)
    f=$(find /input -name '*.dcm' | head -n 1)
    if touch /input/new-file 2>/dev/null; then echo created > /output/ro.txt;
    else echo create-refused > /output/ro.txt; fi
    if echo garbage >> "$f" 2>/dev/null; then echo modified >> /output/ro.txt;
    else echo modify-refused >> /output/ro.txt; fi
    emit ;;
network)
    ls /sys/class/net > /output/net.txt
    id -u > /output/uid.txt
    cat $(find /input -name '*.dcm') /input/task.json > /dev/null && echo ok > /output/read.txt
    emit ;;
empty)
    echo "model: nothing to say" ;;
esac
"""


@dataclass
class Engine:
    docker_host: str
    image: str
    env: dict[str, str]        # DOCKER_HOST for a dts subprocess
    podman: list[str]          # podman argv prefix bound to this engine's storage
    podman_env: dict[str, str] | None = None  # environment for that podman (CONTAINERS_CONF)

    def start_service(self, sock: Path, log: Path) -> subprocess.Popen[bytes]:
        """Another API service on the same storage (to kill it in a test); the caller
        stops it by its PID."""
        with open(log, "wb") as out:
            proc = subprocess.Popen(self.podman + ["system", "service", "--time=0",
                                                   f"unix://{sock}"], cwd=sock.parent,
                                    stdout=out, stderr=subprocess.STDOUT, env=self.podman_env)
        wait_for(lambda: _answers(f"unix://{sock}", proc, log), timeout=30, interval=0.1,
                 what="a second podman API service")
        return proc

    def client(self) -> Any:
        import docker

        return docker.DockerClient(base_url=self.docker_host, timeout=60)

    def job_containers(self, job_id: str) -> list[Any]:
        client = self.client()
        try:
            return client.containers.list(all=True, filters={"label": f"dts.job={job_id}"})
        finally:
            client.close()


def _rootfs_tar() -> bytes:
    """A root filesystem: static busybox with its applets, /bin/model, empty mount points."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        def add_dir(name: str, mode: int = 0o755) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, mode
            tar.addfile(info)

        def add_file(name: str, data: bytes, mode: int) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))

        for d in ("bin", "etc", "input", "output", "proc", "sys", "dev", "run"):
            add_dir(d)
        add_dir("tmp", 0o1777)
        add_file("bin/busybox", Path(BUSYBOX).read_bytes(), 0o755)
        applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True,
                                 check=True).stdout.split()
        for applet in applets:
            if applet != "busybox":
                info = tarfile.TarInfo(f"bin/{applet}")
                info.type, info.linkname = tarfile.SYMTYPE, "busybox"
                tar.addfile(info)
        add_file("bin/model", MODEL.encode(), 0o755)
        add_file("etc/passwd", b"root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n",
                 0o644)
        add_file("etc/group", b"root:x:0:\nnogroup:x:65534:\n", 0o644)
    return buf.getvalue()


def _answers(docker_host: str, proc: subprocess.Popen[bytes], log: Path) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"podman system service exited {proc.returncode}: "
                             f"{log.read_text()[-2000:]}")
    import docker
    try:
        client = docker.DockerClient(base_url=docker_host, timeout=5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


@pytest.fixture(scope="session")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """podman's Docker API service with a locally built test image; stopped by PID."""
    for tool in (PODMAN, RUNC, BUSYBOX):
        if not os.path.exists(tool):
            pytest.fail(f"{tool} is missing: run `make system-deps` (podman, runc, "
                        "busybox-static)")
    base = tmp_path_factory.mktemp("engine")
    conf = base / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    env = {**os.environ, "CONTAINERS_CONF": str(conf)}
    env.pop("DOCKER_HOST", None)
    podman = [PODMAN, "--root", str(base / "storage"), "--runroot", str(base / "run"),
              "--runtime", RUNC]
    tar = base / "rootfs.tar"
    tar.write_bytes(_rootfs_tar())
    subprocess.run(podman + ["import", "--change", 'CMD ["/bin/model"]', str(tar), TEST_IMAGE],
                   check=True, capture_output=True, env=env, timeout=120)
    sock = base / "podman.sock"
    log = open(base / "service.log", "wb")
    # cwd: conmon leaves an "oom" marker file in its working directory after an OOM kill
    proc = subprocess.Popen(podman + ["system", "service", "--time=0", f"unix://{sock}"], cwd=base,
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        docker_host = f"unix://{sock}"

        wait_for(lambda: _answers(docker_host, proc, base / "service.log"), timeout=30,
                 interval=0.1, what="podman API service")
        yield Engine(docker_host=docker_host, image=TEST_IMAGE,
                     env={"DOCKER_HOST": docker_host}, podman=podman, podman_env=env)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()
        # containers left by a failed test would keep the storage busy
        subprocess.run(podman + ["rm", "--all", "--force"], capture_output=True, env=env,
                       timeout=60)


@pytest.fixture
def docker_host(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> str:
    """DOCKER_HOST set for the test process (the core reads it like docker's own CLI)."""
    monkeypatch.setenv("DOCKER_HOST", engine.docker_host)
    return engine.docker_host


def make_run_job(spool: Path, stream: str, *, study: dict[str, Any] | None = None,
                 selection: dict[str, list[str]] | None = None, n_series: int = 2,
                 per_series: int = 3, job_id: str | None = None,
                 **study_kw: Any) -> tuple[Path, dict[str, Any]]:
    """A run job in ``spool/run/new`` as the classifier publishes it; (path, study)."""
    from dts.spool import Queue, Spool, new_job_id

    sp = Spool(spool).ensure()
    parent = new_job_id()
    job = sp.create_tmp_job(job_id or f"{parent}.{stream}")
    if study is None:
        study = make_study(job.input_dir, n_series=n_series, per_series=per_series,
                           **study_kw)
    else:
        shutil.copytree(study["folder"], job.input_dir, copy_function=os.link)
    series = list(study["series"])
    if selection is None:
        selection = {"main": series}
    job.write({
        "stream": stream, "parent": parent, "selection": selection,
        "study_uid": study["study_uid"], "patient_id": study_kw.get("patient_id", "PAT001"),
        "accession": study_kw.get("accession", "ACC001"), "calling_ae": "MODALITY",
        "called_ae": "DTS", "peer": "127.0.0.1", "attempts": 0,
    })
    (job.path / "study.json").write_text(json.dumps({
        "StudyInstanceUID": study["study_uid"], "PatientID": study_kw.get("patient_id", "PAT001"),
        "series": [{"SeriesInstanceUID": s, "NumImages": len(v)}
                   for s, v in study["series"].items()]}))
    sp.publish(job, Queue.RUN)
    return job.path, study
