"""The error tree. Each class's docstring is its message template; each carries how it
is said at the edges (CLI exit code, HTTP status, NBD errno). Only the CLI's main(), the
HTTP handler and the NBD connection loop translate errors; everything else raises.
"""

from __future__ import annotations

import errno as _errno
from typing import Any, ClassVar


class DeltavolError(Exception):
    """{msg}"""

    exit_code: ClassVar[int] = 1
    http_status: ClassVar[int] = 500
    nbd_errno: ClassVar[int] = _errno.EIO

    def __init__(self, **fields: Any) -> None:
        self.fields = fields
        super().__init__(self.message)

    @property
    def message(self) -> str:
        template = (self.__doc__ or "{msg}").strip().splitlines()[0]
        try:
            return template.format(**self.fields)
        except (KeyError, IndexError):
            return f"{template} {self.fields}"

    @property
    def code(self) -> str:
        return type(self).__name__

    def to_json(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}}


class UsageError(DeltavolError):
    """{msg}"""

    exit_code = 2
    http_status = 400
    nbd_errno = _errno.EINVAL


class InvalidName(UsageError):
    """invalid name {name!r}: {why}"""


class InvalidSize(UsageError):
    """invalid size {size!r}: {why}"""


class NotFound(DeltavolError):
    """{kind} {name!r} does not exist"""

    http_status = 404


class Conflict(DeltavolError):
    """{msg}"""

    http_status = 409


class AlreadyExists(Conflict):
    """{kind} {name!r} already exists"""


class InUse(Conflict):
    """{kind} {name!r} is in use: {why}"""

    nbd_errno = _errno.EPERM


class Protected(Conflict):
    """volume {name!r} is protected: {why}"""

    nbd_errno = _errno.EPERM


class IllegalTransition(Conflict):
    """session {name!r} is {state}: cannot {action}"""


class IllegalPhase(DeltavolError):
    """update {id} of session {name!r} is {phase}: cannot {action}"""


class UnknownRecord(DeltavolError):
    """session {name!r}: its update record cannot be read: {why}"""


class AlreadyCopying(Conflict):
    """session {name!r} is already copying"""


class NothingToResume(Conflict):
    """session {name!r} has no update to resume"""


class ShuttingDown(DeltavolError):
    """session {name!r} is shut down: the server is stopping"""

    http_status = 503


class OutOfRange(DeltavolError):
    """request {offset}+{length} is beyond the end of {name!r} ({size} bytes)"""

    http_status = 400
    nbd_errno = _errno.EINVAL


class ReadOnly(Conflict):
    """{name!r} is read-only"""

    nbd_errno = _errno.EPERM


class NotSupported(DeltavolError):
    """{what} is not supported by {name!r}"""

    http_status = 400
    nbd_errno = _errno.EOPNOTSUPP


class NoSpace(DeltavolError):
    """no space left writing {what}"""

    http_status = 507
    nbd_errno = _errno.ENOSPC


class IoFailure(DeltavolError):
    """{what}: {why}"""


class ImportFailed(UsageError):
    """cannot import {path}: {why}"""


class ImportPathNotFound(NotFound):
    """cannot import {path}: {why}"""


class ListenFailed(DeltavolError):
    """cannot listen on {address}: {why}"""


class MetadataError(DeltavolError):
    """metadata {path}: {why}"""


class TargetError(DeltavolError):
    """{msg}"""

    http_status = 502


class TargetClaimed(TargetError):
    """target {target}: the update is being cancelled for a restore: nothing more is written to it"""

    http_status = 409


class VerifyInterrupted(DeltavolError):
    """verify of session {name!r} interrupted: {why}"""


class NotVerifiable(Conflict):
    """session {name!r} is {state}: verify needs a finished update"""


class NotRestorable(Conflict):
    """session {name!r} cannot {action}: {why}"""


class RestoreNotStarted(DeltavolError):
    """session {name!r}: {done}; but the restore did not start: {why}"""


class NotReversible(Conflict):
    """session {name!r} cannot be reversed: {why}"""


class SessionUnavailable(Conflict):
    """session {name!r} is unavailable: {why}; only 'session remove {name}' works on it"""


class SessionLoadFailed(DeltavolError):
    """session {name}: {why}"""


class UpdateFailed(DeltavolError):
    """session {name}: {why}"""


class VerifyMismatch(DeltavolError):
    """session {name}: target differs from source in {count} chunk(s)"""


class DataDirLocked(DeltavolError):
    """data dir {path} is in use by another deltavol server (pid {pid})"""


class CorruptFile(DeltavolError):
    """{path} is corrupt: {why}"""


class SaveRecordLost(DeltavolError):
    """save area {path}: the record of chunk {chunk} at byte {at} does not read back as written"""


class NewerFormat(DeltavolError):
    """{path} has format version {version}, this deltavol reads up to {supported}: use a newer deltavol"""


class ServerNotRunning(DeltavolError):
    """no deltavol server is running on {socket} (start one with: deltavol serve --data-dir {data_dir})"""


class ApiError(DeltavolError):
    """{msg}"""

    def __init__(self, status: int, code: str, msg: str) -> None:
        self.status = status
        self.remote_code = code
        super().__init__(msg=msg)

    @property
    def exit_code(self) -> int:  # type: ignore[override]
        return 2 if self.status == 400 else 1


def os_error(exc: OSError, what: str) -> DeltavolError:
    """Map an OSError from file I/O to the error the user should see."""
    if exc.errno in (_errno.ENOSPC, _errno.EDQUOT):
        return NoSpace(what=what)
    return IoFailure(what=what, why=exc.strerror or str(exc))


class TlsFileMissing(UsageError):
    """TLS file {path} is missing ({role}); {hint}"""


class TlsFileInvalid(UsageError):
    """TLS file {path} cannot be used ({role}): {why}"""


class InsecureListen(UsageError):
    """refusing to serve {what} on {address} in plain text: anyone who can reach it could {risk}; {hint}"""


class TlsVerifyFailed(DeltavolError):
    """cannot trust {peer}: {why}"""


class PeerUnreachable(DeltavolError):
    """peer deltavol server {api}: {why}"""

    http_status = 502


class PayloadTooLarge(UsageError):
    """request body too large: more than {cap} bytes"""

    http_status = 413


class PeerRefused(Conflict):
    """peer deltavol server {api} refused: {why}"""


class ReversePending(Conflict):
    """session {name!r}: its reverse to {api} is not settled ({why}): run 'session reverse {name}' again"""
