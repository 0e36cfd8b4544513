"""The one Typer app behind ``tuneserve``, its global options and the helpers every verb module shares.

The verbs live beside it, by what they hold: ``cli_server`` (migrate, api, worker, dev), ``cli_keys``
(keys and projects, straight against the database), ``cli_client`` (upload, train, status, predict and the
datasets and jobs groups) and ``cli_groups`` (models, batch, webhooks), both through ``shared.client``
against a running API. ``shared.cli`` imports them all and is the entry point.
"""

import json
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

HELP = """tuneserve: one command that starts every part of the service, and a client for a running API.

Server verbs: migrate, api, worker, dev; keys and projects (straight against the database).
Client verbs (talk to --url with --api-key, in --project): upload, train, status, predict;
groups datasets, jobs, models, batch and webhooks. Every client command takes --json.
"""

app = typer.Typer(help=HELP, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console()


Json = Annotated[bool, typer.Option("--json", help="print the API's JSON instead of text")]


def fail(message: str, code: int = 1) -> NoReturn:
    console.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


def print_json(body: Any) -> None:
    # Plain print, not rich: nothing is wrapped or coloured, so the output parses.
    print(json.dumps(body, indent=2))


def _version(show: bool) -> None:
    if show:
        try:
            print(f"tuneserve {version('tuneserve')}")
        except PackageNotFoundError:  # a source checkout that was never installed
            print("tuneserve (not installed)")
        raise typer.Exit()


@app.callback()
def main_options(ctx: typer.Context,
                 url: Annotated[str, typer.Option("--url", envvar="TUNESERVE_URL", help="API base URL")
                                ] = "http://127.0.0.1:8000",
                 api_key: Annotated[str | None, typer.Option("--api-key", envvar="TUNESERVE_API_KEY",
                                                             help="sent as 'Authorization: Bearer <key>'")] = None,
                 show_version: Annotated[bool, typer.Option(  # noqa: ARG001 (its eager callback does the work)
                     "--version", is_eager=True, callback=_version, help="print the version and exit")] = False,
                 ) -> None:
    ctx.obj = (url, api_key)
