"""Step 01: the echo WebSocket."""

from fastapi.testclient import TestClient

from step01_echo_ws.main import app

APP = "step01_echo_ws.main"


def test_page_is_served_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the static folder is found next to the module, not the cwd
    response = TestClient(app).get("/")
    assert response.status_code == 200
    assert "new WebSocket" in response.text


def test_each_text_frame_is_echoed(connect):
    ws = connect()
    for text in ["hello", "second message", "ünïcødé ✓"]:
        ws.send_text(text)
        assert text in ws.receive_text()


def test_echo_keeps_the_received_text_whole(connect):
    ws = connect()
    text = "x" * 10_000
    ws.send_text(text)
    assert ws.receive_text() == f"Echo: {text}"


def test_a_closed_connection_leaves_the_server_serving(connect):
    first = connect()
    first.send_text("one")
    first.receive_text()
    first.close()
    second = connect()
    second.send_text("two")
    assert second.receive_text() == "Echo: two"
