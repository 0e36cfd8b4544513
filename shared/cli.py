"""tuneserve: one command that starts every part of the service, and a client for a running API.

The verbs are registered on one Typer app (``shared.cli_app``) by the modules imported here:
``cli_server`` (migrate, api, worker, dev), ``cli_keys`` (keys and projects, against the database) and
``cli_client`` and ``cli_groups`` (upload, train, status, predict; datasets, jobs, models, batch, webhooks: against
a running API, through ``shared.client``). ``main`` is the console script.
"""

import shared.cli_client  # noqa: F401  (registers the client verbs)
import shared.cli_groups  # noqa: F401  (registers models, batch and webhooks)
import shared.cli_keys  # noqa: F401  (registers keys and projects)
import shared.cli_server  # noqa: F401  (registers the server verbs)
import shared.cli_weights  # noqa: F401  (registers weights download|list)
from shared.cli_app import app


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point; exits with the verb's status."""
    app(args=argv, prog_name="tuneserve")


if __name__ == "__main__":
    main()
