"""dts.dicom.pending: the budget of connections that have not associated yet."""

from __future__ import annotations

import socket

import pytest

from dts.dicom.pending import PendingBudget


class Conn:
    """Stands in for an accepted socket: only fileno() is asked."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.open = True

    def fileno(self) -> int:
        return 3 if self.open else -1

    def __repr__(self) -> str:
        return self.name


def test_an_address_over_its_share_loses_its_own_oldest() -> None:
    budget = PendingBudget(total=10, per_host=2)
    a1, a2, a3, b1 = Conn("a1"), Conn("a2"), Conn("a3"), Conn("b1")
    assert budget.opened(b1, "b") == []
    assert budget.opened(a1, "a") == []
    assert budget.opened(a2, "a") == []
    assert budget.opened(a3, "a") == [a1]
    assert len(budget) == 3
    assert budget.closed_since_last() == {"a": 1}
    assert budget.closed_since_last() == {}


def test_a_full_budget_takes_from_the_address_holding_most() -> None:
    budget = PendingBudget(total=4, per_host=3)
    lone = Conn("lone")
    budget.opened(lone, "c")
    flood = [Conn(f"f{i}") for i in range(3)]
    for conn in flood:
        assert budget.opened(conn, "f") == []
    # full: a newcomer from a third address costs the flood its oldest, not "c"
    assert budget.opened(Conn("d1"), "d") == [flood[0]]
    # the newcomer's own address counts: more from the flood cost the flood
    assert budget.opened(Conn("f3"), "f") == [flood[1]]
    assert budget.closed_since_last() == {"f": 2}


def test_done_and_closed_connections_no_longer_count() -> None:
    budget = PendingBudget(total=2, per_host=2)
    a, b = Conn("a"), Conn("b")
    budget.opened(a, "x")
    budget.opened(b, "x")
    budget.done(a)
    b.open = False  # pynetdicom closed it (timed out): its descriptor is -1
    assert len(budget) == 0
    assert budget.opened(Conn("c"), "x") == []
    budget.done(Conn("never seen"))  # harmless


def test_real_sockets_are_forgotten_once_closed() -> None:
    budget = PendingBudget(total=1, per_host=1)
    left, right = socket.socketpair()
    budget.opened(right, "x")
    right.close()
    assert len(budget) == 0
    left.close()


@pytest.mark.parametrize("total,per_host", [(1, 2), (0, 0)])
def test_a_budget_must_make_sense(total: int, per_host: int) -> None:
    with pytest.raises(ValueError):
        PendingBudget(total, per_host)
