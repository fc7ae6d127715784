"""A pipeline that does not queue behind itself: in `dts watch`, a job whose destination
hangs does not hold up the delivery of another job (``[station] max_parallel_sends``)."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from dts.spool import Queue, Spool, State
from tests import helpers
from tests.helpers import free_port, make_study, start_dts, stop_process, wait_for
from tests.test_cron import queue_study


class BlackHole:
    """A TCP peer that accepts connections and never says a word (a hung PACS)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


def _config(tmp_path: Path, hole: int, sends: int) -> Path:
    stream = {"command": ["{python}", "-m", "dts.examples.series_statistics", "{input}",
                          "{output}"], "timeout": "2m"}
    return helpers.station_config(
        tmp_path, name="station.toml",
        station={"ae_title": "DTS", "host": "127.0.0.1", "port": free_port(),
                 "stable_seconds": 1, "rescan_seconds": 2, "network_timeout": "40s",
                 "dimse_timeout": "40s", "max_parallel_runs": 2,
                 "max_parallel_sends": sends},
        destinations=[{"name": "hung", "ae_title": "HUNG", "host": "127.0.0.1", "port": hole},
                      {"name": "reports", "folder": str(tmp_path / "reports")}],
        streams=[{"name": "to-hung", "calling_ae": "^SLOW$", "destinations": ["hung"],
                  **stream},
                 {"name": "to-reports", "calling_ae": "^PACS$", "destinations": ["reports"],
                  **stream}])


@pytest.mark.slow
def test_a_hung_destination_holds_up_only_its_own_job(tmp_path: Path) -> None:
    hole = BlackHole()
    config = _config(tmp_path, hole.port, sends=4)
    spool = Spool(tmp_path / "spool").ensure()
    watch = start_dts("watch", "--no-receive", config=config, log=tmp_path / "watch.log")
    try:
        slow = make_study(tmp_path / "a", n_series=1, per_series=2)
        queue_study(spool, tmp_path / "a", slow, accession="SLOW1", calling_ae="SLOW")
        # its send is under way: connected to the hung peer, waiting for an answer
        wait_for(lambda: spool.list(Queue.SEND, State.CUR) and hole.conns, 60,
                 what="the first job sending to the hung destination")
        fast = make_study(tmp_path / "b", n_series=1, per_series=2)
        queue_study(spool, tmp_path / "b", fast, accession="FAST1", calling_ae="PACS")
        reports = tmp_path / "reports"
        wait_for(lambda: reports.is_dir() and any(reports.iterdir())
                 and any(j.endswith(".to-reports") for j in spool.list(Queue.DONE)), 30,
                 what="the second job delivered while the first waits")
        (stuck,) = spool.list(Queue.SEND, State.CUR)
        assert stuck.endswith(".to-hung"), stuck
    finally:
        stop_process(watch)
        hole.close()
