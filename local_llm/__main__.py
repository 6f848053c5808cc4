"""python -m local_llm serve | chat  (what `make llm` and `make chat` run)."""

import argparse
import os
import signal
import socket
import sys
import threading
import time

from . import HOST, MODEL_NAME, PORT, LocalModelError, base_url, port_is_free, start_local_llm


def uses_remote_llm() -> bool:
    return bool(os.getenv("OPENAI_API_KEY") or os.getenv("OPENAI_BASE_URL"))


def stop_on_ctrl_c_or_kill() -> None:
    """Ctrl-C (SIGINT) and a polite kill (SIGTERM) both stop the model. Set explicitly:
    a shell script that starts us in the background has SIGINT ignored, and Python
    keeps an ignored signal ignored."""

    def stop(signum, frame):
        raise KeyboardInterrupt

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)


def check() -> int:
    """`make doctor`'s last check: start the embedded model on a free port and get a reply."""
    import openai

    with socket.socket() as probe:  # a port nobody uses, so a running `make llm` is no obstacle
        probe.bind((HOST, 0))
        port = probe.getsockname()[1]
    try:
        server = start_local_llm(HOST, port)
    except LocalModelError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    client = openai.OpenAI(base_url=base_url(HOST, port), api_key="no-key-needed", timeout=60)
    answer = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Say hello."}], max_tokens=16
    )
    text = (answer.choices[0].message.content or "").strip()
    del server
    print(f"ok   the embedded model answered: {text[:60]!r}")
    return 0 if text else 1


def announce_when_listening(port: int) -> None:
    """Print the chat's URL once it answers, not before: a click on it must find the chat."""

    def wait_then_print() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection((HOST, port), timeout=0.5).close()
            except OSError:
                time.sleep(0.05)
                continue
            print(f"\n  Chat: open http://{HOST}:{port}  (Ctrl-C to stop)\n", flush=True)
            return

    threading.Thread(target=wait_then_print, daemon=True).start()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m local_llm")
    parser.add_argument("command", choices=["serve", "chat", "check"])
    parser.add_argument("--port", type=int, default=PORT, help="the model's port (default %(default)s)")
    parser.add_argument("--chat-port", type=int, default=8000)
    args = parser.parse_args()

    if args.command == "chat" and not port_is_free(HOST, args.chat_port):
        print(
            f"error: Port {args.chat_port} on {HOST} is already taken (another chat, or another "
            f"server?). Stop it, or choose another port: make chat PORT=8001",
            file=sys.stderr,
        )
        return 1

    if args.command == "check":
        return check()

    server = None
    if args.command == "serve" or not uses_remote_llm():
        began = time.perf_counter()
        try:
            server = start_local_llm(HOST, args.port)
        except LocalModelError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        print(
            f"Local model {MODEL_NAME} ready at {base_url(HOST, args.port)} "
            f"(started in {time.perf_counter() - began:.2f} s)",
            flush=True,
        )
        os.environ["OPENAI_BASE_URL"] = base_url(HOST, args.port)
        os.environ.setdefault("OPENAI_MODEL", MODEL_NAME)
    else:
        print(
            f"Using {os.getenv('OPENAI_BASE_URL') or 'OpenAI'} (OPENAI_* is set): no local model started. "
            "For the embedded model, unset OPENAI_BASE_URL and OPENAI_API_KEY (check .env too)."
        )

    if args.command == "serve":
        print("Press Ctrl-C to stop.", flush=True)
        stop_on_ctrl_c_or_kill()
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            return 0

    # The workshop's chat, on loopback: the page's flow inspector may show the system prompt.
    os.environ.setdefault("CHAT_INSPECTOR", "1")
    # Imported only now: the chat reads its settings (CHAT_INSPECTOR) when it is imported.
    from step05_production.server import serve

    announce_when_listening(args.chat_port)
    try:
        # What `python -m step05_production` runs: uvicorn with the chat's server-level
        # limits (frame size, no per-message compression, ...; step05_production/server.py).
        serve(host=HOST, port=args.chat_port, log_level="warning")
    except KeyboardInterrupt:  # uvicorn shut down gracefully, then re-raised Ctrl-C
        pass
    del server  # stops llama.cpp's threads
    print("Stopped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
