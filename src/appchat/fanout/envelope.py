"""What nodes send each other over the broker, on a participant's channel: a push in an
envelope (the sending node, the origin connection, the application) and the control
message that disconnects a participant's connections."""

from __future__ import annotations

from dataclasses import dataclass

from ..protocol.models import Principal, Role

# A control message on a participant's channel (not a push):
# ``!disconnect\t<node>\t<code>\n<reason>`` closes every connection of the participant id;
# ``!disconnect\t<node>\t<code>\t<role>\t<application or empty>\n<reason>`` only those of
# one identity using it (a node of the previous release drops this form, closing nothing).
# Node ids are hex, so no push envelope starts with ``!``.
DISCONNECT = b"!disconnect\t"


@dataclass(frozen=True, slots=True)
class Whom:
    """Which of the identities using a participant id to disconnect: staff, or customers
    (of one application, or of any); ``None`` fields match everyone."""

    role: Role | None = None
    application_id: int | None = None

    def matches(self, principal: Principal) -> bool:
        if self.role is not None and principal.role is not self.role:
            return False
        return self.application_id is None or principal.application_id == self.application_id

    @property
    def everyone(self) -> bool:
        return self.role is None and self.application_id is None


EVERYONE = Whom()


def envelope(node: str, origin: str | None, application_id: int, frame: bytes) -> bytes:
    return f"{node}\t{origin or ''}\t{application_id}\n".encode() + frame


def open_envelope(data: bytes) -> tuple[str, str, int, bytes]:
    head, _, frame = data.partition(b"\n")
    node, origin, app = head.decode().split("\t")
    return node, origin, int(app), frame


def disconnect_message(node: str, code: int, reason: str, whom: Whom) -> bytes:
    head = f"{node}\t{code}"
    if not whom.everyone:
        role = "" if whom.role is None else whom.role.value
        app = "" if whom.application_id is None else str(whom.application_id)
        head += f"\t{role}\t{app}"
    return DISCONNECT + f"{head}\n".encode() + reason.encode()


def open_disconnect(data: bytes) -> tuple[str, int, str, Whom]:
    """(node, code, reason, whom) of a disconnect message; ``ValueError`` (or
    ``IndexError``, ``UnicodeDecodeError``) for one that cannot be read."""
    head, _, reason = data[len(DISCONNECT) :].partition(b"\n")
    node, code, *named = head.decode().split("\t")
    whom = EVERYONE
    if named:
        role, app = named
        whom = Whom(Role(role) if role else None, int(app) if app else None)
    return node, int(code), reason.decode(), whom
