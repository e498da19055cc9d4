"""Events a sans-I/O NBD connection hands to its application, and the export description
the application hands back.

Option events are only those whose answer depends on the application (which exports
exist, how big they are); protocol-only options (STRUCTURED_REPLY, ABORT, unknown or
malformed ones) are answered inside the connection.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from deltavol.nbd.constants import Cmd, CmdFlag


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()
"""Returned by ``next_event`` when more bytes must arrive first."""


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the server says about an export in NBD_INFO_* replies."""

    name: str
    size: int
    flags: int  # TransmissionFlag bits, HAS_FLAGS included
    description: str = ""
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = 32 * 1024 * 1024


# --- handshake phase -----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class OptExportName:
    """NBD_OPT_EXPORT_NAME: answer with ``accept_export`` or ``refuse_export_name``."""

    name: str


@dataclass(frozen=True, slots=True)
class OptInfo:
    """NBD_OPT_INFO (go=False) or NBD_OPT_GO (go=True): answer with ``reply_info``."""

    name: str
    requests: tuple[int, ...]
    go: bool


@dataclass(frozen=True, slots=True)
class OptList:
    """NBD_OPT_LIST: answer with ``reply_list``."""


@dataclass(frozen=True, slots=True)
class OptMetaContext:
    """NBD_OPT_LIST/SET_META_CONTEXT: answer with ``reply_meta_context``."""

    name: str
    queries: tuple[str, ...]
    set: bool


@dataclass(frozen=True, slots=True)
class StartTls:
    """NBD_OPT_STARTTLS was acknowledged: upgrade the transport to TLS now, then call
    ``tls_started``. Nothing may be read in plain text before the handshake."""


# --- transmission phase ---------------------------------------------------------------------
@dataclass(slots=True)
class Request:
    """A well-formed transmission request; ``data`` is the payload of a WRITE (a
    ``bytearray`` when it was received in place: from a ``PayloadPool``, which receives
    into it again only once nothing refers to it).

    ``flags`` holds the validated ``CmdFlag`` bits as a plain int, and the properties
    test them with plain ints: ``IntFlag`` arithmetic builds a new enum member per
    operation, a cost paid on every request otherwise.
    """

    cookie: int
    cmd: Cmd
    flags: int
    offset: int
    length: int
    data: bytes | bytearray = field(default=b"", repr=False)

    @property
    def fua(self) -> bool:
        return bool(self.flags & _FUA)

    @property
    def no_hole(self) -> bool:
        return bool(self.flags & _NO_HOLE)

    @property
    def df(self) -> bool:
        return bool(self.flags & _DF)

    @property
    def req_one(self) -> bool:
        return bool(self.flags & _REQ_ONE)

    @property
    def fast_zero(self) -> bool:
        return bool(self.flags & _FAST_ZERO)


_FUA, _NO_HOLE, _DF, _REQ_ONE, _FAST_ZERO = (
    int(f) for f in (CmdFlag.FUA, CmdFlag.NO_HOLE, CmdFlag.DF, CmdFlag.REQ_ONE, CmdFlag.FAST_ZERO)
)


@dataclass(frozen=True, slots=True)
class BadRequest:
    """A request the protocol layer rejects; the application must reply ``errno``."""

    cookie: int
    cmd: int
    errno: int
    reason: str


@dataclass(frozen=True, slots=True)
class Closed:
    """The connection is over: clean disconnect, abort, or a protocol violation."""

    reason: str
    clean: bool


Event = OptExportName | OptInfo | OptList | OptMetaContext | StartTls | Request | BadRequest | Closed
