"""Client verbs: upload, train, status, predict against a running API (--url, --api-key), in a project.

``--project`` (or TUNESERVE_PROJECT; default ``default``) picks the project: uploads go to
``POST /v1/datasets?project=``, predictions to ``POST /v1/projects/{project}/predict``, lists take
``?project=``, and ``train``/``status`` check that the dataset or job they name is in it.
"""

import json
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from shared.cli_app import app, console, fail

FINAL = ("succeeded", "failed", "cancelled")
DEFAULT_PROJECT = "default"
ProjectOpt = Annotated[str | None, typer.Option("--project", envvar="TUNESERVE_PROJECT",
                                                help="project to work in (env TUNESERVE_PROJECT; default 'default')")]


class Client:
    def __init__(self, url: str, api_key: str | None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=httpx.Timeout(60, read=300))

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            fail(f"cannot reach {self.http.base_url}: {exc}; start it with `tuneserve dev` or pass --url", code=2)
        if response.status_code >= 400:
            try:
                body = response.json()
                fail(f"{body.get('detail', response.text)} ({body.get('code', response.status_code)})")
            except ValueError:
                fail(f"HTTP {response.status_code}: {response.text[:300]}")
        return response.json()

    def events(self, job_id: str, last_id: str | None) -> Iterator[tuple[str, str, dict[str, Any]]]:
        """(id, event, data) from the job's server-sent events; returns when the server closes the stream."""
        headers = {"Last-Event-ID": last_id} if last_id else {}
        with self.http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as response:
            if response.status_code >= 400:
                response.read()
                fail(f"{response.json().get('detail')} ({response.json().get('code')})")
            event_id, name, data = "", "message", ""
            for line in response.iter_lines():
                if not line:
                    if data:
                        yield event_id, name, json.loads(data)
                    name, data = "message", ""
                elif line.startswith("id:"):
                    event_id = line[3:].strip()
                elif line.startswith("event:"):
                    name = line[6:].strip()
                elif line.startswith("data:"):
                    data += line[5:].strip()


def _client(ctx: typer.Context) -> Client:
    return Client(*ctx.obj)


@contextmanager
def _archive(path: Path) -> Iterator[Path]:
    """The archive to send: the file itself, or a zip of the folder written to a temp dir."""
    if path.is_file():
        yield path
        return
    if not path.is_dir():
        fail(f"{path} is neither a folder of class sub-folders nor a .zip/.tar.gz archive")
    with tempfile.TemporaryDirectory(prefix="tuneserve-") as tmp:
        target = Path(tmp) / f"{path.resolve().name or 'dataset'}.zip"
        with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_STORED) as archive:  # images are compressed
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                archive.write(file, file.relative_to(path).as_posix())
        yield target


@app.command()
def upload(ctx: typer.Context, path: Annotated[Path, typer.Argument(help="folder of class sub-folders, or archive")],
           name: Annotated[str | None, typer.Option(help="dataset name (default: the file name)")] = None,
           wait: Annotated[bool, typer.Option(help="wait until ingestion finishes")] = True,
           project: ProjectOpt = None) -> None:
    """Upload a dataset (a folder is zipped for you) into the project and wait until it is ready."""
    client = _client(ctx)
    project = project or DEFAULT_PROJECT
    with _archive(path) as archive, archive.open("rb") as handle:
        console.print(f"uploading {archive.name} ({archive.stat().st_size / 2**20:.1f} MiB) to project {project}",
                      highlight=False)
        # In the URL, not the form: the server knows the project (and its quota) before the body streams.
        dataset = client.call("POST", "/v1/datasets", params={"project": project},
                              files={"file": (archive.name, handle, "application/zip")},
                              data={"name": name} if name else {})
    console.print(f"dataset {dataset['id']} {dataset['status']} in project {dataset.get('project', project)}",
                  highlight=False)
    if not wait:
        return
    with console.status("ingesting"):
        while dataset["status"] == "processing":
            time.sleep(0.5)
            dataset = client.call("GET", f"/v1/datasets/{dataset['id']}")
    console.print(f"dataset {dataset['id']} {dataset['status']}", highlight=False)
    table = Table()
    table.add_column("class")
    table.add_column("images", justify="right")
    for label, count in (dataset.get("class_counts") or {}).items():
        table.add_row(label, str(count))
    console.print(table)
    console.print(f"{dataset['num_images']} images, {len(dataset['rejected'])} rejected", highlight=False)
    if dataset["status"] != "ready":
        fail(f"ingestion failed: {dataset.get('error')} ({dataset.get('error_code')})")


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
          project: ProjectOpt = None) -> None:
    """Start a fine-tuning job and follow it with a live progress bar until it ends.

    The job belongs to its dataset's project; with --project (or TUNESERVE_PROJECT) the dataset must be in it."""
    client = _client(ctx)
    if project is not None:
        _same_project(client.call("GET", f"/v1/datasets/{dataset}"), "dataset", project)
    named = {"epochs": epochs, "base_model": base_model, "image_size": image_size, "batch_size": batch_size,
             "learning_rate": learning_rate, "weights": weights}
    hyperparameters = {k: v for k, v in named.items() if v is not None} | dict(map(_parse_param, param or []))
    job = client.call("POST", "/v1/jobs", json={"dataset_id": dataset, "hyperparameters": hyperparameters})
    console.print(f"job {job['id']} {job['status']}", highlight=False)
    if follow:
        _follow(client, job["id"])


def _follow(client: Client, job_id: str) -> None:
    status, last_id = "queued", None
    live = console.is_terminal
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[detail]}"),
               TimeElapsedColumn())
    with Progress(*columns, console=console, disable=not live) as bar:
        task = bar.add_task("queued", total=None, detail="")
        while status not in FINAL:
            try:
                for event_id, name, data in client.events(job_id, last_id):
                    last_id = event_id
                    status = _on_event(bar, task, name, data, status, live)
            except httpx.TransportError as exc:  # dropped stream: reconnect; the snapshot makes us whole
                console.print(f"stream interrupted ({type(exc).__name__}); reconnecting", highlight=False)
                time.sleep(1)
    final = client.call("GET", f"/v1/jobs/{job_id}")
    test = ((final.get("metrics") or {}).get("test") or {})
    summary = f"job {job_id} {final['status']}"
    if final.get("model_id"):
        summary += f" · model {final['model_id']}"
    if "accuracy" in test:
        summary += f" · test accuracy {test['accuracy']:.3f}"
    console.print(summary, highlight=False)
    if final["status"] != "succeeded":
        fail(f"job ended {final['status']}: {final.get('error') or 'no error recorded'}")


def _on_event(bar: Progress, task: Any, name: str, data: dict[str, Any], status: str, live: bool) -> str:
    if name == "snapshot":
        status = data["status"]
        for epoch in data.get("history") or []:
            console.print(_epoch_line(epoch), highlight=False)
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
            console.print(f"progress {100 * done / (epochs * steps):5.1f}% {detail}", highlight=False)
    elif name == "epoch":
        console.print(_epoch_line(data["metrics"]), highlight=False)
    elif name in ("state", "end"):
        status = data["status"]
        bar.update(task, description=status)
        if name == "state":
            console.print(f"state {data['previous']} -> {status}", highlight=False)
    return status


def _epoch_line(m: dict[str, Any]) -> str:
    parts = [f"epoch {m.get('epoch')}"]
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
        if isinstance(m.get(key), int | float):
            parts.append(f"{key} {m[key]:.4f}")
    return " · ".join(parts)


def _same_project(body: dict[str, Any], kind: str, project: str) -> None:
    if body.get("project", DEFAULT_PROJECT) != project:
        fail(f"{kind} {body['id']} is in project '{body.get('project')}', not '{project}'; pass "
             f"--project {body.get('project')} (or set TUNESERVE_PROJECT)")


def _list_jobs(client: Client, project: str) -> None:
    body = client.call("GET", "/v1/jobs", params={"project": project, "limit": 100})
    console.print(f"project {project}: {body['count']} job(s)", highlight=False)
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
           project: ProjectOpt = None) -> None:
    """Show a job: state, progress, per-epoch history, result. Without a job id, list the project's jobs."""
    client = _client(ctx)
    if job is None:
        _list_jobs(client, project or DEFAULT_PROJECT)
        return
    body = client.call("GET", f"/v1/jobs/{job}")
    if project is not None:
        _same_project(body, "job", project)
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


@app.command()
def predict(ctx: typer.Context, images: Annotated[list[Path], typer.Argument(help="image files", exists=True,
                                                                              dir_okay=False)],
            top_k: Annotated[int, typer.Option(help="labels per image")] = 3,
            model: Annotated[str | None, typer.Option(help="model id (default: the one the project serves)")
                             ] = None,
            project: ProjectOpt = None) -> None:
    """Classify images with the model the project serves (or --model, of that project) and print a table."""
    files = [("file", (p.name, p.read_bytes(), "application/octet-stream")) for p in images]
    data = {"top_k": str(top_k)} | ({"model_id": model} if model else {})
    body = _client(ctx).call("POST", f"/v1/projects/{project or DEFAULT_PROJECT}/predict", files=files, data=data)
    table = Table(title=f"model {body['model_id']}")
    table.add_column("image")
    table.add_column("label")
    table.add_column("score", justify="right")
    table.add_column("others")
    for prediction in body["predictions"]:
        best, *rest = prediction["top"]
        table.add_row(prediction["filename"], best["label"], f"{best['score']:.3f}",
                      ", ".join(f"{s['label']} {s['score']:.3f}" for s in rest))
    console.print(table)
