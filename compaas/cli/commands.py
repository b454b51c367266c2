"""`compaas login | models | datasets | jobs | report`: the API from a terminal or a script."""

from __future__ import annotations

import json
import webbrowser
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from compaas import config
from compaas.cli.output import ExitCode, emit_json, err, fail, handles_errors, out
from compaas.cli.progress import JobProgress
from compaas.client import Client, Job

JsonOpt = Annotated[
    bool,
    typer.Option(
        "--json", help="Print one JSON document on stdout (and nothing else) for scripts."
    ),
]
UrlOpt = Annotated[
    str | None,
    typer.Option(
        "--url",
        envvar=config.URL_ENV,
        show_default=False,
        help="API base URL. Default: COMPAAS_URL, else the saved profile, "
        f"else {config.DEFAULT_URL}.",
    ),
]
KeyOpt = Annotated[
    str | None,
    typer.Option(
        "--key",
        envvar=config.KEY_ENV,
        show_default=False,
        help="API key. Default: COMPAAS_API_KEY, else the saved profile (`compaas login`).",
    ),
]
TimeoutOpt = Annotated[
    float | None,
    typer.Option("--timeout", help="With --wait: give up after this many seconds (exit 5).", min=0),
]

models_app = typer.Typer(help="Upload and list models (ONNX or torch.export .pt2).")
datasets_app = typer.Typer(help="Upload and list datasets (.npz or .safetensors).")
jobs_app = typer.Typer(help="Create, follow, compare and download compression jobs.")


def _client(url: str | None, key: str | None, as_json: bool) -> Client:
    profile = config.resolve(url, key)
    if not profile.api_key:
        raise fail(
            ExitCode.USAGE,
            "no API key: run `compaas login --url URL --key KEY` once, or set COMPAAS_API_KEY "
            "(an operator makes keys with `compaas admin create-team NAME`)",
            as_json,
        )
    return Client(url, key)


@handles_errors
def login(
    key: Annotated[
        str,
        typer.Option(
            "--key",
            envvar=config.KEY_ENV,
            prompt="API key",
            hide_input=True,
            show_default=False,
            help="API key (asked for when not given).",
        ),
    ],
    url: Annotated[
        str, typer.Option("--url", envvar=config.URL_ENV, help="API base URL.")
    ] = config.DEFAULT_URL,
    as_json: JsonOpt = False,
) -> None:
    """Check the key against the API, then save URL and key as your profile (file mode 0600).

    COMPAAS_URL and COMPAAS_API_KEY override the profile; --url/--key override both."""
    with Client(url, key) as client:
        client.request("GET", "/v1/models", params={"limit": 1})  # 401 for a bad key
    path = config.save_profile(url, key)
    if as_json:
        emit_json({"url": url.rstrip("/"), "profile": str(path)})
    else:
        out.print(f"logged in to {url.rstrip('/')}; profile saved to {path} (mode 0600)")


@models_app.command("upload")
@handles_errors
def models_upload(
    file: Annotated[Path, typer.Argument(help="The model file (.onnx or .pt2).")],
    name: Annotated[
        str | None, typer.Option(help="A name for it (default: the file name).")
    ] = None,
    wait: Annotated[
        bool, typer.Option(help="Wait until the worker inspected it (ready or invalid).")
    ] = True,
    timeout: TimeoutOpt = None,
    url: UrlOpt = None,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Upload a model; prints its id (exit 1 if the worker found it invalid)."""
    with _client(url, key, as_json) as client:
        model = client.models.upload(file, name=name, wait=wait, timeout=timeout)
    if as_json:
        emit_json(model)
        return
    params = f", {model.params:,} params" if model.params is not None else ""
    out.print(f"model {model.id} {model.status} ({model.format}, {model.size_bytes:,} B{params})")


@models_app.command("list")
@handles_errors
def models_list(url: UrlOpt = None, key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """The team's models, newest first."""
    with _client(url, key, as_json) as client:
        models = client.models.list()
    if as_json:
        emit_json(models)
        return
    table = Table("id", "name", "format", "status", "size", "params", "created")
    for m in models:
        params = f"{m.params:,}" if m.params is not None else "-"
        created = m.created_at.isoformat(timespec="seconds")
        table.add_row(m.id, m.name, m.format, m.status, f"{m.size_bytes:,}", params, created)
    out.print(table)


@datasets_app.command("upload")
@handles_errors
def datasets_upload(
    file: Annotated[Path, typer.Argument(help="The dataset file (.npz or .safetensors).")],
    name: Annotated[
        str | None, typer.Option(help="A name for it (default: the file name).")
    ] = None,
    url: UrlOpt = None,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Upload a dataset (one array per model input, optional integer `labels`)."""
    with _client(url, key, as_json) as client:
        dataset = client.datasets.upload(file, name=name)
    if as_json:
        emit_json(dataset)
        return
    labels = "with labels" if dataset.has_labels else "no labels"
    out.print(f"dataset {dataset.id} ({dataset.num_samples} samples, {labels})")


@datasets_app.command("list")
@handles_errors
def datasets_list(url: UrlOpt = None, key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """The team's datasets, newest first."""
    with _client(url, key, as_json) as client:
        datasets = client.datasets.list()
    if as_json:
        emit_json(datasets)
        return
    table = Table("id", "name", "format", "samples", "labels", "size")
    for d in datasets:
        labels = "yes" if d.has_labels else "no"
        table.add_row(d.id, d.name, d.format, str(d.num_samples), labels, f"{d.size_bytes:,}")
    out.print(table)


def _outcome(job: Job, as_json: bool) -> None:
    """Print the finished job and exit 1 unless it succeeded."""
    if as_json:
        emit_json(job.read)
    else:
        _show(job)
    if not job.succeeded:
        error = job.error or {}
        detail = f": {error.get('code')}: {error.get('detail')}" if error else ""
        err.print(f"job {job.id} {job.status}{detail}", markup=False)
        raise typer.Exit(int(ExitCode.FAILED))


def _follow(client: Client, job: Job, timeout: float | None, as_json: bool) -> Job:
    if as_json:
        return client.jobs.wait(job.id, timeout=timeout)
    with JobProgress(job.read, err) as bars:
        return client.jobs.wait(job.id, timeout=timeout, on_event=bars)


def _json_file(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise FileNotFoundError(f"cannot read the {what} file {path}: {exc}") from exc
    except ValueError as exc:
        raise ValueError(f"the {what} file {path} is not JSON: {exc}") from exc


def _budget(pairs: list[str] | None, as_json: bool) -> dict[str, float] | None:
    """--budget KEY=VALUE options as the request's budget object (the API checks the keys)."""
    if not pairs:
        return None
    budget: dict[str, float] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            budget[name.strip()] = float(value)
        except ValueError:
            raise fail(
                ExitCode.USAGE,
                f"--budget {pair!r} is not KEY=NUMBER (e.g. --budget max_accuracy_drop=0.01)",
                as_json,
            ) from None
    return budget


@jobs_app.command("create")
@handles_errors
def jobs_create(
    model: Annotated[str, typer.Option("--model", help="The model's id.")],
    preset: Annotated[
        str | None,
        typer.Option(help="A preset: edge-int8, fp16, int4-weights, tiny, deep-compression."),
    ] = None,
    pipeline: Annotated[
        Path | None,
        typer.Option(help='A JSON file with the ops, e.g. [{"op": "quantize", ...}].'),
    ] = None,
    dataset: Annotated[str | None, typer.Option(help="The dataset's id.")] = None,
    overrides: Annotated[
        str | None,
        typer.Option(help='With --preset: JSON of fields to change, e.g. {"prune": {...}}.'),
    ] = None,
    task: Annotated[
        str | None,
        typer.Option(help="The evaluation task: classification, embedding or generic."),
    ] = None,
    budget: Annotated[
        list[str] | None,
        typer.Option(
            metavar="KEY=VALUE",
            help="With --preset auto, repeatable: max_accuracy_drop, min_cosine, min_sqnr_db, "
            "max_size_bytes or max_latency_ms, e.g. --budget max_accuracy_drop=0.01.",
        ),
    ] = None,
    objective: Annotated[
        str | None,
        typer.Option(help="With --preset auto: size (default), latency or balanced."),
    ] = None,
    max_minutes: Annotated[
        float | None, typer.Option(help="With --preset auto: the search's time limit.")
    ] = None,
    max_candidates: Annotated[
        int | None, typer.Option(help="With --preset auto: how many candidates at most.")
    ] = None,
    wait: Annotated[
        bool, typer.Option(help="Follow the job with live progress until it finishes.")
    ] = False,
    timeout: TimeoutOpt = None,
    url: UrlOpt = None,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Queue a compression job from a preset or a pipeline file; with --wait, exit 0 only if
    it succeeded (1: failed, canceled or under its quality floor)."""
    if (preset is None) == (pipeline is None):
        raise fail(ExitCode.USAGE, "give exactly one of --preset NAME or --pipeline FILE", as_json)
    steps: Any = _json_file(pipeline, "pipeline") if pipeline is not None else None
    if isinstance(steps, dict) and "pipeline" in steps:
        steps = steps["pipeline"]
    changes = json.loads(overrides) if overrides else None
    limits = {"max_minutes": max_minutes, "max_candidates": max_candidates}
    search = {k: v for k, v in limits.items() if v is not None} or None
    with _client(url, key, as_json) as client:
        job = client.jobs.create(
            model,
            dataset_id=dataset,
            preset=preset,
            pipeline=steps,
            overrides=changes,
            evaluation={"task": task} if task else None,
            budget=_budget(budget, as_json),
            objective=objective,
            search=search,
        )
        if not wait:
            if as_json:
                emit_json(job.read)
            else:
                out.print(
                    f"job {job.id} {job.status}; follow it with `compaas jobs watch {job.id}`"
                )
            return
        if not as_json:
            err.print(f"job {job.id} {job.status}", markup=False)
        job = _follow(client, job, timeout, as_json)
    _outcome(job, as_json)


@jobs_app.command("watch")
@handles_errors
def jobs_watch(
    job_id: Annotated[str, typer.Argument(metavar="JOB", help="The job's id.")],
    timeout: TimeoutOpt = None,
    url: UrlOpt = None,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Follow a job with live progress until it finishes (exit codes as `jobs create --wait`)."""
    with _client(url, key, as_json) as client:
        job = _follow(client, client.jobs.get(job_id), timeout, as_json)
    _outcome(job, as_json)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _show(job: Job) -> None:
    read = job.read
    verdict = (read.quality or {}).get("verdict")
    head = f"job {read.id}  {read.status}  {read.progress:.0%}"
    out.print(head + (f"  verdict {verdict}" if verdict else ""), markup=False)
    steps = Table("step", "op", "status", "verdict", "warnings", title="steps")
    for step in read.steps:
        step_verdict = (step.quality or {}).get("verdict")
        steps.add_row(
            str(step.index + 1),
            step.op,
            step.status,
            step_verdict or "-",
            str(len(step.warnings or [])),
        )
    out.print(steps)
    if job.ratios:
        ratios = Table("metric", "value", title="result vs original")
        for name, value in job.ratios.items():
            ratios.add_row(name, _fmt(value, 4))
        out.print(ratios)
    if read.artifacts:
        files = Table("artifact", "role", "format", "size", "verdict", "sha256", title="artifacts")
        for a in read.artifacts:
            files.add_row(a.id, a.role, a.format, f"{a.size_bytes:,}", a.verdict or "-", a.sha256)
        out.print(files)
    for warning in read.warnings:
        out.print(f"warning: {warning}", markup=False)
    if read.error is not None:
        out.print(f"error {read.error.code}: {read.error.detail}", markup=False)


@jobs_app.command("show")
@handles_errors
def jobs_show(
    job_id: Annotated[str, typer.Argument(metavar="JOB", help="The job's id.")],
    url: UrlOpt = None,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A job: status, steps, ratios, artifacts, warnings."""
    with _client(url, key, as_json) as client:
        job = client.jobs.get(job_id)
    if as_json:
        emit_json(job.read)
    else:
        _show(job)


@jobs_app.command("list")
@handles_errors
def jobs_list(
    status: Annotated[
        str | None,
        typer.Option(
            help="Only jobs in this status: queued, running, succeeded, failed, canceled."
        ),
    ] = None,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.", min=1)] = 20,
    url: UrlOpt = None,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The team's jobs, newest first."""
    with _client(url, key, as_json) as client:
        jobs = client.jobs.list(status=status, limit=limit)
    if as_json:
        emit_json([j.read for j in jobs])
        return
    table = Table("id", "status", "progress", "preset / ops", "ratio", "created")
    for j in jobs:
        ops = j.read.preset or "+".join(s.op for s in j.steps)
        table.add_row(
            j.id,
            j.status,
            f"{j.progress:.0%}",
            ops,
            _fmt(j.ratios.get("compression_ratio"), 2),
            j.read.created_at.isoformat(timespec="seconds"),
        )
    out.print(table)


@jobs_app.command("cancel")
@handles_errors
def jobs_cancel(
    job_id: Annotated[str, typer.Argument(metavar="JOB", help="The job's id.")],
    url: UrlOpt = None,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Cancel a queued or running job (a running one stops within about 2 s)."""
    with _client(url, key, as_json) as client:
        job = client.jobs.cancel(job_id)
    if as_json:
        emit_json(job.read)
    else:
        out.print(f"job {job.id} {job.status}")


@jobs_app.command("retry")
@handles_errors
def jobs_retry(
    job_id: Annotated[str, typer.Argument(metavar="JOB", help="The job's id.")],
    wait: Annotated[bool, typer.Option(help="Follow it with live progress.")] = False,
    timeout: TimeoutOpt = None,
    url: UrlOpt = None,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Queue a failed or canceled job again, resuming after its last stored checkpoint."""
    with _client(url, key, as_json) as client:
        job = client.jobs.retry(job_id)
        if wait:
            job = _follow(client, job, timeout, as_json)
    if wait:
        _outcome(job, as_json)
    elif as_json:
        emit_json(job.read)
    else:
        out.print(f"job {job.id} {job.status}")


@jobs_app.command("download")
@handles_errors
def jobs_download(
    job_id: Annotated[str, typer.Argument(metavar="JOB", help="The job's id.")],
    out_dir: Annotated[
        Path, typer.Option("--out", "-o", help="The directory to write the files into.")
    ] = Path("."),
    all_files: Annotated[
        bool, typer.Option("--all", help="Also the steps' checkpoints, not only final files.")
    ] = False,
    url: UrlOpt = None,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Download a job's artifacts, each checked against the sha256 the API lists."""
    with _client(url, key, as_json) as client:
        job = client.jobs.get(job_id)
        roles = None if all_files else {"final"}
        wanted = [a for a in job.artifacts if roles is None or a.role in roles]
        if not wanted:
            raise fail(
                ExitCode.FAILED,
                f"job {job.id} ({job.status}) has no {'' if all_files else 'final '}artifact",
                as_json,
            )
        paths = client.jobs.download(job, out_dir, roles=roles)
    files = [
        {"artifact_id": a.id, "role": a.role, "path": str(p), "sha256": a.sha256}
        for a, p in zip(wanted, paths, strict=True)
    ]
    if as_json:
        emit_json(files)
        return
    for f in files:
        out.print(f"{f['path']}  sha256 {f['sha256']}  ({f['role']})", markup=False)


COMPARE_COLUMNS = [
    ("ratio", "ratios", "compression_ratio", 2),
    ("speedup", "ratios", "speedup", 2),
    ("acc. drop", "ratios", "accuracy_drop", 4),
    ("agreement", "final", "agreement_top1", 4),
    ("cosine", "final", "cosine_similarity", 4),
    ("SQNR dB", "final", "sqnr_db", 1),
    ("size B", "final", "size_bytes", 0),
]


def _comparison(job: Job) -> dict[str, Any]:
    metrics = job.metrics or {}
    row: dict[str, Any] = {
        "id": job.id,
        "status": job.status,
        "pipeline": job.read.preset or "+".join(s.op for s in job.steps),
        "verdict": (job.read.quality or {}).get("verdict"),
    }
    for _, block, name, _ in COMPARE_COLUMNS:
        row[name] = (metrics.get(block) or {}).get(name)
    return row


@jobs_app.command("compare")
@handles_errors
def jobs_compare(
    job_ids: Annotated[list[str], typer.Argument(metavar="JOB...", help="Two or more job ids.")],
    url: UrlOpt = None,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Several jobs side by side: size and speed ratios, accuracy drop and fidelity."""
    with _client(url, key, as_json) as client:
        rows = [_comparison(client.jobs.get(job_id)) for job_id in job_ids]
    if as_json:
        emit_json(rows)
        return
    table = Table("job", "status", "pipeline", *(c[0] for c in COMPARE_COLUMNS), "verdict")
    for row in rows:
        cells = [_fmt(row[name], digits) for _, _, name, digits in COMPARE_COLUMNS]
        table.add_row(row["id"][:13], row["status"], row["pipeline"], *cells, row["verdict"] or "-")
    out.print(table)


@handles_errors
def report(
    job_id: Annotated[str, typer.Argument(metavar="JOB", help="The job's id.")],
    out_file: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Where to save it (default: report-JOB.html)."),
    ] = None,
    open_it: Annotated[
        bool, typer.Option("--open", help="Open the saved page in your web browser.")
    ] = False,
    url: UrlOpt = None,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Save a job's self-contained HTML report (charts, steps, warnings)."""
    path = out_file or Path(f"report-{job_id}.html")
    with _client(url, key, as_json) as client:
        client.jobs.download_report(job_id, path)
    opened = webbrowser.open(path.resolve().as_uri()) if open_it else False
    if as_json:
        emit_json({"job_id": job_id, "path": str(path), "opened": opened})
        return
    out.print(f"report saved to {path}" + (" and opened" if opened else ""), markup=False)
    if open_it and not opened:
        err.print("no web browser found; open the file yourself", markup=False)


def register(app: typer.Typer) -> None:
    """Add the team commands to the `compaas` command."""
    app.command("login")(login)
    app.add_typer(models_app, name="models")
    app.add_typer(datasets_app, name="datasets")
    app.add_typer(jobs_app, name="jobs")
    app.command("report")(report)
