"""Client verbs against a running API (--url, --api-key), in a project, through ``shared.client``:
upload, train, status, predict, and the ``datasets`` and ``jobs`` groups.

``--project`` (or TUNESERVE_PROJECT; default ``default``) picks the project: uploads go to
``POST /v1/datasets?project=``, predictions to ``POST /v1/projects/{project}/predict``, lists take
``?project=``, and ``train``/``status`` check that the dataset or job they name is in it. ``--json`` prints
the API's bodies instead of text.
"""

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from shared.cli_app import Json, app, console, fail, print_json
from shared.client import DEFAULT_PROJECT, PREDICT_BATCH_FILES, ApiError, Client

FINAL = ("succeeded", "failed", "cancelled")
ProjectOpt = Annotated[str | None, typer.Option("--project", envvar="TUNESERVE_PROJECT",
                                                help="project to work in (env TUNESERVE_PROJECT; default 'default')")]

datasets_app = typer.Typer(help="Datasets: upload, list, show, delete.", no_args_is_help=True)
jobs_app = typer.Typer(help="Training jobs: list, status, follow, cancel, delete.", no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")
app.add_typer(jobs_app, name="jobs")


@contextmanager
def connect(ctx: typer.Context, project: str | None = None, as_json: bool = False) -> Iterator[Client]:
    """A client for the command; an ApiError ends the command with its sentence (or, with --json, its body)."""
    url, api_key = ctx.obj
    try:
        with Client(url, api_key, project or DEFAULT_PROJECT) as client:
            yield client
    except ApiError as exc:
        if as_json:
            print_json({"status": exc.status, "code": exc.code, "detail": exc.detail})
            raise typer.Exit(2 if exc.code == "unreachable" else 1) from None
        if exc.code == "unreachable":
            fail(f"{exc.detail}; start it with `tuneserve dev` or pass --url", code=2)
        fail(f"{exc.detail} ({exc.code})")


def _same_project(body: Any, kind: str, project: str) -> None:
    if body.get("project", DEFAULT_PROJECT) != project:
        fail(f"{kind} {body['id']} is in project '{body.get('project')}', not '{project}'; pass "
             f"--project {body.get('project')} (or set TUNESERVE_PROJECT)")


@app.command()
def upload(ctx: typer.Context, path: Annotated[Path, typer.Argument(help="folder of class sub-folders, or archive")],
           name: Annotated[str | None, typer.Option(help="dataset name (default: the file name)")] = None,
           wait: Annotated[bool, typer.Option(help="wait until ingestion finishes")] = True,
           project: ProjectOpt = None, as_json: Json = False) -> None:
    """Upload a dataset (a folder is zipped for you) into the project and wait until it is ready."""
    with connect(ctx, project, as_json) as client:
        if not as_json:
            console.print(f"uploading {path.name} to project {client.project}", highlight=False)
        dataset = client.upload_dataset(path, name=name)
        if not as_json:
            console.print(f"dataset {dataset['id']} {dataset['status']} in project {dataset.get('project')}",
                          highlight=False)
        if wait:
            with console.status("ingesting") if not as_json else _nothing():
                dataset = client.wait_for_dataset(dataset["id"])
    if as_json:
        print_json(dataset)
    elif wait:
        _show_dataset(dataset)
    if wait and dataset["status"] != "ready":
        fail(f"ingestion failed: {dataset.get('error')} ({dataset.get('error_code')})")


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def _show_dataset(dataset: Any) -> None:
    console.print(f"dataset {dataset['id']} {dataset['status']}", highlight=False)
    table = Table()
    table.add_column("class")
    table.add_column("images", justify="right")
    for label, count in (dataset.get("class_counts") or {}).items():
        table.add_row(label, str(count))
    console.print(table)
    console.print(f"{dataset['num_images']} images, {len(dataset['rejected'])} rejected", highlight=False)


datasets_app.command("upload")(upload)


@datasets_app.command("list")
def datasets_list(ctx: typer.Context, project: ProjectOpt = None, as_json: Json = False) -> None:
    """The project's datasets, newest first."""
    with connect(ctx, project, as_json) as client:
        body = client.list_datasets()
    if as_json:
        print_json(body)
        return
    console.print(f"project {client.project}: {body['count']} dataset(s)", highlight=False)
    table = Table()
    for column in ("dataset", "name", "status", "images", "classes", "created"):
        table.add_column(column, overflow="fold")
    for d in body["data"]:
        table.add_row(d["id"], d["name"], d["status"], str(d["num_images"]), str(len(d.get("classes") or [])),
                      d["created_at"][:19])
    console.print(table)


@datasets_app.command("show")
def datasets_show(ctx: typer.Context, dataset: Annotated[str, typer.Argument(help="dataset id")],
                  as_json: Json = False) -> None:
    """One dataset: status, classes and counts, rejected files."""
    with connect(ctx, None, as_json) as client:
        body = client.get_dataset(dataset)
    print_json(body) if as_json else _show_dataset(body)


@datasets_app.command("delete")
def datasets_delete(ctx: typer.Context, dataset: Annotated[str, typer.Argument(help="dataset id")],
                    as_json: Json = False) -> None:
    """Delete a dataset (refused while a job uses it)."""
    with connect(ctx, None, as_json) as client:
        client.delete_dataset(dataset)
    print_json({"id": dataset, "deleted": True}) if as_json else console.print(f"deleted dataset {dataset}",
                                                                               highlight=False)


def _parse_param(raw: str) -> tuple[str, Any]:
    key, sep, value = raw.partition("=")
    if not sep or not key:
        fail(f"--param '{raw}' must look like key=value, e.g. --param optimizer=sgd")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


@app.command()
def train(ctx: typer.Context, dataset: Annotated[str, typer.Argument(help="dataset id")],
          epochs: Annotated[int | None, typer.Option(help="epochs")] = None,
          base_model: Annotated[str | None, typer.Option(help="resnet18/34/50/101")] = None,
          image_size: Annotated[int | None, typer.Option(help="input side in pixels")] = None,
          batch_size: Annotated[int | None, typer.Option(help="images per step")] = None,
          learning_rate: Annotated[float | None, typer.Option(help="head learning rate")] = None,
          weights: Annotated[str | None, typer.Option(help="imagenet, none, or a file in WEIGHTS_DIR")] = None,
          param: Annotated[list[str] | None, typer.Option("--param", "-p", help="any hyperparameter: key=value")
                           ] = None,
          follow: Annotated[bool, typer.Option(help="follow progress until the job ends")] = True,
          project: ProjectOpt = None, as_json: Json = False) -> None:
    """Start a fine-tuning job and follow it with a live progress bar until it ends.

    The job belongs to its dataset's project; with --project (or TUNESERVE_PROJECT) the dataset must be in it.
    With --json, prints the job once it ends (with --no-follow: as created)."""
    named = {"epochs": epochs, "base_model": base_model, "image_size": image_size, "batch_size": batch_size,
             "learning_rate": learning_rate, "weights": weights}
    hyperparameters = {k: v for k, v in named.items() if v is not None} | dict(map(_parse_param, param or []))
    with connect(ctx, project, as_json) as client:
        if project is not None:
            _same_project(client.get_dataset(dataset), "dataset", project)
        job = client.create_job(dataset, hyperparameters)
        if not as_json:
            console.print(f"job {job['id']} {job['status']}", highlight=False)
        if follow:
            job = _follow(client, job["id"], quiet=as_json)
    if as_json:
        print_json(job)
    if follow and job["status"] != "succeeded":
        fail(f"job ended {job['status']}: {job.get('error') or 'no error recorded'}")


def _follow(client: Client, job_id: str, *, quiet: bool = False) -> Any:
    """Print progress from the job's events until it ends; returns the final job."""
    status, last_id = "queued", None
    live = console.is_terminal and not quiet
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[detail]}"),
               TimeElapsedColumn())
    with Progress(*columns, console=console, disable=not live) as bar:
        task = bar.add_task("queued", total=None, detail="")
        while status not in FINAL:
            try:
                for event in client.job_events(job_id, last_event_id=last_id):
                    last_id = event.id or last_id
                    status = _on_event(bar, task, event.event, event.data, status, live, quiet)
            except ApiError as exc:  # dropped stream: reconnect; the snapshot makes us whole
                if exc.code != "unreachable":
                    raise
                if not quiet:
                    console.print(f"stream interrupted ({exc.detail}); reconnecting", highlight=False)
                time.sleep(1)
    final = client.get_job(job_id)
    if not quiet:
        test = (final.get("metrics") or {}).get("test") or {}
        summary = f"job {job_id} {final['status']}"
        if final.get("model_id"):
            summary += f" · model {final['model_id']}"
        if "accuracy" in test:
            summary += f" · test accuracy {test['accuracy']:.3f}"
        console.print(summary, highlight=False)
    return final


def _on_event(bar: Progress, task: Any, name: str, data: dict[str, Any], status: str, live: bool,
              quiet: bool) -> str:
    def say(text: str) -> None:
        if not quiet:
            console.print(text, highlight=False)

    if name == "snapshot":
        status = data["status"]
        for epoch in data.get("history") or []:
            say(_epoch_line(epoch))
        data = data["progress"]
        name = "progress"
    if name == "progress" and data.get("epochs"):
        steps, epochs = max(1, data.get("steps") or 1), data["epochs"]
        done = (data.get("epoch", 1) - 1) * steps + data.get("step", 0)
        rate, eta = data.get("images_per_second"), data.get("eta_seconds")
        detail = (f"epoch {data.get('epoch')}/{epochs} step {data.get('step')}/{steps}"
                  + (f" · {rate:.1f} img/s" if rate else "") + (f" · ETA {eta:.0f}s" if eta is not None else ""))
        bar.update(task, total=epochs * steps, completed=done, description=status, detail=detail)
        if not live:
            say(f"progress {100 * done / (epochs * steps):5.1f}% {detail}")
    elif name == "epoch":
        say(_epoch_line(data["metrics"]))
    elif name in ("state", "end"):
        status = data["status"]
        bar.update(task, description=status)
        if name == "state":
            say(f"state {data['previous']} -> {status}")
    return status


def _epoch_line(m: dict[str, Any]) -> str:
    parts = [f"epoch {m.get('epoch')}"]
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
        if isinstance(m.get(key), int | float):
            parts.append(f"{key} {m[key]:.4f}")
    return " · ".join(parts)


def _list_jobs(client: Client, as_json: bool) -> None:
    body = client.list_jobs()
    if as_json:
        print_json(body)
        return
    console.print(f"project {client.project}: {body['count']} job(s)", highlight=False)
    if not body["data"]:
        return
    table = Table()
    for column in ("job", "status", "epoch", "dataset", "model", "created"):
        table.add_column(column, overflow="fold")
    for job in body["data"]:
        progress = job.get("progress") or {}
        table.add_row(job["id"], job["status"], f"{progress.get('epoch')}/{progress['epochs']}"
                      if progress.get("epochs") else "–", job["dataset_id"], job.get("model_id") or "–",
                      job["created_at"][:19])
    console.print(table)


@app.command()
def status(ctx: typer.Context, job: Annotated[str | None, typer.Argument(help="job id (omit: list the project's "
                                                                         "jobs)")] = None,
           project: ProjectOpt = None, as_json: Json = False) -> None:
    """Show a job: state, progress, per-epoch history, result. Without a job id, list the project's jobs."""
    with connect(ctx, project, as_json) as client:
        if job is None:
            _list_jobs(client, as_json)
            return
        body = client.get_job(job)
    if project is not None:
        _same_project(body, "job", project)
    if as_json:
        print_json(body)
        return
    progress = body["progress"]
    console.print(f"job {body['id']} [bold]{body['status']}[/bold] · project {body.get('project')} · "
                  f"dataset {body['dataset_id']} · attempts {body['attempts']}", highlight=False)
    if progress.get("epochs"):
        console.print(f"epoch {progress['epoch']}/{progress['epochs']} step {progress['step']}/{progress['steps']}"
                      f" · {progress.get('images_per_second') or 0:.1f} img/s", highlight=False)
    if body["history"]:
        table = Table(title="history")
        keys = ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy"]
        for key in keys:
            table.add_column(key, justify="right")
        for row in body["history"]:
            table.add_row(*(f"{row[k]:.4f}" if isinstance(row.get(k), float) else str(row.get(k, "")) for k in keys))
        console.print(table)
    if body.get("model_id"):
        console.print(f"model {body['model_id']}", highlight=False)
    if body.get("error"):
        console.print(f"[red]error[/red] {body['error']} ({body.get('error_code')})", highlight=False)


jobs_app.command("status")(status)


@jobs_app.command("list")
def jobs_list(ctx: typer.Context, project: ProjectOpt = None, as_json: Json = False) -> None:
    """The project's jobs, newest first."""
    with connect(ctx, project, as_json) as client:
        _list_jobs(client, as_json)


@jobs_app.command("follow")
def jobs_follow(ctx: typer.Context, job: Annotated[str, typer.Argument(help="job id")], as_json: Json = False) -> None:
    """Follow a running job's progress until it ends."""
    with connect(ctx, None, as_json) as client:
        final = _follow(client, job, quiet=as_json)
    if as_json:
        print_json(final)


@jobs_app.command("cancel")
def jobs_cancel(ctx: typer.Context, job: Annotated[str, typer.Argument(help="job id")], as_json: Json = False) -> None:
    """Cancel a queued or running job (409 once it has ended)."""
    with connect(ctx, None, as_json) as client:
        body = client.cancel_job(job)
    print_json(body) if as_json else console.print(f"job {job} {body['status']}", highlight=False)


@jobs_app.command("delete")
def jobs_delete(ctx: typer.Context, job: Annotated[str, typer.Argument(help="job id")], as_json: Json = False) -> None:
    """Delete an ended job and its checkpoints."""
    with connect(ctx, None, as_json) as client:
        client.delete_job(job)
    print_json({"id": job, "deleted": True}) if as_json else console.print(f"deleted job {job}", highlight=False)


@app.command()
def predict(ctx: typer.Context,
            images: Annotated[list[Path], typer.Argument(help="image files and folders (searched recursively)",
                                                         exists=True)],
            top_k: Annotated[int | None, typer.Option(help="labels per image (default: the API's, 5)")] = None,
            min_score: Annotated[float | None, typer.Option(help="label is null under this calibrated score")
                                 ] = None,
            model: Annotated[str | None, typer.Option(help="model id (default: the one the project serves)")
                             ] = None,
            batch: Annotated[int, typer.Option(help="images per request")] = PREDICT_BATCH_FILES,
            project: ProjectOpt = None, as_json: Json = False) -> None:
    """Classify images, and every image under folders, with the model the project serves (or --model)."""
    rows: list[dict[str, Any]] = []
    with connect(ctx, project, as_json) as client:
        for files, body in client.predict_paths(images, max_files=max(1, batch), top_k=top_k, min_score=min_score,
                                                model_id=model):
            rows += [{"path": str(path), "model_id": body["model_id"], **p}
                     for path, p in zip(files, body["predictions"], strict=True)]
    if as_json:
        print_json({"predictions": rows})
        return
    for model_id in dict.fromkeys(r["model_id"] for r in rows):
        table = Table(title=f"model {model_id}")
        for column in ("image", "label", "score", "others"):
            table.add_column(column, justify="right" if column == "score" else "left")
        for row in (r for r in rows if r["model_id"] == model_id):
            best, *rest = row["top"]
            label = row.get("label", best["label"]) or "abstains"  # null: under the model's or --min-score
            table.add_row(row["path"], label, f"{best['score']:.3f}",
                          ", ".join(f"{s['label']} {s['score']:.3f}" for s in rest))
        console.print(table)
