"""A step's app with a probe that watches the server process from the inside.

The campaign and the benchmarks run it under a real uvicorn:

    PROBED_APP=step05_production.main:app uvicorn harness.loop_probe:app

Every path except /_probe goes to the step's app unchanged.
  GET /_probe/start   (re)starts the event-loop lag sampler
  GET /_probe         {"lag_ms": {"max", "p99", "samples"}, "rss_kib", "cpu_seconds", "sockets"}

Event-loop lag is how late a 5 ms sleep wakes up: any call that blocks the loop
(file or socket I/O without await, heavy CPU) shows up as lag for every connection.
"""

import asyncio
import json
import os
import time
from collections import deque

from uvicorn.importer import import_from_string

SAMPLE_EVERY = 0.005  # seconds
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024

step_app = import_from_string(os.environ.get("PROBED_APP", "step05_production.main:app"))
lags: deque[float] = deque(maxlen=200_000)  # seconds; bounded however long it runs
sampler: asyncio.Task | None = None


async def sample_lag() -> None:
    while True:
        before = time.perf_counter()
        await asyncio.sleep(SAMPLE_EVERY)
        lags.append(time.perf_counter() - before - SAMPLE_EVERY)


def resident_kib() -> int:
    """This process's resident memory now (Linux), not its peak."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE_KIB


def open_sockets() -> int:
    """Sockets this process holds open (Linux): listening, clients, upstream connections."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:  # the listing's own descriptor, closed by now
            pass
    return count


def report() -> dict:
    ordered = sorted(lags)
    p99 = ordered[int(len(ordered) * 0.99)] if ordered else 0.0
    return {
        "lag_ms": {
            "max": round((ordered[-1] if ordered else 0.0) * 1000, 2),
            "p99": round(p99 * 1000, 2),
            "samples": len(ordered),
        },
        "rss_kib": resident_kib(),
        "cpu_seconds": time.process_time(),
        "sockets": open_sockets(),
    }


async def app(scope, receive, send):
    global sampler
    if scope["type"] != "http" or not scope["path"].startswith("/_probe"):
        return await step_app(scope, receive, send)
    if scope["path"] == "/_probe/start":
        if sampler is not None:
            sampler.cancel()
        lags.clear()
        sampler = asyncio.create_task(sample_lag())
    body = json.dumps(report()).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})
