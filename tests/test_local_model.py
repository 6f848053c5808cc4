"""The embedded local model (llama.cpp via xllamacpp, SmolLM2-135M): real tokens, no key, no network."""

import asyncio
import logging
import signal
import socket
import threading

import pytest

import local_llm
from harness.fake_llm import free_port
from harness.notebooks import execute, text_output
from harness.support import LiveServer, LocalClient, WsClient, collect_reply, llm_env, read_conversation, reply_text
from local_llm import LocalModelError, start_local_llm
from step05_production import main as chat_main
from step05_production.config import settings
from step05_production.store import new_conversation_id, open_store

pytestmark = [pytest.mark.slow, pytest.mark.model]


@pytest.fixture(scope="module")
def model_url():
    port = free_port()
    server = start_local_llm(port=port)
    yield local_llm.base_url(port=port)
    del server


@pytest.fixture
def on_local_model(model_url, monkeypatch):
    for name in ("OPENAI_API_KEY", "OPENAI_MODEL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OPENAI_BASE_URL", model_url)
    return model_url


def assert_streamed_reply(frames):
    if frames[0]["type"] == "conversation":  # step05 says which conversation first
        frames = frames[1:]
    kinds = [f["type"] for f in frames]
    assert kinds[0] == "start" and kinds[-1] == "end", kinds[-1:]
    chunks = [f["content"] for f in frames if f["type"] == "chunk"]
    assert len(chunks) >= 3 and all(chunks)
    assert frames[-1]["stats"]["chunks"] == len(chunks)


def test_a_real_reply_streams_through_step05(on_local_model):
    with LocalClient(chat_main.app) as client, client.websocket_connect("/ws") as ws:
        ws.send_json({"type": "message", "content": "What is the capital of France?"})
        frames = collect_reply(ws)
    assert_streamed_reply(frames)
    print("model said:", reply_text(frames))


def test_a_conversation_longer_than_the_models_context_still_gets_a_reply(on_local_model, monkeypatch, caplog):
    """The embedded model holds 2,048 tokens per request. A long story, then a short turn (~2,300
    tokens in all): the model refuses the whole history (HTTP 400), so the reply is asked for
    again with the oldest turn left out (and only ~300 tokens to read: quick on any machine)."""
    monkeypatch.setattr(settings, "max_reply_tokens", 16)  # the prompt is what is tested here
    caplog.set_level(logging.INFO, logger="step05_production.nodes")
    conversation = new_conversation_id()
    sentence = "The baker rose before dawn to knead the bread, and the whole street smelled of it. "

    async def store_turns():
        store = open_store(settings.store_url)
        try:
            await store.add_turn(conversation, "Write a long story.", sentence * 100, turn=1)
            await store.add_turn(conversation, "Now a short one.", sentence * 12, turn=2)
        finally:
            await store.close()

    asyncio.run(store_turns())
    with LocalClient(chat_main.app) as client, client.websocket_connect(f"/ws?conversation={conversation}") as ws:
        assert len(read_conversation(ws)["messages"]) == 4
        ws.send_json({"type": "message", "content": "How does the story end?"})
        frames = collect_reply(ws)
    assert (frames[0]["type"], frames[-1]["type"]) == ("start", "end"), frames[-1]
    assert reply_text(frames), "the reply streams"
    assert "the model's context held 2 of 4 earlier messages" in caplog.text, "the whole history did not fit"


def test_two_chats_stream_at_the_same_time(model_url):
    env = llm_env(model_url)
    results = {}
    with LiveServer("step05_production.main:app", env=env) as server:

        def chat(name):
            with WsClient(server.ws_url) as ws:
                ws.send_json({"type": "message", "content": f"Write a short poem about {name}."})
                results[name] = collect_reply(ws, timed=True)

        threads = [threading.Thread(target=chat, args=(name,)) for name in ("rain", "bread")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    for frames in results.values():
        assert_streamed_reply([frame for _, frame in frames])
    # Continuous batching: each chat's first chunk comes before the other chat has finished.
    first = {name: next(at for at, f in frames if f["type"] == "chunk") for name, frames in results.items()}
    end = {name: frames[-1][0] for name, frames in results.items()}
    assert first["rain"] < end["bread"] and first["bread"] < end["rain"]


def test_the_stream_llm_notebook_runs_on_the_local_model(on_local_model):
    output = text_output(execute("01_stream_llm.ipynb"))
    assert "chunks; the whole reply" in output and "'finish_reason': 'stop'" in output
    assert "took [" in output and "Could not reach" in output


def test_a_missing_model_package_is_explained(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(LocalModelError, match="make setup"):
        local_llm.model_path()


def test_a_corrupt_model_file_is_explained(tmp_path):
    corrupt = tmp_path / "broken.gguf"
    corrupt.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    with pytest.raises(LocalModelError, match="corrupt"):
        start_local_llm(port=free_port(), model=corrupt)


def test_a_taken_port_is_explained():
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        with pytest.raises(LocalModelError, match="already taken"):
            start_local_llm(port=squatter.getsockname()[1])


def run_make_chat(env, *args):
    """What `make chat` runs, on free ports, as a subprocess."""
    import os
    import subprocess
    import sys

    from harness.support import ROOT

    chat_port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "local_llm", "chat", "--chat-port", str(chat_port), *args],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        text=True,
    )
    printed = []
    for line in process.stdout:  # the URL is printed once the chat answers, so no waiting after it
        printed.append(line)
        if "Chat: open" in line:
            return process, f"ws://127.0.0.1:{chat_port}/ws", "".join(printed)
    raise AssertionError(f"make chat never printed its URL:\n{''.join(printed)}")


@pytest.mark.parametrize("configured", [True, False], ids=["OPENAI_BASE_URL set", "nothing set"])
def test_make_chat_uses_the_configured_llm_or_starts_the_local_one(fake_server, configured):
    env = {"OPENAI_API_KEY": "", "OPENAI_MODEL": "", "OPENAI_BASE_URL": fake_server.base_url if configured else ""}
    fake_server.fake.reset()
    process, ws_url, printed = run_make_chat(env, "--port", str(free_port()))
    try:
        with WsClient(ws_url) as ws:  # at once: the URL promised a chat that answers
            ws.send_json({"type": "message", "content": "Say hi"})
            frames = collect_reply(ws)
    finally:
        process.send_signal(signal.SIGINT)  # Ctrl-C
        output = printed + process.communicate(timeout=20)[0]
    assert_streamed_reply(frames)
    assert "Chat: open http://127.0.0.1:" in output
    if configured:
        assert "no local model started" in output and fake_server.fake.completed == 1
    else:
        assert "Local model smollm2-135m-instruct ready" in output and fake_server.fake.started == 0
    assert process.returncode == 0 and "Stopped." in output, "Ctrl-C should stop everything cleanly"


def test_make_llm_starts_again_at_once_after_it_is_stopped():
    """A stopped server leaves its connections in TIME-WAIT for about a minute; they must
    not look like a running server to the port check."""
    import os
    import subprocess
    import sys

    import httpx

    from harness.support import ROOT

    port = free_port()
    command = [sys.executable, "-m", "local_llm", "serve", "--port", str(port)]
    for attempt in ("first start", "restart"):
        process = subprocess.Popen(
            command, cwd=ROOT, env=os.environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        try:
            first_line = process.stdout.readline()  # printed once the model is loaded, or an error
            assert "ready at" in first_line, f"{attempt}: {first_line}{process.stdout.read()}"
            # A client keeps its connection open (as a step's app does): stopping the server
            # closes it from the server's side, which leaves it in TIME-WAIT on this port.
            client = httpx.Client(timeout=10)
            assert client.get(f"http://127.0.0.1:{port}/v1/models").status_code == 200
        finally:
            process.send_signal(signal.SIGINT)
            process.communicate(timeout=20)
            client.close()
        assert process.returncode == 0, f"{attempt}: Ctrl-C should stop it cleanly"


def test_make_chat_says_clearly_when_its_port_is_taken(fake_server):
    import os
    import subprocess
    import sys

    from harness.support import ROOT

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        env = {**os.environ, **llm_env(fake_server.base_url)}
        result = subprocess.run(
            [sys.executable, "-m", "local_llm", "chat", "--chat-port", str(port)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode != 0
    assert "Chat: open" not in result.stdout, "it must not invite the user to a port it cannot use"
    assert f"Port {port}" in result.stderr and "PORT=" in result.stderr, result.stderr
