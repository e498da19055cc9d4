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


class Error(DeltavolError):
    """{msg}"""


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


class AlreadyExists(DeltavolError):
    """{kind} {name!r} already exists"""

    http_status = 409


class InUse(DeltavolError):
    """{kind} {name!r} is in use: {why}"""

    http_status = 409
    nbd_errno = _errno.EPERM


class Protected(DeltavolError):
    """volume {name!r} is protected: {why}"""

    http_status = 409
    nbd_errno = _errno.EPERM


class OutOfRange(DeltavolError):
    """request {offset}+{length} is beyond the end of {name!r} ({size} bytes)"""

    http_status = 400
    nbd_errno = _errno.EINVAL


class ReadOnly(DeltavolError):
    """{name!r} is read-only"""

    http_status = 409
    nbd_errno = _errno.EPERM


class NoSpace(DeltavolError):
    """no space left writing {what}"""

    http_status = 507
    nbd_errno = _errno.ENOSPC


class DataDirLocked(DeltavolError):
    """data dir {path} is in use by another deltavol server (pid {pid})"""


class CorruptFile(DeltavolError):
    """{path} is corrupt: {why}"""


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
    return Error(msg=f"{what}: {exc.strerror or exc}")


class TlsFileMissing(UsageError):
    """TLS file {path} is missing ({role}); {hint}"""


class TlsFileInvalid(UsageError):
    """TLS file {path} cannot be used ({role}): {why}"""


class InsecureListen(UsageError):
    """refusing to serve {what} on {address} in plain text: anyone who can reach it could {risk}; {hint}"""


class TlsVerifyFailed(DeltavolError):
    """cannot trust {peer}: {why}"""
