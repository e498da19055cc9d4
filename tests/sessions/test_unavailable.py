"""Start-up keeps going past a session it cannot load (its source volume is missing, or
its row's update record cannot be read): the server starts, the session is listed as
``unavailable`` with the reason, every action but ``remove`` is refused with it, its name
and target stay its own, the other sessions work, and ``remove`` cleans it up."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from tests.harness import Server
from tests.sessions.common import MiB, Model, apply, differing_chunks, refused_open, volume_path

pytestmark = pytest.mark.interop

SIZE = 4 * MiB


def two_sessions(server: Server) -> tuple[Model, Model]:
    """Sessions s (src -> dst) and t (src2 -> dst2), each after a finished full update."""
    models = []
    for session, src, dst, pattern in (("s", "src", "dst", 0xAA), ("t", "src2", "dst2", 0x11)):
        server.cli("volume", "create", src, "--size", str(SIZE))
        server.cli("volume", "create", dst, "--size", str(SIZE))
        model = Model(SIZE)
        apply(server, src, model.write(pattern, 0, SIZE))
        server.cli("session", "create", session, "--source", src, "--target", dst)
        server.cli("session", "update", session, "--full", "--wait")
        assert server.image(dst) == model.snapshot()
        models.append(model)
    return models[0], models[1]


def listed(server: Server) -> dict[str, dict]:
    return {s["name"]: s for s in json.loads(server.cli("session", "list", "--json"))}


def refused(server: Server, code: int, *args: str) -> str:
    out = server.run(*args)
    assert out.returncode == code, (args, out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr + out.stdout
    return out.stderr


def other_session_still_copies(server: Server, model: Model) -> None:
    """Session t: a change on its source, an incremental update, exact bytes on its target."""
    apply(server, "src2", *model.chunks(0x22, [0, 5, 63]))
    server.cli("session", "update", "t", "--wait")
    got = server.image("dst2")
    assert got == model.snapshot(), f"dst2 differs in chunks {differing_chunks(got, model.snapshot())}"


def check_unavailable(server: Server, words: str) -> dict:
    """s is listed unavailable with a reason holding ``words``; its actions are refused
    (409: exit 1) with that reason, and its name and target stay its own."""
    st = listed(server)["s"]
    assert st["state"] == "unavailable" and words in st["last_error"], st
    assert (st["source"], st["target"], st["consistent"]) == ("src", "dst", True)
    status = json.loads(server.cli("session", "status", "s", "--json"))
    assert {**status, "rpo_seconds": None} == {**st, "rpo_seconds": None}
    for action in (["update", "s"], ["pause", "s"], ["resume", "s"], ["cancel", "s"], ["verify", "s"]):
        err = refused(server, 1, "session", *action)
        assert "unavailable" in err and words in err, (action, err)
    server.cli("volume", "create", "other", "--size", str(SIZE))
    assert "exists" in refused(server, 1, "session", "create", "s", "--source", "other", "--target", "dst2x")
    assert "dst" in refused(server, 1, "session", "create", "u", "--source", "other", "--target", "dst")
    assert "unavailable" in refused_open(server, "dst")
    server.cli("volume", "remove", "other")
    return st


def removed_cleanly(server: Server, root: Path) -> None:
    server.cli("session", "remove", "s")
    assert set(listed(server)) == {"t"}
    assert "does not exist" in refused(server, 1, "session", "status", "s")
    assert not list((root / "bitmaps").glob("s.*")) and not list((root / "save").glob("s.*"))
    apply(server, "dst", "write -P 0x5A 0 64k")  # the target is an ordinary volume again
    server.stop()
    seen = len(server.log_path.read_text())
    server.start()  # a restart after the remove: s is gone for good
    assert set(listed(server)) == {"t"}
    assert "unavailable" not in server.log_path.read_text()[seen:]


def test_a_session_whose_source_is_missing_is_listed_refused_and_removable(server: Server) -> None:
    _, model_t = two_sessions(server)
    image = volume_path(server, "src")
    server.stop()
    image.rename(image.with_name("src.offline"))  # its file is gone at this start
    server.start()
    check_unavailable(server, "'src' is missing")
    other_session_still_copies(server, model_t)
    server.stop()
    image.with_name("src.offline").rename(image)  # back: the next start loads it as it was
    server.start()
    st = listed(server)["s"]
    assert (st["state"], st["consistent"], st["last_error"]) == ("idle", True, None), st
    server.stop()
    image.unlink()  # gone for good
    server.start()
    check_unavailable(server, "'src' is missing")
    removed_cleanly(server, server.root)


@pytest.mark.parametrize(
    "record, words",
    [
        ('{"version": 99, "id": 1}', "version 99"),
        ("{not json", "not JSON"),
    ],
)
def test_a_session_whose_update_row_cannot_be_read_is_unavailable_alone(
    server: Server, record: str, words: str
) -> None:
    _, model_t = two_sessions(server)
    server.stop()
    with sqlite3.connect(server.root / "deltavol.db") as conn:
        conn.execute("UPDATE sessions SET update_json = ? WHERE name = 's'", (record,))
    conn.close()
    server.start()
    st = check_unavailable(server, words)
    assert "row" in st["last_error"], st
    other_session_still_copies(server, model_t)
    apply(server, "src", "write -P 0x33 0 64k")  # its source is served as before
    removed_cleanly(server, server.root)
