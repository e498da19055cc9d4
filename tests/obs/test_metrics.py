"""``GET /metrics``: checked by promtool, read by a real Prometheus server over TCP with the
token, and its facts kept across a restart."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

from tests.harness import Server, require
from tests.obs.common import MiB, TcpServer, free_port, get, metric, tcp_get
from tests.sessions.common import apply

KiB = 1 << 10


def scrape(server: Server) -> str:
    status, body = get(server, "/metrics")
    assert status == 200, body
    return body.decode()


def promtool_check(text: str) -> None:
    require("promtool")
    out = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_exposition_passes_promtool_and_counts_what_happened(server: Server) -> None:
    require("qemu-io")
    server.cli("volume", "create", "a", "--size", "8MiB")
    server.cli("volume", "create", "b", "--size", "8MiB")
    server.cli("session", "create", "s", "--source", "a", "--target", "b")
    promtool_check(scrape(server))  # with nothing counted yet
    apply(server, "a", "write -P 1 0 1M")
    server.cli("session", "update", "s", "--wait")
    # 3 chunks of 64 KiB written since the mark, one of them twice, one partly
    apply(server, "a", "write -P 2 0 64k", "write -P 3 64k 64k", "write -P 4 0 4k", "write -P 5 1M 512")
    text = scrape(server)
    promtool_check(text)
    assert metric(text, "deltavol_tracked_bytes", session="s") == 3 * 64 * KiB
    assert metric(text, "deltavol_transfer_remaining_bytes", session="s") == 0
    assert metric(text, "deltavol_nbd_requests_total", export="a", op="write") == 5
    assert metric(text, "deltavol_nbd_bytes_total", export="a", op="write") == MiB + 128 * KiB + 4 * KiB + 512
    assert metric(text, "deltavol_nbd_request_duration_seconds_count", export="a", op="write") == 5
    inf = metric(text, "deltavol_nbd_request_duration_seconds_bucket", export="a", op="write", le="+Inf")
    assert inf == 5
    assert metric(text, "deltavol_nbd_requests_total", export="b", op="write") == 0  # copies bypass NBD
    assert metric(text, "deltavol_connections", export="a") == 0  # qemu-io is gone
    assert metric(text, "deltavol_updates_total", session="s", kind="full", result="success") == 1
    assert metric(text, "deltavol_full_copies_total", session="s", reason="initial") == 1
    assert metric(text, "deltavol_sent_bytes_total", session="s") == MiB  # the full copy skips holes
    assert metric(text, "deltavol_session_state", session="s", state="idle") == 1
    assert metric(text, "deltavol_session_state", session="s", state="copying") == 0
    assert 0 <= (metric(text, "deltavol_rpo_seconds", session="s") or -1) < 60
    assert (metric(text, "deltavol_fsyncs_total", file="tracking") or 0) >= 1
    assert metric(text, "deltavol_event_loop_lag_seconds") is not None
    success = metric(text, "deltavol_last_success_timestamp_seconds", session="s")
    assert success is not None and abs(success - time.time()) < 60
    assert metric(text, "deltavol_last_failure_timestamp_seconds", session="s") is None
    vols = {v["name"]: v for v in json.loads(server.cli("volume", "list", "--json"))}
    assert vols["a"]["written_bytes"] == MiB + 128 * KiB + 4 * KiB + 512 and vols["a"]["connections"] == 0
    assert "WRITTEN" in server.cli("volume", "list")


def test_facts_survive_a_restart(server: Server) -> None:
    require("qemu-io")
    server.cli("volume", "create", "a", "--size", "4MiB")
    server.cli("volume", "create", "b", "--size", "4MiB")
    server.cli("session", "create", "s", "--source", "a", "--target", "b")
    apply(server, "a", "write -P 1 0 1M")
    server.cli("session", "update", "s", "--wait")
    apply(server, "a", "write -P 2 0 256k")
    server.cli("session", "update", "s", "--wait")
    server.cli("session", "update", "s", "--wait", "--full")
    before = scrape(server)
    status = server.status()
    server.stop()
    server.start()
    after = scrape(server)
    for name, labels in [
        ("deltavol_updates_total", {"kind": "full", "result": "success"}),
        ("deltavol_updates_total", {"kind": "incremental", "result": "success"}),
        ("deltavol_full_copies_total", {"reason": "initial"}),
        ("deltavol_full_copies_total", {"reason": "requested"}),
        ("deltavol_sent_bytes_total", {}),
        ("deltavol_last_success_timestamp_seconds", {}),
    ]:
        value = metric(after, name, session="s", **labels)
        assert value is not None and value == metric(before, name, session="s", **labels), (name, labels)
    assert metric(after, "deltavol_updates_total", session="s", kind="full", result="success") == 2
    assert metric(after, "deltavol_updates_total", session="s", kind="incremental", result="success") == 1
    assert metric(after, "deltavol_full_copies_total", session="s", reason="requested") == 1
    assert metric(after, "deltavol_sent_bytes_total", session="s") == 2 * MiB + 256 * KiB
    assert server.status()["last_success_at"] == status["last_success_at"] is not None
    # the NBD counters are since the start: they begin again
    assert metric(after, "deltavol_nbd_requests_total", export="a", op="write") == 0
    # a removed session's facts go with it: a new one of the same name starts from nothing
    server.cli("session", "remove", "s")
    server.cli("session", "create", "s", "--source", "a", "--target", "b")
    fresh = scrape(server)
    assert metric(fresh, "deltavol_updates_total", session="s", kind="full", result="success") is None
    assert server.status()["last_success_at"] is None


def test_metrics_over_tcp_need_the_token(tcp_server: TcpServer) -> None:
    status, _ = tcp_get(tcp_server, "/metrics", None)
    assert status == 401
    status, _ = tcp_get(tcp_server, "/metrics", "wrong")
    assert status == 401
    status, body = tcp_get(tcp_server, "/metrics", tcp_server.token)
    assert status == 200 and b"deltavol_event_loop_lag_seconds" in body


def test_a_real_prometheus_scrapes_the_tracked_bytes(tcp_server: TcpServer, tmp_path: Path) -> None:
    require("prometheus", "qemu-io")
    srv = tcp_server
    srv.cli("volume", "create", "a", "--size", "8MiB")
    srv.cli("volume", "create", "b", "--size", "8MiB")
    srv.cli("session", "create", "s", "--source", "a", "--target", "b")
    srv.cli("session", "update", "s", "--wait")
    apply(srv, "a", "write -P 7 1M 320k")  # 5 chunks
    token_file = tmp_path / "token"
    token_file.write_text(srv.token)
    config = tmp_path / "prometheus.yml"
    config.write_text(
        # a scrape of a loaded machine's server may take more than a second: one that times
        # out marks the job down and the metric stale
        "global:\n  scrape_interval: 3s\n  scrape_timeout: 3s\n"
        "scrape_configs:\n"
        "  - job_name: deltavol\n"
        "    authorization:\n"
        f"      credentials_file: {token_file}\n"
        "    static_configs:\n"
        f"      - targets: ['127.0.0.1:{srv.port}']\n"
    )
    port = free_port()
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115
    prom = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=log,
    )
    try:
        query = urllib.parse.urlencode({"query": 'deltavol_tracked_bytes{session="s"}'})
        url = f"http://127.0.0.1:{port}/api/v1/query?{query}"
        deadline = time.monotonic() + 60
        result: list = []
        while time.monotonic() < deadline:
            assert prom.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(url, timeout=5) as resp:
                    answer = json.load(resp)
                result = answer["data"]["result"]
                if result:
                    break
            except OSError:
                pass  # not listening yet
            time.sleep(0.5)
        assert result, "Prometheus never had the metric: " + (tmp_path / "prometheus.log").read_text()[-3000:]
        assert result[0]["metric"]["job"] == "deltavol"
        assert float(result[0]["value"][1]) == 5 * 64 * KiB
        up = urllib.parse.urlencode({"query": "up"})
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/query?{up}", timeout=5) as resp:
            assert json.load(resp)["data"]["result"][0]["value"][1] == "1"
    finally:
        prom.terminate()
        prom.wait(30)
        log.close()
