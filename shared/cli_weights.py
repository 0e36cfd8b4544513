"""``tuneserve weights``: the ImageNet files the workers start from, put where they read them.

Workers never download; a host with internet (or a copied file) fills the cache once.
"""

from typing import Annotated

import typer

from shared.cli_app import app, console, fail, print_json
from shared.weights import IMAGENET_FILES, URL_BASE, WeightsError, imagenet_file, install

weights_app = typer.Typer(help="ImageNet weights in the torch cache (TORCH_HOME) the workers read.",
                          no_args_is_help=True)
app.add_typer(weights_app, name="weights")

BaseModels = Annotated[list[str] | None, typer.Option("--base-model", help="resnet18|34|50|101 (repeat; default all)")]


def _chosen(base_models: list[str] | None) -> list[str]:
    chosen = base_models or list(IMAGENET_FILES)
    unknown = sorted(set(chosen) - set(IMAGENET_FILES))
    if unknown:
        fail(f"unknown base model {', '.join(unknown)}; choose from {', '.join(IMAGENET_FILES)}", 2)
    return chosen


@weights_app.command("download")
def download(base_model: BaseModels = None,
             source: Annotated[str | None, typer.Option("--from", help="install this local file instead of "
                                                        "downloading (one --base-model)")] = None,
             url_base: Annotated[str, typer.Option(help="a mirror of download.pytorch.org/models/")] = URL_BASE,
             json_out: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Download (or copy in) torchvision's ImageNet files and check each one's SHA-256."""
    chosen = _chosen(base_model)
    if source is not None and len(chosen) != 1:
        fail("--from installs one file: name its --base-model", 2)
    results = []
    for name in chosen:
        try:
            path, outcome = install(name, source=source, url_base=url_base)
        except (WeightsError, OSError) as exc:
            fail(f"{name}: {exc}")
        results.append({"base_model": name, "path": str(path), "status": outcome})
        if not json_out:
            console.print(f"{name}: {outcome} {path}", highlight=False)
    if json_out:
        print_json(results)


@weights_app.command("list")
def list_weights(json_out: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Which ImageNet files the workers on this host can start from."""
    rows = [{"base_model": name, "path": str(imagenet_file(name)), "present": imagenet_file(name).is_file()}
            for name in IMAGENET_FILES]
    if json_out:
        print_json(rows)
        return
    for row in rows:
        console.print(f"{row['base_model']:10s} {'present' if row['present'] else 'missing':8s} {row['path']}",
                      highlight=False)
