"""Fixtures: one fake LLM for the whole run, and WebSocket connections to a step's app.

Test files name their app in a module-level APP ("step02_llm_stream.main"); the
`connect` fixture then runs every test twice: through Starlette's TestClient and
against the same app under a real uvicorn process.
"""

import atexit
import importlib
import os
import shutil
import tempfile
from urllib.parse import urlencode

import pytest

from grading.pytest_plugin import code_folder
from tests.fake_llm import FakeLLMServer
from tests.redis_server import RedisServer
from tests.support import LiveServer, LocalClient, WsClient, llm_env, read_conversation

LLM_VARIABLES = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_MODEL")

# step04's conversations go to a throwaway SQLite file for the whole run, never the
# repository's; set before any step is imported, and inherited by every server process.
STORE_DIR = tempfile.mkdtemp(prefix="chat-store-")
atexit.register(shutil.rmtree, STORE_DIR, ignore_errors=True)
os.environ["CHAT_STORE_URL"] = f"sqlite:///{STORE_DIR}/chat.sqlite3"


@pytest.fixture(scope="session")
def fake_server():
    with FakeLLMServer() as server:
        yield server


@pytest.fixture
def fake(fake_server, monkeypatch):
    """The fake LLM, reset, with the steps pointed at it."""
    fake_server.fake.reset()
    for name in LLM_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OPENAI_BASE_URL", fake_server.base_url)
    yield fake_server.fake


@pytest.fixture(scope="module")
def live_server(request, fake_server):
    # A test module may add settings for its server in SERVER_ENV.
    env = llm_env(fake_server.base_url, **getattr(request.module, "SERVER_ENV", {}))
    folder = code_folder(request.config)  # uvicorn imports the app from there, like the tests
    extra_args = () if folder is None else ("--app-dir", str(folder))
    with LiveServer(request.module.APP + ":app", env=env, extra_args=extra_args) as server:
        yield server


def conversation_query(conversation: str | None) -> str:
    return "" if conversation is None else "?" + urlencode({"conversation": conversation})


@pytest.fixture(params=["testclient", "uvicorn"])
def connect(request, fake):
    """connect() opens a WebSocket to the test module's app at /ws;
    connect(conversation=id) asks step04 to continue that conversation."""
    if request.param == "uvicorn":
        server = request.getfixturevalue("live_server")
        opened = []

        def open_live(conversation=None, **options):
            opened.append(WsClient(server.ws_url + conversation_query(conversation), **options))
            return opened[-1]

        yield open_live
        for ws in opened:
            ws.close()
        return

    app = importlib.import_module(request.module.APP).app
    with LocalClient(app) as client:
        sessions = []

        def open_in_process(conversation=None, **options):
            session = client.websocket_connect("/ws" + conversation_query(conversation), **options)
            opened = session.__enter__()
            sessions.append(session)  # only an opened session needs closing
            return opened

        try:
            yield open_in_process
        finally:  # however the test ended: a session left open keeps the client from closing
            for session in sessions:
                try:
                    session.__exit__(None, None, None)
                except NotImplementedError:
                    # An exercise's unwritten task raising as the client leaves: graded by that
                    # task's own tests, so it does not fail every other task's tests too.
                    pass


@pytest.fixture
def chat(connect):
    """step04: like connect, past the conversation frame that opens every connection."""
    def open_chat(**options):
        ws = connect(**options)
        read_conversation(ws)
        return ws
    return open_chat


@pytest.fixture
def redis_server(tmp_path):
    """A real redis-server of its own, on a free loopback port."""
    with RedisServer(tmp_path / "redis") as server:
        yield server
