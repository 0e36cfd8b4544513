"""Run Alembic programmatically (``tuneserve migrate``), locating migrations inside the package."""

from pathlib import Path

from alembic import command
from alembic.config import Config

import migrations
from shared.config import get_settings


def alembic_config(url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    # ConfigParser interpolates '%': a URL-quoted password ('p%40ss') must reach Alembic escaped.
    config.set_main_option("sqlalchemy.url", (url or get_settings().db_url).replace("%", "%%"))
    return config


def upgrade(url: str | None = None, revision: str = "head") -> None:
    if url is None:
        get_settings().data_dir.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str | None = None, revision: str = "base") -> None:
    command.downgrade(alembic_config(url), revision)
