"""Container entrypoint for Dockerfile.gpu: read secrets from files, say so when ImageNet weights are absent,
then exec the command (``tuneserve api``, ``tuneserve worker``, ``tuneserve migrate``...).

Secrets (compose ``secrets:`` mounts them under /run/secrets, so they never sit in the compose file,
``docker inspect`` or a URL in the environment of the host):

- ``TUNESERVE_<NAME>_FILE=/path`` sets ``TUNESERVE_<NAME>`` to the file's contents (surrounding whitespace
  stripped), like the official postgres image's ``POSTGRES_PASSWORD_FILE``. Setting both is an error.
- ``TUNESERVE_DATABASE_PASSWORD`` (usually from ``TUNESERVE_DATABASE_PASSWORD_FILE``) is put, URL-quoted,
  into ``TUNESERVE_DATABASE_URL`` as its password: any character is fine.

Only the standard library: this runs before every process in the image.
"""

import glob
import os
import sys
from urllib.parse import quote, urlsplit, urlunsplit

PREFIX = "TUNESERVE_"


def fail(message: str) -> None:
    print(f"tuneserve-entrypoint: {message}", file=sys.stderr, flush=True)
    sys.exit(78)  # EX_CONFIG


def read_secret_files(env: dict[str, str]) -> None:
    for file_var in sorted(name for name in env if name.startswith(PREFIX) and name.endswith("_FILE")):
        var, path = file_var.removesuffix("_FILE"), env.pop(file_var)
        if env.get(var):
            fail(f"both {var} and {file_var} are set; set one of them")
        try:
            with open(path, encoding="utf-8") as handle:
                env[var] = handle.read().strip()
        except IsADirectoryError:
            fail(f"{file_var}={path} is a directory: the secret file it names is missing on the host "
                 "(see README: docker compose)")
        except OSError as error:
            fail(f"cannot read {file_var}={path}: {error.strerror}")


def put_password_in_url(env: dict[str, str]) -> None:
    password = env.pop(PREFIX + "DATABASE_PASSWORD", "")
    url = env.get(PREFIX + "DATABASE_URL", "")
    if not password:
        return
    if not url:
        fail("TUNESERVE_DATABASE_PASSWORD(_FILE) is set but TUNESERVE_DATABASE_URL is not")
    parts = urlsplit(url)
    if parts.password is not None:
        fail("TUNESERVE_DATABASE_URL already holds a password; take it out or drop TUNESERVE_DATABASE_PASSWORD")
    user, host = parts.netloc.rpartition("@")[::2]
    if not user:
        fail("TUNESERVE_DATABASE_URL names no user for TUNESERVE_DATABASE_PASSWORD")
    netloc = f"{user}:{quote(password, safe='')}@{host}"
    env[PREFIX + "DATABASE_URL"] = urlunsplit(parts._replace(netloc=netloc))


def warn_if_no_imagenet_weights(env: dict[str, str], argv: list[str]) -> None:
    if argv[:1] != ["tuneserve"] or argv[1:2] not in (["api"], ["worker"]):
        return
    torch_home = env.get("TORCH_HOME", "/opt/torch")
    if glob.glob(os.path.join(torch_home, "hub", "checkpoints", "resnet*.pth")):
        return
    print(
        f"tuneserve: NOTE: this image holds no ImageNet weights ({torch_home}/hub/checkpoints is empty; it was "
        "built with --build-arg IMAGENET_WEIGHTS=0). Jobs that ask for \"weights\": \"imagenet\" (the default) "
        "will fail with weights_unavailable, because the service never downloads at run time. Train with "
        "\"weights\": \"none\", put a .safetensors file in TUNESERVE_WEIGHTS_DIR and name it in \"weights\", "
        "or rebuild the image without IMAGENET_WEIGHTS=0.",
        file=sys.stderr,
        flush=True,
    )


def main(argv: list[str]) -> None:
    if not argv:
        fail("no command given")
    env = dict(os.environ)
    read_secret_files(env)
    put_password_in_url(env)
    warn_if_no_imagenet_weights(env, argv)
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as error:
        fail(f"cannot run {argv[0]}: {error.strerror}")


if __name__ == "__main__":
    main(sys.argv[1:])
