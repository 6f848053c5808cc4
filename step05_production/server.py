"""The production start: uvicorn with every server-level limit the chat relies on.

    python -m step05_production [--host H] [--port P] [--workers N] [--forwarded-allow-ips IPS]

`uvicorn step05_production.main:app` works too, but uvicorn's defaults are made for any
app: WebSocket frames up to 16 MiB, per-message compression on, no bound on a shutdown.
Started that way, the app says at start-up which of these limits its command lacks
(`warn_about_missing_limits`, called by main.py).
"""

import inspect
import logging
import os

from .config import settings

# An import string, not the app object: uvicorn needs one to start --workers, and each
# worker then imports the app while uvicorn builds its settings (see below).
APP = "step05_production.main:app"
# uvicorn's own variable and default: X-Forwarded-For is believed only from a proxy on this machine.
FORWARDED_ALLOW_IPS = os.getenv("FORWARDED_ALLOW_IPS") or "127.0.0.1,::1"
# An idle HTTP connection (the page and its files are loaded, the WebSocket is open) is
# closed after this long. Behind a load balancer that keeps connections to this server
# open, pass more than the balancer's idle timeout, or it may send on a closed one.
KEEP_ALIVE_SECONDS = 5

log = logging.getLogger(__name__)


def server_limits() -> dict:
    """The uvicorn settings every command that serves the chat should have."""
    return {
        # uvicorn reads a whole frame into memory before the app can refuse it: a frame
        # over the chat's own limit is refused by uvicorn (close code 1009) instead.
        "ws_max_size": settings.max_frame_bytes,
        # Chunks are small and barely compress; compression costs memory per connection,
        # and compressing attacker-influenced text next to secrets is a known side channel.
        "ws_per_message_deflate": False,
        # A ping every 20 s keeps proxies from closing a quiet socket and finds dead
        # clients (uvicorn's defaults, written out because the idle limit relies on them).
        "ws_ping_interval": 20.0,
        "ws_ping_timeout": 20.0,
        # A deploy stops this process: open connections get this long to finish, then the
        # lifespan stops the replies (each stored as far as it got) and the process exits.
        "timeout_graceful_shutdown": 10,
    }


def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    forwarded_allow_ips: str = FORWARDED_ALLOW_IPS,
    timeout_keep_alive: int = KEEP_ALIVE_SECONDS,
    **uvicorn_options,
) -> None:
    """Run the chat under uvicorn with `server_limits()`, until Ctrl-C or SIGTERM."""
    import uvicorn  # here, so that importing this module never needs the server

    uvicorn.run(
        APP,
        host=host,
        port=port,
        workers=workers,
        # The client address (per-client limits) comes from X-Forwarded-For
        # only when the connection comes from one of these proxies.
        proxy_headers=True,
        forwarded_allow_ips=forwarded_allow_ips,
        timeout_keep_alive=timeout_keep_alive,
        **server_limits(),
        **uvicorn_options,
    )


def uvicorn_config_loading_this_app():
    """uvicorn's Config, when uvicorn is importing the app right now; otherwise None.

    Why look up the call stack: uvicorn builds one protocol object per connection from
    its Config, and it imports the app while loading that Config (`Config.load()`), so
    a limit lowered there now holds for every connection that follows. The app has no
    other way to reach the server's settings. A server that imported the app before
    building its Config (`uvicorn.run(app)` with the app object), or another ASGI
    server, is not found.
    """
    try:
        from uvicorn.config import Config
    except ImportError:  # another server, without uvicorn installed
        return None
    frame = inspect.currentframe()
    while frame is not None:
        if isinstance(frame.f_locals.get("self"), Config):
            return frame.f_locals["self"]
        frame = frame.f_back
    return None


def warn_about_missing_limits() -> None:
    """Called while the app is imported: lower uvicorn's frame limit if it is above the
    chat's, and say at WARNING which of `server_limits()` the command lacks."""
    config = uvicorn_config_loading_this_app()
    if config is None:
        log.warning(
            "Not started by `python -m step05_production` or `uvicorn step05_production.main:app`: "
            "the chat cannot lower the server's WebSocket frame limit to %d bytes; set it in "
            "the server (uvicorn: ws_max_size).",
            settings.max_frame_bytes,
        )
        return
    lacking = {
        name: getattr(config, name) for name, wanted in server_limits().items() if getattr(config, name) != wanted
    }
    config.ws_max_size = min(config.ws_max_size, settings.max_frame_bytes)
    if lacking:
        log.warning(
            "uvicorn runs without the chat's server limits (%s). Start it with "
            "`python -m step05_production`. (The WebSocket frame limit is lowered to "
            "%d bytes anyway.)",
            ", ".join(f"{name}={value!r}" for name, value in lacking.items()),
            settings.max_frame_bytes,
        )
