"""python -m step05_production: the chat under uvicorn, with every server-level limit set.

Run it from the folder that holds `step05_production/` (the repository root). The chat's
own settings come from the environment (config.py); these options are the server's.
"""

import argparse

from .server import FORWARDED_ALLOW_IPS, KEEP_ALIVE_SECONDS, serve


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m step05_production", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="the address to listen on (default %(default)s; 0.0.0.0 for every interface)",
    )
    parser.add_argument("--port", type=int, default=8000, help="default %(default)s")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes sharing the port (default %(default)s; see docs/operations.md)",
    )
    parser.add_argument(
        "--forwarded-allow-ips",
        default=FORWARDED_ALLOW_IPS,
        help="the proxies whose X-Forwarded-For and X-Forwarded-Proto are believed, comma-separated "
        "(default: $FORWARDED_ALLOW_IPS, else none; 127.0.0.1 for a proxy on this machine)",
    )
    parser.add_argument(
        "--timeout-keep-alive",
        type=int,
        default=KEEP_ALIVE_SECONDS,
        help="seconds an idle HTTP connection stays open (default %(default)s; behind a load "
        "balancer, more than its idle timeout)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_arguments(argv)
    serve(args.host, args.port, args.workers, args.forwarded_allow_ips, args.timeout_keep_alive)


if __name__ == "__main__":
    main()
