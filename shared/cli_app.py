"""The one Typer app behind ``tuneserve``, its global options and the helpers every verb module shares.

The verbs live beside it, by what they hold: ``cli_server`` (migrate, api, worker, dev), ``cli_keys``
(keys and projects, straight against the database) and ``cli_client`` (upload, train, status, predict
against a running API). ``shared.cli`` imports them all and is the entry point.
"""

from typing import Annotated, NoReturn

import typer
from rich.console import Console

HELP = """tuneserve: one command that starts every part of the service, and a client for a running API.

Server verbs: migrate, api, worker, dev; keys and projects (straight against the database).
Client verbs (talk to --url with --api-key, in --project): upload, train, status, predict.
"""

app = typer.Typer(help=HELP, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console()


def fail(message: str, code: int = 1) -> NoReturn:
    console.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


@app.callback()
def main_options(ctx: typer.Context,
                 url: Annotated[str, typer.Option("--url", envvar="TUNESERVE_URL", help="API base URL")
                                ] = "http://127.0.0.1:8000",
                 api_key: Annotated[str | None, typer.Option("--api-key", envvar="TUNESERVE_API_KEY",
                                                             help="sent as 'Authorization: Bearer <key>'")] = None
                 ) -> None:
    ctx.obj = (url, api_key)
