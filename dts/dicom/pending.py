"""Owns the budget of connections that have not associated yet: accepted, but no valid
A-ASSOCIATE-RQ read from them so far.

pynetdicom counts every accepted connection against the AE's maximum number of
associations, so a handful of idle connections (a port scanner, a half-broken router,
an attacker) locked real peers out. dts counts only associations against
``max_associations`` (the receiver's ``EVT_REQUESTED`` handler) and gives connections
that have not associated a budget of their own, per peer address and in total. When it
is exhausted, the oldest of them is closed to make room: the new connection's own
address loses its oldest when that address is over its share, otherwise the address
holding the most. So a flood from one address costs that address alone, and a peer
with a single pending connection is never the one closed while another holds more.

The budget is kept on the thread that accepts (socketserver's ``verify_request``), so
"oldest" is the order of the accepts; its entries are the accepted sockets themselves,
and one that was closed meanwhile (its descriptor is -1) no longer counts.

Every such connection is also bounded in time (``network_timeout``: the deadline to
send the request); the budget bounds how many exist at once, and with them the
receiver's descriptors and threads.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any


class PendingBudget:
    """The connections that have not associated yet, oldest first."""

    def __init__(self, total: int, per_host: int) -> None:
        if not 1 <= per_host <= total:
            raise ValueError(f"need 1 <= per_host ({per_host}) <= total ({total})")
        self.total = total
        self.per_host = per_host
        self._lock = threading.Lock()
        self._pending: dict[Any, str] = {}  # accepted socket -> peer address, by age
        self._closed: Counter[str] = Counter()  # address -> closed over budget, unreported

    def opened(self, sock: Any, host: str) -> list[Any]:
        """``sock`` from ``host`` was accepted; the sockets to shut down to keep the
        budget (the caller does, outside any lock)."""
        with self._lock:
            self._forget_closed()
            victim = None
            mine = [s for s, h in self._pending.items() if h == host]
            if len(mine) >= self.per_host:
                victim = mine[0]
            elif len(self._pending) >= self.total:
                counts = Counter(self._pending.values())
                counts[host] += 1  # the newcomer counts for its own address
                top = max(counts, key=lambda h: counts[h])
                victim = next((s for s, h in self._pending.items() if h == top), None)
            closed = []
            if victim is not None:
                self._closed[self._pending.pop(victim)] += 1
                closed.append(victim)
            self._pending[sock] = host
            return closed

    def done(self, sock: Any) -> None:
        """``sock`` sent its request, or closed: it no longer counts."""
        with self._lock:
            self._pending.pop(sock, None)

    def __len__(self) -> int:
        with self._lock:
            self._forget_closed()
            return len(self._pending)

    def closed_since_last(self) -> dict[str, int]:
        """Connections closed over budget since the last call, by peer address."""
        with self._lock:
            closed, self._closed = dict(self._closed), Counter()
            return closed

    def _forget_closed(self) -> None:
        for sock in [s for s in self._pending if _closed(s)]:
            del self._pending[sock]


def _closed(sock: Any) -> bool:
    try:
        return bool(sock.fileno() == -1)
    except OSError:
        return True
