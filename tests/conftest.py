"""Fixtures: one fake LLM for the whole run, and WebSocket connections to a step's app.

Test files name their app in a module-level APP ("step02_llm_stream.main"); the
`connect` fixture then runs every test twice: through Starlette's TestClient and
against the same app under a real uvicorn process.
"""

import importlib

import pytest

from grading.pytest_plugin import code_folder
from tests.fake_llm import FakeLLMServer
from tests.support import LocalClient, LiveServer, WsClient, llm_env

LLM_VARIABLES = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_MODEL")


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
    env = llm_env(fake_server.base_url)
    folder = code_folder(request.config)  # uvicorn imports the app from there, like the tests
    extra_args = () if folder is None else ("--app-dir", str(folder))
    with LiveServer(request.module.APP + ":app", env=env, extra_args=extra_args) as server:
        yield server


@pytest.fixture(params=["testclient", "uvicorn"])
def connect(request, fake):
    """connect() opens a WebSocket to the test module's app at /ws."""
    if request.param == "uvicorn":
        server = request.getfixturevalue("live_server")
        opened = []

        def open_live(**options):
            opened.append(WsClient(server.ws_url, **options))
            return opened[-1]

        yield open_live
        for ws in opened:
            ws.close()
        return

    app = importlib.import_module(request.module.APP).app
    with LocalClient(app) as client:
        sessions = []

        def open_in_process(**options):
            session = client.websocket_connect("/ws", **options)
            opened = session.__enter__()
            sessions.append(session)  # only an opened session needs closing
            return opened

        yield open_in_process
        for session in sessions:
            try:
                session.__exit__(None, None, None)
            except NotImplementedError:
                # An exercise's unwritten task raising as the client leaves: graded by that
                # task's own tests, so it does not fail every other task's tests too.
                pass
