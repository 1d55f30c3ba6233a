"""WebSocket close codes, each named once: RFC 6455's that a connection may end with and
appchat's own (4000-4999). Imports nothing from the package: any layer may use it."""

from __future__ import annotations

from enum import IntEnum


class CloseCode(IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001  # the server shuts down (or the client leaves)
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    NO_STATUS = 1005  # never on the wire: the client's close frame carried no code
    CONNECTION_LOST = 1006  # never on the wire: the connection ended without a close frame
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008  # too many frames (control frames included)
    MESSAGE_TOO_BIG = 1009  # a frame over --max-frame (aiohttp closes with it)
    SERVER_ERROR = 1011
    TOKEN_EXPIRED = 4001
    SLOW_CONSUMER = 4008
    DISCONNECTED = 4009  # by the server API (POST /api/connections/{sid}/disconnect)


DESCRIPTIONS = {
    CloseCode.NORMAL: "normal closure",
    CloseCode.GOING_AWAY: "going away",
    CloseCode.PROTOCOL_ERROR: "protocol error",
    CloseCode.UNSUPPORTED_DATA: "unsupported data",
    CloseCode.NO_STATUS: "no status code",
    CloseCode.CONNECTION_LOST: "connection lost",
    CloseCode.INVALID_DATA: "invalid data",
    CloseCode.POLICY_VIOLATION: "policy violation",
    CloseCode.MESSAGE_TOO_BIG: "frame too big",
    CloseCode.SERVER_ERROR: "server error",
    CloseCode.TOKEN_EXPIRED: "token expired",
    CloseCode.SLOW_CONSUMER: "slow consumer",
    CloseCode.DISCONNECTED: "disconnected by the server API",
}


def describe(code: int) -> str:
    """A few words for a log line: the code's name, else its range."""
    try:
        return DESCRIPTIONS[CloseCode(code)]
    except ValueError:
        return "application code" if code >= 3000 else "other"
