"""Step 01: the echo WebSocket."""

import time

import pytest
from fastapi.testclient import TestClient

from harness.support import WsClient
from step01_echo_ws.main import app

APP = "step01_echo_ws.main"


def test_page_is_served_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the static folder is found next to the module, not the cwd
    response = TestClient(app).get("/")
    assert response.status_code == 200
    assert "new WebSocket" in response.text


@pytest.mark.task("1.1")
def test_each_text_frame_is_echoed(connect):
    ws = connect()
    for text in ["hello", "second message", "ünïcødé ✓"]:
        ws.send_text(text)
        assert text in ws.receive_text()


@pytest.mark.task("1.1")
def test_echo_keeps_the_received_text_whole(connect):
    ws = connect()
    text = "x" * 10_000
    ws.send_text(text)
    assert ws.receive_text() == f"Echo: {text}"


@pytest.mark.task("1.1")
def test_a_closed_connection_leaves_the_server_serving(connect):
    first = connect()
    first.send_text("one")
    first.receive_text()
    first.close()
    second = connect()
    second.send_text("two")
    assert second.receive_text() == "Echo: two"


@pytest.mark.task("1.1")
def test_a_client_leaving_is_not_an_error_in_the_server():
    # In-process, an exception raised by the handler after the client left comes back here.
    with TestClient(app) as client:
        with client.websocket_connect("/ws") as ws:
            ws.send_text("bye")
            assert ws.receive_text() == "Echo: bye"


@pytest.mark.task("1.1")
def test_the_real_server_logs_no_error_when_a_client_leaves(live_server):
    ws = WsClient(live_server.ws_url)
    ws.send_text("bye")
    assert ws.receive_text() == "Echo: bye"
    ws.close()
    time.sleep(0.3)  # give the server a moment to handle the close
    log = live_server.log_text()
    assert "Traceback" not in log and "Exception" not in log, f"the server logged an error:\n{log}"
