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

from harness.fake_llm import FakeLLMServer
from harness.redis_server import RedisServer
from harness.support import CHROMIUM_ARGS, LiveServer, LocalClient, WsClient, llm_env, read_conversation

LLM_VARIABLES = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_MODEL")


def pytest_addoption(parser):
    group = parser.getgroup("workshop")
    group.addoption("--step", type=int, default=None, help="in tests run on several steps' apps, only this step's")
    group.addoption(
        "--in-process-only",
        action="store_true",
        help="run the WebSocket tests through TestClient only, not again under uvicorn (grading: fast feedback)",
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("in_process_only"):
        items[:] = [item for item in items if not uses(item, "connect", "uvicorn")]


def uses(item, fixture: str, value: str) -> bool:
    return getattr(item, "callspec", None) is not None and item.callspec.params.get(fixture) == value


def code_folder(config):
    """The folder of the code under test (grading's --code option), None for the reference steps."""
    return config.workshop_code_folder


# step05's conversations go to a throwaway SQLite file for the whole run, never the
# repository's; set before any step is imported, and inherited by every server process.
STORE_DIR = tempfile.mkdtemp(prefix="chat-store-")
atexit.register(shutil.rmtree, STORE_DIR, ignore_errors=True)
os.environ["CHAT_STORE_URL"] = f"sqlite:///{STORE_DIR}/chat.sqlite3"


# The steps keep one openai client per event loop, and every TestClient and asyncio.run is a
# new loop: each client loads the whole CA bundle, ~35 ms, about a second of every grade.
# The fake speaks plain HTTP, so the `fake` fixture points the trust store (SSL_CERT_DIR,
# read by the SDK's httpx2) at this empty folder: nothing to load, and a test that reached
# a real TLS server by mistake would fail rather than pass.
NO_CERTIFICATES = tempfile.mkdtemp(prefix="no-certificates-")
atexit.register(shutil.rmtree, NO_CERTIFICATES, ignore_errors=True)


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
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)  # it would win over SSL_CERT_DIR
    monkeypatch.setenv("SSL_CERT_DIR", NO_CERTIFICATES)
    yield fake_server.fake


def pytest_generate_tests(metafunc):
    """A test module that lists APPS runs its tests against each of them (the behaviour the
    steps share); a learner's copy is graded only against the steps it has."""
    apps = getattr(metafunc.module, "APPS", None)
    if apps and "app_name" in metafunc.fixturenames:
        folder, step = code_folder(metafunc.config), metafunc.config.getoption("step")
        if folder is not None:
            apps = [app for app in apps if (folder / app.split(".")[0]).is_dir()]
        if step is not None:
            apps = [app for app in apps if app.startswith(f"step0{step}_")]
        metafunc.parametrize("app_name", apps, scope="module")


@pytest.fixture(scope="module")
def app_name(request) -> str:
    """The app under test, "step02_llm_stream.main": the module's APP, or one of its APPS."""
    return request.module.APP


@pytest.fixture(scope="module")
def live_server(request, app_name, fake_server):
    # A test module may add settings for its server in SERVER_ENV.
    env = llm_env(fake_server.base_url, **getattr(request.module, "SERVER_ENV", {}))
    folder = code_folder(request.config)  # uvicorn imports the app from there, like the tests
    extra_args = () if folder is None else ("--app-dir", str(folder))
    with LiveServer(app_name + ":app", env=env, extra_args=extra_args) as server:
        yield server


def conversation_query(conversation: str | None) -> str:
    return "" if conversation is None else "?" + urlencode({"conversation": conversation})


@pytest.fixture(params=["testclient", "uvicorn"])
def connect(request, app_name, fake):
    """connect() opens a WebSocket to the test module's app at /ws;
    connect(conversation=id) asks step05 to continue that conversation."""
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

    app = importlib.import_module(app_name).app
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


# The apps whose every connection opens with a conversation frame (stored conversations).
OPEN_WITH_A_CONVERSATION = {"step05_production.main"}


@pytest.fixture
def chat(connect, app_name):
    """Steps 04 and 05: like connect, past step 05's conversation frame, so a test reads the
    frames the two steps share."""

    def open_chat(**options):
        ws = connect(**options)
        if app_name in OPEN_WITH_A_CONVERSATION:
            read_conversation(ws)
        return ws

    return open_chat


@pytest.fixture
def redis_server(tmp_path):
    """A real redis-server of its own, on a free loopback port."""
    with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture(scope="module")
def browser():
    """Chromium, for the browser tests (one per test module)."""
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:  # never a silent skip: the browser tests must run
        pytest.fail(
            "No chromium on PATH. `make test` installs Debian's chromium; elsewhere run "
            "`.venv/bin/python -m playwright install chromium`."
        )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    """A fresh page that fails the test on any JavaScript error. bypass_csp: Playwright's
    wait_for_function evaluates its string with eval, which step 05's CSP forbids (these tests
    drive the page; tests/test_browser_hostile.py keeps the CSP on)."""
    context = browser.new_context(viewport={"width": 1000, "height": 700}, bypass_csp=True)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"
