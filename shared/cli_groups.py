"""Client groups for models, batch predictions and webhooks, through ``shared.client`` (see ``cli_client``)."""

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from shared.cli_app import Json, app, console, fail, print_json
from shared.cli_client import ProjectOpt, connect

models_app = typer.Typer(help="Models: list, show, promote, threshold, export.", no_args_is_help=True)
batch_app = typer.Typer(help="Batch predictions: create, status, results, cancel, list.", no_args_is_help=True)
webhooks_app = typer.Typer(help="Webhooks: create, list, delete, deliveries.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(batch_app, name="batch")
app.add_typer(webhooks_app, name="webhooks")

ModelArg = Annotated[str, typer.Argument(help="model id")]
BatchArg = Annotated[str, typer.Argument(help="batch prediction id")]
HookArg = Annotated[str, typer.Argument(help="webhook id")]


def _table(columns: tuple[str, ...], rows: list[tuple[Any, ...]], title: str | None = None) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(str(v) if v is not None else "–" for v in row))
    console.print(table)


def _say(text: str) -> None:
    console.print(text, highlight=False)


@models_app.command("list")
def models_list(ctx: typer.Context, project: ProjectOpt = None, as_json: Json = False) -> None:
    """The project's models, newest first; the one it serves is marked."""
    with connect(ctx, project, as_json) as client:
        body = client.list_models()
    if as_json:
        print_json(body)
        return
    _say(f"project {client.project}: {body['count']} model(s)")
    _table(("model", "serving", "base", "classes", "test accuracy", "created"), [
        (m["id"], "pinned" if m["pinned"] else ("yes" if m["serving"] else ""), m["base_model"], len(m["classes"]),
         f"{a:.3f}" if isinstance(a := ((m.get("metrics") or {}).get("test") or {}).get("accuracy"), float) else None,
         m["created_at"][:19]) for m in body["data"]])


@models_app.command("show")
def models_show(ctx: typer.Context, model: ModelArg, as_json: Json = False) -> None:
    """One model: classes, test metrics, calibration and its abstain threshold."""
    with connect(ctx, None, as_json) as client:
        body = client.get_model(model)
    if as_json:
        print_json(body)
        return
    metrics = body.get("metrics") or {}
    test, calibration = metrics.get("test") or {}, metrics.get("calibration") or {}
    _say(f"model {body['id']} · project {body['project']} · {body['base_model']} · {body['image_size']}px · "
         f"{'serving' if body.get('serving') else 'not serving'}")
    _say(f"classes {', '.join(body['classes'])}")
    if "accuracy" in test:
        _say(f"test accuracy {test['accuracy']:.3f} · macro F1 {test.get('macro_f1', 0):.3f}")
    ece = (f" · test ECE {calibration['ece_before']:.3f} -> {calibration['ece_after']:.3f}"
           if "ece_after" in calibration else "")
    _say(f"temperature {body.get('temperature', 1.0):.3f}{ece} · min_score {body.get('min_score', 0.0)}")


@models_app.command("promote")
def models_promote(ctx: typer.Context, model: ModelArg, as_json: Json = False) -> None:
    """Pin this model as the one its project serves."""
    with connect(ctx, None, as_json) as client:
        body = client.promote_model(model)
    print_json(body) if as_json else _say(f"model {model} now serves project {body['project']}")


@models_app.command("threshold")
def models_threshold(ctx: typer.Context, model: ModelArg,
                     min_score: Annotated[float | None, typer.Option(help="abstain under this calibrated score (0-1)")
                                          ] = None,
                     label: Annotated[list[str] | None, typer.Option(
                         "--class", help="per-class threshold: label=score (repeatable)")] = None,
                     as_json: Json = False) -> None:
    """Set when predictions abstain (label null): a global min_score and per-class overrides."""
    per_class: dict[str, float] = {}
    for raw in label or []:
        name, sep, value = raw.rpartition("=")
        try:
            per_class[name] = float(value) if sep and name else float("nan")
        except ValueError:
            per_class[name] = float("nan")
        if per_class[name] != per_class[name]:  # nan: not label=number
            fail(f"--class '{raw}' must look like label=score, e.g. --class cat=0.8")
    if min_score is None and not per_class:
        fail("pass --min-score and/or --class label=score")
    with connect(ctx, None, as_json) as client:
        body = client.set_thresholds(model, min_score=min_score, class_min_scores=per_class or None)
    print_json(body) if as_json else _say(f"model {model} abstains under {body['min_score']}"
                                          + (f" (per class {body['class_min_scores']})"
                                             if body.get("class_min_scores") else ""))


@models_app.command("export")
def models_export(ctx: typer.Context, model: ModelArg,
                  output: Annotated[Path, typer.Option("--output", "-o", help="file or folder to write")] = Path("."),
                  format: Annotated[str, typer.Option(help="safetensors, torchscript or onnx")] = "safetensors",
                  as_json: Json = False) -> None:
    """Download the model as safetensors weights, TorchScript or ONNX."""
    with connect(ctx, None, as_json) as client:
        path = client.export_model(model, output, format=format)
    result = {"id": model, "format": format, "path": str(path), "bytes": path.stat().st_size}
    print_json(result) if as_json else _say(f"wrote {path} ({result['bytes']} bytes)")


def _show_batch(body: Any) -> None:
    progress = body.get("progress") or {}
    _say(f"batch {body['id']} {body['status']} · project {body['project']} · model {body['model_id']} · "
         f"{progress.get('done', 0)}/{progress.get('total') if progress.get('total') is not None else '?'} files · "
         f"{progress.get('rejected', 0)} rejected")
    if body.get("error"):
        _say(f"error {body['error']} ({body.get('error_code')})")


@batch_app.command("create")
def batch_create(ctx: typer.Context,
                 path: Annotated[Path | None, typer.Argument(help="archive or folder of images")] = None,
                 dataset: Annotated[str | None, typer.Option(help="predict a dataset's images instead")] = None,
                 top_k: Annotated[int | None, typer.Option(help="labels per image (default: the API's, 5)")] = None,
                 model: Annotated[str | None, typer.Option(help="model id (default: the one the project serves)")
                                  ] = None,
                 wait: Annotated[bool, typer.Option(help="wait until the batch ends")] = False,
                 project: ProjectOpt = None, as_json: Json = False) -> None:
    """Start a batch prediction over an archive/folder of images, or a dataset (--dataset)."""
    if (path is None) == (dataset is None):
        fail("give an archive or folder of images, or --dataset ID (one of them)")
    with connect(ctx, project, as_json) as client:
        body = client.create_batch(path=path, dataset_id=dataset, top_k=top_k, model_id=model)
        if not as_json:
            _say(f"batch {body['id']} {body['status']}")
        if wait:
            body = client.wait_for_batch(body["id"])
    print_json(body) if as_json else _show_batch(body)


@batch_app.command("status")
def batch_status(ctx: typer.Context, batch: BatchArg, as_json: Json = False) -> None:
    """A batch prediction's state and progress."""
    with connect(ctx, None, as_json) as client:
        body = client.get_batch(batch)
    print_json(body) if as_json else _show_batch(body)


@batch_app.command("results")
def batch_results(ctx: typer.Context, batch: BatchArg,
                  output: Annotated[Path, typer.Option("--output", "-o", help="file or folder to write")] = Path("."),
                  format: Annotated[str, typer.Option(help="csv or jsonl")] = "csv", as_json: Json = False) -> None:
    """Download a finished batch's results (one row per file: top-k, or why it was rejected)."""
    with connect(ctx, None, as_json) as client:
        path = client.batch_results(batch, output, format=format)
    result = {"id": batch, "format": format, "path": str(path), "bytes": path.stat().st_size}
    print_json(result) if as_json else _say(f"wrote {path} ({result['bytes']} bytes)")


@batch_app.command("cancel")
def batch_cancel(ctx: typer.Context, batch: BatchArg, as_json: Json = False) -> None:
    """Cancel a queued or running batch prediction."""
    with connect(ctx, None, as_json) as client:
        body = client.cancel_batch(batch)
    print_json(body) if as_json else _say(f"batch {batch} {body['status']}")


@batch_app.command("list")
def batch_list(ctx: typer.Context, project: ProjectOpt = None, as_json: Json = False) -> None:
    """The project's batch predictions, newest first."""
    with connect(ctx, project, as_json) as client:
        body = client.list_batches()
    if as_json:
        print_json(body)
        return
    _say(f"project {client.project}: {body['count']} batch prediction(s)")
    _table(("batch", "status", "done", "rejected", "model", "created"), [
        (b["id"], b["status"], (b.get("progress") or {}).get("done"), (b.get("progress") or {}).get("rejected"),
         b["model_id"], b["created_at"][:19]) for b in body["data"]])


@webhooks_app.command("create")
def webhooks_create(ctx: typer.Context, url: Annotated[str, typer.Argument(help="http(s) URL events are POSTed to")],
                    secret: Annotated[str, typer.Option(envvar="TUNESERVE_WEBHOOK_SECRET",
                                                        help="signs every delivery (env TUNESERVE_WEBHOOK_SECRET)")],
                    event: Annotated[list[str] | None, typer.Option("--event", help="event type (repeatable; "
                                                                    "default: all)")] = None,
                    project: ProjectOpt = None, as_json: Json = False) -> None:
    """Register a webhook in the project."""
    with connect(ctx, project, as_json) as client:
        body = client.create_webhook(url, secret, events=event)
    print_json(body) if as_json else _say(f"webhook {body['id']} -> {body['url']} for {', '.join(body['events'])}")


@webhooks_app.command("list")
def webhooks_list(ctx: typer.Context, project: ProjectOpt = None, as_json: Json = False) -> None:
    """The project's webhooks (secrets are never shown)."""
    with connect(ctx, project, as_json) as client:
        body = client.list_webhooks()
    if as_json:
        print_json(body)
        return
    _say(f"project {client.project}: {body['count']} webhook(s)")
    _table(("webhook", "url", "events", "created"),
           [(h["id"], h["url"], ", ".join(h["events"]), h["created_at"][:19]) for h in body["data"]])


@webhooks_app.command("delete")
def webhooks_delete(ctx: typer.Context, hook: HookArg, as_json: Json = False) -> None:
    """Remove a webhook; nothing more is delivered to it."""
    with connect(ctx, None, as_json) as client:
        client.delete_webhook(hook)
    print_json({"id": hook, "deleted": True}) if as_json else _say(f"deleted webhook {hook}")


@webhooks_app.command("deliveries")
def webhooks_deliveries(ctx: typer.Context, hook: HookArg, as_json: Json = False) -> None:
    """A webhook's delivery log: each event, its attempts and the last answer."""
    with connect(ctx, None, as_json) as client:
        body = client.webhook_deliveries(hook)
    if as_json:
        print_json(body)
        return
    _say(f"webhook {hook}: {body['count']} deliver{'y' if body['count'] == 1 else 'ies'}")
    _table(("event", "type", "status", "attempts", "last answer", "created"),
           [(d["event_id"], d["type"], d["status"], d["attempts"], d.get("last_status_code") or d.get("last_error"),
             d["created_at"][:19]) for d in body["data"]])
