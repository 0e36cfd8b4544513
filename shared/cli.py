"""``tuneserve``: one command that starts every part of the service."""

import argparse
import os
import signal
import socket
import subprocess
import sys


def _migrate(_: argparse.Namespace) -> int:
    from shared.migrate import upgrade

    upgrade()
    return 0


def _api(args: argparse.Namespace) -> int:
    import uvicorn

    uvicorn.run("api.main:app", host=args.host, port=args.port, log_level=args.log_level, proxy_headers=True)
    return 0


def _worker(args: argparse.Namespace) -> int:
    from shared.celery_app import get_celery

    argv = ["worker", "--pool=solo", "--concurrency=1", f"--queues={args.queues}", f"--loglevel={args.log_level}",
            f"--hostname={args.name or 'tuneserve'}-{os.getpid()}@{socket.gethostname()}", "--without-gossip",
            "--without-mingle"]
    get_celery().worker_main(argv)
    return 0


def _dev(args: argparse.Namespace) -> int:
    """Embedded defaults: migrate, one local worker, the API; Ctrl-C stops both."""
    _migrate(args)
    worker = subprocess.Popen([sys.executable, "-m", "shared.cli", "worker", "--queues", "ingest,train"])
    try:
        _api(args)
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuneserve", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)
    verbs.add_parser("migrate", help="upgrade the database schema to the newest revision").set_defaults(
        func=_migrate)
    for name, func, help_text in (("api", _api, "serve the HTTP API"),
                                  ("dev", _dev, "migrate, then run the API and one worker (embedded defaults)")):
        sub = verbs.add_parser(name, help=help_text)
        sub.add_argument("--host", default="127.0.0.1")
        sub.add_argument("--port", type=int, default=8000)
        sub.add_argument("--log-level", default="info")
        sub.set_defaults(func=func)
    worker = verbs.add_parser("worker", help="run a Celery worker (solo pool: one job at a time, one per GPU)")
    worker.add_argument("--queues", default="ingest,train", help="comma-separated: ingest, train")
    worker.add_argument("--name", default=None, help="worker name prefix")
    worker.add_argument("--log-level", default="INFO")
    worker.set_defaults(func=_worker)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
