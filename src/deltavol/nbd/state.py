"""The phases of an NBD connection, for each side, and the only table of legal moves.

Each side names its moves with a trigger string; ``advance`` looks the (phase, trigger)
pair up in that side's table. A pair missing from the table is a bug in the code that
drives the connection, never something a peer can cause (a peer's violations close the
connection, which every phase allows), so it raises ``ProtocolStateError`` naming the
role, the phase and the trigger.

Server: the greeting goes out at once; the client's flags open option haggling; an option
whose answer depends on the application (exports, sizes) leaves the connection waiting
for that answer (OPTION_PENDING); NBD_OPT_GO / EXPORT_NAME accepted start transmission.
NBD_OPT_STARTTLS acknowledged leaves the connection in TLS_HANDSHAKE until the
application says the transport is encrypted; haggling then starts afresh, once (there is
no way back to TLS_HANDSHAKE from an encrypted connection: a second STARTTLS is refused
before it moves anything).

Client: the server's greeting opens option haggling (the client sends its flags and its
options); with TLS wanted, STARTTLS goes first and its ACK leads to TLS_HANDSHAKE, and the
application's word that TLS is up back to OPTIONS; the ACK of NBD_OPT_GO starts
transmission.
"""

from __future__ import annotations

import enum
from typing import TypeVar


class ProtocolStateError(RuntimeError):
    """The application called a method that its connection's phase does not allow."""


class ServerPhase(enum.Enum):
    AWAIT_CLIENT_FLAGS = "await-client-flags"
    OPTIONS = "options"
    OPTION_PENDING = "option-pending"  # the application owes a reply to an option
    TLS_HANDSHAKE = "tls-handshake"  # STARTTLS acknowledged: the application upgrades
    TRANSMISSION = "transmission"
    CLOSED = "closed"


SERVER_TRANSITIONS: dict[tuple[ServerPhase, str], ServerPhase] = {
    (ServerPhase.AWAIT_CLIENT_FLAGS, "client-flags"): ServerPhase.OPTIONS,
    (ServerPhase.OPTIONS, "app-option"): ServerPhase.OPTION_PENDING,
    (ServerPhase.OPTION_PENDING, "replied"): ServerPhase.OPTIONS,
    (ServerPhase.OPTION_PENDING, "go"): ServerPhase.TRANSMISSION,
    (ServerPhase.OPTIONS, "starttls"): ServerPhase.TLS_HANDSHAKE,
    (ServerPhase.TLS_HANDSHAKE, "tls-started"): ServerPhase.OPTIONS,
    **{(phase, "close"): ServerPhase.CLOSED for phase in ServerPhase},
}


class ClientPhase(enum.Enum):
    AWAIT_GREETING = "await-greeting"
    OPTIONS = "options"
    TLS_HANDSHAKE = "tls-handshake"  # STARTTLS acknowledged: the application upgrades
    TRANSMISSION = "transmission"
    CLOSED = "closed"


CLIENT_TRANSITIONS: dict[tuple[ClientPhase, str], ClientPhase] = {
    (ClientPhase.AWAIT_GREETING, "greeting"): ClientPhase.OPTIONS,
    (ClientPhase.OPTIONS, "go"): ClientPhase.TRANSMISSION,
    (ClientPhase.OPTIONS, "starttls"): ClientPhase.TLS_HANDSHAKE,
    (ClientPhase.TLS_HANDSHAKE, "tls-started"): ClientPhase.OPTIONS,
    **{(phase, "close"): ClientPhase.CLOSED for phase in ClientPhase},
}

_P = TypeVar("_P", ServerPhase, ClientPhase)


def advance(role: str, table: dict[tuple[_P, str], _P], phase: _P, trigger: str) -> _P:
    """The phase ``trigger`` leads to from ``phase``; ProtocolStateError if it is illegal."""
    try:
        return table[(phase, trigger)]
    except KeyError:
        raise ProtocolStateError(
            f"{role} connection: {trigger!r} is not allowed in phase {phase.value}"
        ) from None
