"""step05's production start, `python -m step05_production`: uvicorn with every server-level
limit set; and what a plain `uvicorn step05_production.main:app` is told at start-up."""

import os
import signal
import subprocess
import sys

import pytest
from websockets.exceptions import ConnectionClosed

from harness.fake_llm import free_port
from harness.support import (
    ROOT,
    LiveServer,
    WsClient,
    collect_reply,
    llm_env,
    read_conversation,
    reply_text,
    wait_for_port,
)
from step05_production.__main__ import parse_arguments
from step05_production.config import settings
from step05_production.server import HTTP_CONNECTIONS_MARGIN, server_limits

ADVICE = "python -m step05_production"  # what the app says when its command lacks a limit


def entry_point_server(fake_server, *options: str) -> LiveServer:
    """`python -m step05_production` on a free loopback port, its LLM the fake."""
    server = LiveServer("unused", env=llm_env(fake_server.base_url))
    server.command = [
        sys.executable,
        "-m",
        "step05_production",
        "--host",
        "127.0.0.1",
        "--port",
        str(server.port),
        *options,
    ]
    return server


def test_the_server_limits_follow_the_chats_settings(monkeypatch):
    monkeypatch.setattr(settings, "max_frame_bytes", 1234)
    limits = server_limits()
    assert limits["ws_max_size"] == 1234
    assert limits["ws_per_message_deflate"] is False
    assert limits["timeout_graceful_shutdown"] > 0


def test_uvicorn_serves_the_chats_connections_and_no_more_than_a_margin_besides(monkeypatch):
    monkeypatch.setattr(settings, "max_connections", 300)
    assert 300 < server_limits()["limit_concurrency"] <= 300 + HTTP_CONNECTIONS_MARGIN


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prlimit and /proc are Linux's")
def test_a_plain_uvicorn_command_with_too_few_open_files_is_told_so(fake_server, fake):
    # Only the entry point raises the open-file limit: under a plain command the app says
    # what it lacks, the concurrency limit and the files for CHAT_MAX_CONNECTIONS.
    server = LiveServer("step05_production.main:app", env=llm_env(fake_server.base_url, CHAT_MAX_CONNECTIONS="1000"))
    server.command = ["prlimit", "--nofile=256:512", *server.command]
    with server:
        with WsClient(server.ws_url) as ws:
            read_conversation(ws)
        with open(f"/proc/{server.process.pid}/limits") as limits:
            soft_limit = next(line for line in limits if line.startswith("Max open files")).split()[3]
        log = server.log_text()
    assert soft_limit == "256"  # left as it was: not the app's to change
    assert "limit_concurrency=None" in log and ADVICE in log, log
    assert "This process may open 256 files, fewer than the" in log and "CHAT_MAX_CONNECTIONS=1000" in log, log


def test_the_entry_point_takes_the_servers_options():
    args = parse_arguments(
        [
            "--host",
            "0.0.0.0",
            "--port",
            "9000",
            "--workers",
            "3",
            "--forwarded-allow-ips",
            "10.0.0.2",
            "--timeout-keep-alive",
            "75",
        ]
    )
    assert (args.host, args.port, args.workers, args.forwarded_allow_ips, args.timeout_keep_alive) == (
        "0.0.0.0",
        9000,
        3,
        "10.0.0.2",
        75,
    )
    defaults = parse_arguments([])
    assert (defaults.host, defaults.port, defaults.workers) == ("127.0.0.1", 8000, 1)


@pytest.mark.slow
def test_the_entry_point_serves_the_chat_and_refuses_a_frame_over_the_limit(fake_server, fake):
    with entry_point_server(fake_server) as server:
        with WsClient(server.ws_url) as ws:
            read_conversation(ws)
            ws.send_text("x" * (settings.max_frame_bytes + 1))
            with pytest.raises(ConnectionClosed) as closed:
                ws.receive_text(timeout=10)
            assert closed.value.rcvd.code == 1009  # "message too big": uvicorn refused it
        with WsClient(server.ws_url) as ws:
            read_conversation(ws)
            ws.send_json({"type": "message", "content": "served"})
            assert reply_text(collect_reply(ws)) == "You said: served"
        log = server.log_text()
    assert ADVICE not in log, log  # nothing lacking: no warning


@pytest.mark.slow
def test_a_plain_uvicorn_command_is_told_what_it_lacks(fake_server, fake):
    with LiveServer("step05_production.main:app", env=llm_env(fake_server.base_url)) as server:
        with WsClient(server.ws_url) as ws:  # started, and serving
            read_conversation(ws)
        log = server.log_text()
    assert ADVICE in log and "ws_per_message_deflate=True" in log and "ws_max_size=16777216" in log, log


@pytest.mark.slow
@pytest.mark.parametrize("http", ["auto", "httptools", "h11"])
def test_a_plain_uvicorn_command_is_told_when_h11_replaces_httptools(http, fake_server, fake):
    # httptools bounds neither a request head's size nor pipelined requests: the app serves
    # with h11 instead (tests/test_step05_exhaustion.py, section 9), and says so.
    extra = ("--http", http)
    with LiveServer("step05_production.main:app", env=llm_env(fake_server.base_url), extra_args=extra) as server:
        with WsClient(server.ws_url) as ws:
            read_conversation(ws)
        log = server.log_text()
    assert ("Serving HTTP with h11, not httptools" in log) == (http != "h11"), log


@pytest.mark.slow
def test_uvicorn_run_with_the_app_object_warns_that_the_frame_limit_is_not_applied(fake_server, fake):
    # uvicorn.run(app) imports nothing itself: the app was imported before uvicorn's
    # settings existed, so the app cannot lower the frame limit, and says so.
    server = LiveServer("unused", env=llm_env(fake_server.base_url))
    run_with_the_app_object = (
        "import uvicorn; from step05_production.main import app; "
        f"uvicorn.run(app, host='127.0.0.1', port={server.port}, log_level='warning')"
    )
    server.command = [sys.executable, "-c", run_with_the_app_object]
    with server:
        with WsClient(server.ws_url) as ws:
            read_conversation(ws)
        log = server.log_text()
    assert "cannot lower the server's WebSocket frame limit" in log, log


@pytest.mark.slow
def test_make_chat_runs_the_chat_with_the_same_server_limits(fake_server, fake):
    port = free_port()  # `make chat` with OPENAI_BASE_URL set: the chat alone, no local model
    process = subprocess.Popen(
        [sys.executable, "-m", "local_llm", "chat", "--chat-port", str(port)],
        cwd=ROOT,
        env={**os.environ, **llm_env(fake_server.base_url)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_port(port, timeout=60, process=process)
        with WsClient(f"ws://127.0.0.1:{port}/ws") as ws:
            read_conversation(ws)
            ws.send_text("x" * (settings.max_frame_bytes + 1))
            with pytest.raises(ConnectionClosed) as closed:
                ws.receive_text(timeout=10)
            assert closed.value.rcvd.code == 1009
    finally:
        process.send_signal(signal.SIGINT)  # Ctrl-C
        log = "".join(process.communicate(timeout=30))
    assert ADVICE not in log, log
