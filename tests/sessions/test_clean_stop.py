"""A clean stop seals the save area, so a reboot after it keeps the update's point in time:
the interrupted update finishes its own mark, as after a kill, instead of re-marking as
after a power loss (DESIGN section 3). The server runs as ``deltavol serve`` with a boot id
of its own at each start (a bind mount over /proc/sys/kernel/random/boot_id, in a mount
namespace of its own): every start is a reboot to it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.harness import DELTAVOL, Server, require
from tests.sessions.common import MiB, apply, differing_chunks, session_with_copy, start_update, wait_for

pytestmark = pytest.mark.interop

SIZE = 8 * MiB  # 128 chunks


class RebootingServer(Server):
    """A server that believes the machine booted anew at each start."""

    def start(self) -> None:
        boot = self.root.with_name(f"boot-{uuid.uuid4()}")
        boot.write_text(str(uuid.uuid4()) + "\n")
        script = 'mount --bind "$0" /proc/sys/kernel/random/boot_id && exec "$@"'
        self.exe = ("unshare", "-m", "sh", "-c", script, str(boot), DELTAVOL)
        super().start()


@contextmanager
def running(server: Server) -> Iterator[Server]:
    server.start()
    try:
        yield server
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.stop()
        server.log.close()
    assert "Traceback" not in server.log_path.read_text()


def test_a_clean_stop_and_a_reboot_keep_the_point_in_time(tmp_path: Path) -> None:
    require("unshare", "qemu-io")
    server = RebootingServer(tmp_path / "data", "--retry-limit", "0")
    with running(server):
        model = session_with_copy(server, SIZE)
        apply(server, "src", *model.chunks(0xBB, list(range(64))))
        at_mark = model.snapshot()
        u = start_update(server, "--max-rate", "512KiB/s")["update"]  # 4 MiB owed: about 8 s
        apply(server, "src", *model.chunks(0xCC, [60, 61, 62, 63]))  # still owed: saved first
        st = server.status()
        assert st["state"] == "copying" and st["update"]["cofw_saved_bytes"] >= 4 * 64 * 1024, st
        server.stop()  # SIGTERM: a clean stop seals the save area
        server.start()  # another boot
        st = wait_for(server, lambda s: s["state"] == "idle", "idle", timeout=120)
        assert st["update"]["id"] == u["id"] and st["update"]["remark"] is None, f"re-marked: {st}"
        assert st["consistent"] and st["point_in_time"] == u["marked_at"], st
        dst = server.image("dst")
        assert not differing_chunks(dst, at_mark), "the target is not the source at the mark"
        assert dst != model.snapshot()
