"""The connection log and the close codes' names, with plain values and a moved clock."""

from __future__ import annotations

import logging

import pytest

from appchat.protocol.closecodes import CloseCode, describe
from appchat.transport.connlog import ConnectionLog

from .support import Clock


@pytest.fixture
def clock() -> Clock:
    return Clock(lambda: 1000.0)


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "appchat.connections"]


def test_every_close_code_the_server_sends_has_a_name() -> None:
    assert {describe(int(code)) for code in CloseCode} == {
        "normal closure",
        "going away",
        "protocol error",
        "unsupported data",
        "connection lost",
        "invalid data",
        "policy violation",
        "frame too big",
        "server error",
        "token expired",
        "slow consumer",
        "disconnected by the server API",
    }
    assert describe(4009) == "disconnected by the server API"
    assert describe(4321) == describe(3000) == "application code"
    assert describe(1004) == describe(999) == "other"


def test_open_and_close_lines_carry_who_how_and_how_long(
    caplog: pytest.LogCaptureFixture, clock: Clock
) -> None:
    caplog.set_level(logging.INFO, "appchat.connections")
    log = ConnectionLog(clock=clock)
    since = log.opened("c1", sid=7, role="customer", remote="10.0.0.1")
    clock.advance(2.5)
    log.closed("c1", sid=7, remote="10.0.0.1", code=4009, since=since)
    log.closed("c2", sid=8, remote="10.0.0.2", code=None, since=since)  # no close frame
    log.refused(401, "token has expired", remote="10.0.0.3", sid=None)
    log.refused(401, "bad signature", remote="10.0.0.4", sid=3, what="token check")
    assert lines(caplog) == [
        "connection c1 opened: sid 7 (customer) from 10.0.0.1",
        "connection c1 closed: sid 7 from 10.0.0.1, code 4009 "
        "(disconnected by the server API) after 2.5 s",
        "connection c2 closed: sid 8 from 10.0.0.2, code 1006 (connection lost) after 2.5 s",
        "handshake refused from 10.0.0.3 (sid -): 401 token has expired",
        "token check refused from 10.0.0.4 (sid 3): 401 bad signature",
    ]
    closed = next(r for r in caplog.records if "closed" in r.getMessage())
    assert (closed.__dict__["code"], closed.__dict__["duration"]) == (4009, 2.5)


def test_an_address_reconnecting_in_a_loop_gets_a_budget_of_lines(
    caplog: pytest.LogCaptureFixture, clock: Clock
) -> None:
    caplog.set_level(logging.INFO, "appchat.connections")
    log = ConnectionLog(period=10.0, burst=3, clock=clock)
    for n in range(50):
        log.refused(401, "bad token", remote="10.0.0.9", sid=n)
    log.refused(401, "bad token", remote="10.0.0.10", sid=1)  # another address: its own
    assert len(lines(caplog)) == 4
    clock.advance(10.0)
    log.refused(401, "bad token", remote="10.0.0.9", sid=99)
    assert lines(caplog)[-1] == (
        "handshake refused from 10.0.0.9 (sid 99): 401 bad token (47 similar line(s) left out)"
    )
