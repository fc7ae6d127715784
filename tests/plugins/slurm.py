"""Pytest fixture: a real one-node Slurm cluster from Debian's packages (``slurm``, session).

What works here (Slurm 22.05, munge 0.5.15, as root), found by trying:

- One folder of its own made with ``tempfile.mkdtemp`` under /tmp, not pytest's
  ``tmp_path``: munged refuses a socket whose folders are not searchable by everyone
  ("execute permissions for all required", and pytest's base folder is 0700), and a unix
  socket's path must stay below 108 bytes.
- munged with its own 1024-byte key (0600), socket, pid, log and seed files in that folder
  (``munged -F --socket= --key-file= --pid-file= --log-file= --seed-file=``); Slurm's
  daemons and client commands find it through ``AuthInfo=socket=<that socket>`` in
  slurm.conf (auth/munge and cred/munge both read it in 22.05).
- slurm.conf in the folder, read by the client commands through ``SLURM_CONF``:
  ``SlurmctldHost=<hostname>(127.0.0.1)``, ``SlurmctldPort``/``SlurmdPort`` on free
  loopback ports, the node line from ``slurmd -C`` (this machine's CPUs, so slurmd never
  drains the node for having fewer) with ``NodeAddr=127.0.0.1``, state and spool folders
  in the temporary folder, ``ProctrackType=proctrack/linuxproc`` and ``TaskPlugin=task/none``
  (no cgroup needed), ``SelectType=select/cons_tres`` with ``CR_Core`` and a partition
  with ``OverSubscribe=FORCE:8`` (several test jobs at once on 2 cores),
  ``MpiDefault=none`` (no PMIx library), no accounting (``sacct`` is not used: dts reads
  squeue, scontrol and the batch script's exit file), ``JobCompType=jobcomp/filetxt`` with
  ``JobCompLoc`` in the folder: one line per ended job, which the tests read to prove that
  exactly one cluster job ran. ``MinJobAge=300`` keeps ended jobs visible to squeue and
  scontrol; ``KillWait=2`` makes a cancelled or timed-out job's SIGKILL come soon.
- ``slurmctld -D -f`` and ``slurmd -D -f`` as child processes, stopped by their PIDs in the
  finalizer; ready when ``sinfo`` shows the node idle. A controller stopped by a test is
  started again with the same state folder (``stop_controller``/``start_controller``), so
  its jobs survive, as on a real cluster.
- Slurm checks time limits every 30 s (slurmctld's PERIODIC_TIMEOUT, not configurable) and
  ``--time`` counts whole minutes, so a job of ``timeout = "1m"`` ends TIMEOUT 60 to 90 s
  after it started: the one slow case.

Jobs of different tests share the cluster; they never interfere because every job's
name is ``dts-<its dts job id>`` and the tests look jobs up by name.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import free_port, wait_for

SLURMCTLD = "/usr/sbin/slurmctld"
SLURMD = "/usr/sbin/slurmd"
MUNGED = "/usr/sbin/munged"
SBATCH = "/usr/bin/sbatch"
SQUEUE = "/usr/bin/squeue"
SINFO = "/usr/bin/sinfo"
PARTITION = "dtstest"


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    munge_socket: Path
    jobcomp: Path
    partition: str = PARTITION
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        """The environment a Slurm client (and dts) needs for this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def run(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **self.env}, check=False)

    # -- daemons -----------------------------------------------------------------------
    def _start(self, name: str, argv: list[str]) -> None:
        with open(self.root / "log" / f"{name}.out", "ab") as log:
            self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL,
                                                env={**os.environ, **self.env})

    def _stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def start_controller(self) -> None:
        self._start("slurmctld", [SLURMCTLD, "-D", "-f", str(self.conf)])
        self.wait_ready()

    def stop_controller(self) -> None:
        self._stop("slurmctld")

    def wait_ready(self, timeout: float = 60) -> None:
        def idle() -> bool:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise AssertionError(f"{name} exited {proc.returncode}: "
                                         f"{self.log(name)[-3000:]}")
            out = self.run(SINFO, "--noheader", "--Node", "--format=%T", timeout=15)
            return out.returncode == 0 and any(s.strip().rstrip("*") in ("idle", "mixed",
                                                                            "allocated")
                                               for s in out.stdout.splitlines())
        wait_for(idle, timeout, interval=0.2, what="the Slurm node to be idle")

    def log(self, name: str) -> str:
        try:
            return (self.root / "log" / f"{name}.out").read_text(errors="replace")
        except OSError:
            return ""

    # -- what happened -----------------------------------------------------------------
    def completed(self, name: str) -> list[str]:
        """The job completion log's lines of jobs named ``name`` (one per ended job)."""
        try:
            text = self.jobcomp.read_text()
        except FileNotFoundError:
            return []
        return [ln for ln in text.splitlines() if f" Name={name} " in ln]

    def jobs(self, name: str) -> list[dict[str, str]]:
        """The jobs the controller knows by ``name``: id, state, node, comment."""
        out = self.run(SQUEUE, "--noheader", "--states=all", f"--name={name}",
                       "--format=%i|%T|%N|%k")
        assert out.returncode == 0, out.stderr
        rows = []
        for line in out.stdout.splitlines():
            job_id, state, node, comment = (p.strip() for p in line.split("|", 3))
            rows.append({"id": job_id, "state": state, "node": node, "comment": comment})
        return rows


def _node_line() -> str:
    """This machine as slurmd sees it (``slurmd -C``), at a loopback address."""
    out = subprocess.run([SLURMD, "-C"], capture_output=True, text=True, timeout=30,
                         check=True).stdout.splitlines()[0]
    words = [w for w in out.split() if not w.startswith("RealMemory=")]
    return " ".join(words) + " RealMemory=2000 NodeAddr=127.0.0.1 State=UNKNOWN"


SLURM_CONF = """\
ClusterName=dtstest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={root}/log/jobcomp.log
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MinJobAge=300
KillWait=2
MessageTimeout=5
ReturnToService=2
MailProg=/bin/true
{node}
PartitionName={partition} Nodes={host} Default=YES MaxTime=INFINITE OverSubscribe=FORCE:8 State=UP
"""


@pytest.fixture(scope="session")
def slurm() -> Iterator[SlurmCluster]:
    """A one-node Slurm cluster (munged, slurmctld, slurmd) on free loopback ports."""
    for tool in (SLURMCTLD, SLURMD, MUNGED, SBATCH, SQUEUE, SINFO):
        if not os.path.exists(tool):
            pytest.fail(f"{tool} is missing: run `make system-deps` (slurm-wlm, munge)")
    root = Path(tempfile.mkdtemp(prefix="dts-slurm-", dir="/tmp"))
    root.chmod(0o755)
    for sub in ("munge", "state", "spool", "log"):
        (root / sub).mkdir()
    key = root / "munge" / "munge.key"
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, os.urandom(1024))
    os.close(fd)
    sock = root / "munge" / "munge.sock"
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(SLURM_CONF.format(host=host, ctld_port=free_port(), slurmd_port=free_port(),
                                      munge_socket=sock, root=root, node=_node_line(),
                                      partition=PARTITION))
    cluster = SlurmCluster(root=root, conf=conf, munge_socket=sock,
                           jobcomp=root / "log" / "jobcomp.log")
    try:
        cluster._start("munged", [MUNGED, "-F", f"--socket={sock}", f"--key-file={key}",
                                  f"--pid-file={root}/munge/munged.pid",
                                  f"--log-file={root}/log/munged.log",
                                  f"--seed-file={root}/munge/munged.seed"])

        def munge_up() -> bool:
            proc = cluster.procs["munged"]
            if proc.poll() is not None:
                raise AssertionError(f"munged exited {proc.returncode}: {cluster.log('munged')}")
            return sock.exists()
        wait_for(munge_up, 30, interval=0.05, what="munged's socket")
        cluster._start("slurmctld", [SLURMCTLD, "-D", "-f", str(conf)])
        cluster._start("slurmd", [SLURMD, "-D", "-f", str(conf)])
        cluster.wait_ready()
        yield cluster
    finally:
        # jobs a failed test left running: cancelled while the controller still answers
        if "slurmctld" in cluster.procs:
            cluster.run("/usr/bin/scancel", f"--partition={PARTITION}", timeout=30)
        for name in ("slurmd", "slurmctld", "munged"):
            cluster._stop(name)
        shutil.rmtree(root, ignore_errors=True)
