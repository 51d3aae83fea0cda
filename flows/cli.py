"""The `dml` command: one YAML config per run, `--set key=value` overrides, checks before any compute, errors
as one line on stderr (the traceback with `--debug`).

The flows are imported inside the commands, so `dml --help` and a bad config answer in a second or two.
"""
import contextlib
import json
import os
import sys
import traceback
from typing import Annotated, List, Optional

import typer

app = typer.Typer(name="dml", add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Retrain, evaluate and serve embedding models: shard -> train -> evaluate -> gate -> "
                       "register or backfill. See README.md, section Commands.")

ConfigArg = Annotated[str, typer.Argument(metavar="CONFIG", help="The run's YAML config (a path or a URL).")]
Sets = Annotated[Optional[List[str]], typer.Option(
    "--set", "-s", metavar="KEY=VALUE", help="Override a config field, e.g. --set train.steps=50 (repeatable).")]
Debug = Annotated[bool, typer.Option("--debug", help="Show the full traceback of an error.")]
Checkpoint = Annotated[Optional[str], typer.Option(
    help="Checkpoint folder to use; default: the latest checkpoint of the config's run.")]
OWN_MODULES = ("dml_core.", "tasks.", "flows.")


def _console():
    """A rich console; piped (no terminal, no COLUMNS) it is wide enough that tables do not wrap."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal or os.environ.get("COLUMNS") else Console(width=200)


def _one_line(e: BaseException) -> str:
    """The error as one line: this project's errors say what is wrong; any other shows its type and points at
    --debug."""
    text = " ".join(str(e).split()) or type(e).__name__
    if type(e).__module__.startswith(OWN_MODULES):
        return text
    return f"{type(e).__name__}: {text} (--debug shows the traceback)"


@contextlib.contextmanager
def _errors(debug: bool):
    """Turn any error into one line on stderr and exit status 1 (130 on Ctrl-C); `debug` adds the traceback."""
    try:
        yield
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        typer.echo("dml: interrupted", err=True)
        raise typer.Exit(130)
    except Exception as e:
        if debug:
            traceback.print_exc(file=sys.stderr)
        typer.echo(f"dml: error: {_one_line(e)}", err=True)
        raise typer.Exit(1)


def _prepare(config: str, sets: Optional[List[str]], *, services: bool = True, story: bool = False):
    """Load and validate the config (and with `story`, each of its `runs`), check the storage root and, with
    `services`, the Ray cluster and Prefect API it names. Returns (config, [(run name, --set items)])."""
    from dml_core import storage
    from dml_core.config import load_config, load_story, parse_overrides
    from dml_core.preflight import check_storage_root

    sets = list(sets or [])
    cfg = load_config(config, parse_overrides(sets))
    storage.configure(cfg.storage)  # before the first storage access (a story's runs share one storage)
    runs = load_story(config, sets) if story else [(cfg.run.name, sets, cfg)]
    configs = [c for _, _, c in runs]
    roots = {(c.run.root, c.storage.endpoint_url, "run.root"): None for c in configs}
    roots.update({(c.data.root, c.storage.endpoint_url, "data.root"): None for c in configs
                  if c.data.root and c.data.root != c.run.root})
    for root in roots:
        check_storage_root(*root)
    if services:
        from tasks.preflight import check_prefect_api, check_ray_address

        for address in dict.fromkeys(c.ray.address for c in configs):
            check_ray_address(address)
        check_prefect_api()
    return cfg, [(name, items) for name, items, _ in runs]


def _print_result(title: str, result: dict) -> None:
    """A flow's result dict as a two-column table."""
    from rich.table import Table

    table = Table(title=title, show_header=False)
    for key, value in result.items():
        table.add_row(str(key), value if isinstance(value, str) else json.dumps(value, default=str))
    _console().print(table)


@app.command("run")
def run_cmd(config: ConfigArg, sets: Sets = None, debug: Debug = False) -> None:
    """The whole retrain, or each run of the config's `runs` in turn; ends with the summary table."""
    with _errors(debug):
        cfg, runs = _prepare(config, sets, story=True)
        from dml_core import storage
        from flows.retrain import retrain_flow
        from flows.summary import SUMMARY_FILE, summary_markdown, summary_table
        from tasks.ray_runtime import ray_session

        console, rows = _console(), []
        summary_url = storage.join(cfg.run.root, SUMMARY_FILE)
        with ray_session():  # one Ray for all the runs
            for n, (name, overrides) in enumerate(runs, 1):
                console.rule(f"run {n}/{len(runs)}: {name}")
                rows.append(retrain_flow(config, overrides))
                storage.write_bytes_atomic(summary_url, summary_markdown(rows).encode())  # kept if a later run fails
        console.print(summary_table(rows, title=f"{len(rows)} run(s)"))
        console.print(f"summary: {summary_url}", soft_wrap=True)


@app.command()
def shard(config: ConfigArg, sets: Sets = None, debug: Debug = False) -> None:
    """Shard data.source into WebDataset shards and a manifest (unchanged data: nothing rewritten)."""
    with _errors(debug):
        _prepare(config, sets)
        from flows.stages import shard_flow

        _print_result("shard", shard_flow(config, list(sets or [])))


@app.command()
def train(config: ConfigArg, sets: Sets = None, debug: Debug = False) -> None:
    """Train (or resume) the run run.name on Ray."""
    with _errors(debug):
        _prepare(config, sets)
        from flows.stages import train_flow

        _print_result("train", train_flow(config, list(sets or [])))


@app.command()
def backfill(config: ConfigArg, checkpoint: Checkpoint = None,
             budget: Annotated[Optional[float], typer.Option(
                 min=0.0, max=1.0, help="Re-embed this share (0-1) of the served transformed gallery with its query "
                 "model, in backfill.order, swapping indexes as it goes (FastFill); default: embed the whole "
                 "gallery with the checkpoint.")] = None,
             sets: Sets = None, debug: Debug = False) -> None:
    """Embed the gallery with a checkpoint on Ray, build its index and switch the registry to it; or, with
    --budget, re-embed part of a transformed gallery."""
    with _errors(debug):
        _prepare(config, sets)
        from flows.stages import backfill_flow

        _print_result("backfill", backfill_flow(config, list(sets or []), checkpoint=checkpoint, budget=budget))


@app.command()
def transform(config: ConfigArg, checkpoint: Checkpoint = None, sets: Sets = None, debug: Debug = False) -> None:
    """Train h from the gallery model to a checkpoint's model, map the stored gallery through it (no image
    read), index it and switch the registry to it (FCT)."""
    with _errors(debug):
        _prepare(config, sets)
        from flows.stages import transform_flow

        _print_result("transform", transform_flow(config, list(sets or []), checkpoint=checkpoint))


@app.command()
def evaluate(config: ConfigArg, checkpoint: Checkpoint = None,
             old: Annotated[Optional[str], typer.Option(
                 help="Old model's checkpoint folder to check compatibility with; default: the gallery model.")] = None,
             sets: Sets = None, debug: Debug = False) -> None:
    """Evaluate a checkpoint: retrieval metrics beside the raw-pixel floor, OPIS, compatibility with what is
    served, the gate."""
    with _errors(debug):
        _prepare(config, sets)
        from flows.stages import evaluate_flow
        from flows.summary import summary_table

        row = evaluate_flow(config, list(sets or []), checkpoint=checkpoint, old=old)
        console = _console()
        console.print(summary_table([row], title="evaluation"))
        for reason in row.get("reasons") or []:
            console.print(f"- {reason}")


@app.command()
def sweep(config: ConfigArg,
          grid: Annotated[Optional[List[str]], typer.Option(
              "--grid", "-g", metavar="KEY=V1,V2", help="A config field and its values, read as YAML, e.g. "
              "--grid loss.tau=0.05,0.1 (repeatable: the trials are the cartesian product).")] = None,
          seeds: Annotated[int, typer.Option(
              min=1, help="Trials per grid point: train.seed = the config's + 0..n-1.")] = 1,
          name: Annotated[Optional[str], typer.Option(help="The sweep's name; default: run.name.")] = None,
          sets: Sets = None, debug: Debug = False) -> None:
    """Train and evaluate every grid point x seed as trials on Ray Tune; a sweep started again skips finished
    trials. Ends with the table of trials (also under <run.root>/sweeps/<name>/)."""
    with _errors(debug):
        _prepare(config, sets)
        from tasks.sweep import run_sweep

        result = run_sweep(config, list(grid or []), seeds=seeds, sets=list(sets or []), name=name)
        _print_sweep(result)


def _print_sweep(result) -> None:
    from rich.table import Table

    from dml_core.sweep import AGGREGATE_HEADERS, TRIAL_HEADERS, aggregate, aggregate_cells, trial_cells

    console = _console()
    for title, headers, lines in ((f"sweep {result.name}: trials", TRIAL_HEADERS, map(trial_cells, result.rows)),
                                  ("mean ± std over seeds", AGGREGATE_HEADERS,
                                   map(aggregate_cells, aggregate(result.rows)))):
        table = Table(title=title)
        for i, header in enumerate(headers):
            table.add_column(header, justify="left" if i == 0 else "right")
        for cells in lines:
            table.add_row(*cells)
        console.print(table)
    console.print(f"table: {result.table_url} (ran {len(result.ran)}, finished before {len(result.skipped)})",
                  soft_wrap=True)


@app.command()
def query(config: ConfigArg, images: Annotated[List[str], typer.Argument(metavar="IMAGE...", help="Image files.")],
          k: Annotated[int, typer.Option("--k", "-k", min=1, help="Neighbours per image.")] = 5,
          as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
          sets: Sets = None, debug: Debug = False) -> None:
    """Embed images with the registry's query model and print their k nearest gallery items."""
    with _errors(debug):
        cfg, _ = _prepare(config, sets, services=False)
        from dml_core import storage
        from dml_core.gallery.gallery_model import gallery_name
        from dml_core.gallery.registry import Registry
        from dml_core.gallery.serving import ServedGallery, answer, single_threaded
        from dml_core.preflight import PreflightError

        missing = [x for x in images if not storage.exists(x)]
        if missing:
            raise PreflightError(f"query image(s) not found: {', '.join(missing)}")
        single_threaded()
        served = ServedGallery(Registry(cfg.run.root), gallery_name(cfg))  # the query service's code path
        _print_query(answer(served.gallery, served.search(images, k), images), as_json)


def _print_query(found: dict, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(found))
        return
    from rich.table import Table

    console = _console()
    console.print(f"gallery {found['gallery']}: query model {found['query_model']}, "
                  f"gallery model {found['gallery_model']}")
    for result in found["results"]:
        table = Table(title=result["image"])
        for name in ("rank", "id", "label", "class", "distance"):
            table.add_column(name, justify="left" if name == "class" else "right")
        for rank, (i, label, name, d) in enumerate(zip(result["ids"], result["labels"], result["classes"],
                                                       result["distances"]), 1):
            table.add_row(str(rank), str(i), str(label), "-" if name is None else name, f"{d:.4f}")
        console.print(table)


@app.command()
def api(config: ConfigArg,
        host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
        port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
        poll: Annotated[float, typer.Option(min=0.05, help="Seconds between two reads of the registry.")] = 2.0,
        replicas: Annotated[Optional[int], typer.Option(
            min=1, help="Replicas of the service; default: autoscale from 1 to the cluster's CPUs.")] = None,
        sets: Sets = None, debug: Debug = False) -> None:
    """Serve the registry's gallery over HTTP (Ray Serve): POST /query, GET /health; the query model and index
    are swapped together when the registry changes. Served until Ctrl-C."""
    with _errors(debug):
        cfg, _ = _prepare(config, sets, services=False)  # no Prefect here; Ray only
        from dml_core.gallery.gallery_model import gallery_name
        from tasks.preflight import check_ray_address
        from tasks.query_api import serve_until_signal

        check_ray_address(cfg.ray.address)
        serve_until_signal(cfg, gallery_name(cfg), host, port, poll, replicas)


@app.command()
def serve(config: ConfigArg, cron: Annotated[str, typer.Option(help="Cron schedule, e.g. '0 3 * * *'.")],
          sets: Sets = None, debug: Debug = False) -> None:
    """Retrain on a cron schedule (a Prefect deployment), served until Ctrl-C."""
    with _errors(debug):
        _prepare(config, sets)
        from flows.serve import serve as serve_deployment

        serve_deployment(config, cron, list(sets or []))


@app.command()
def status(config: ConfigArg, sets: Sets = None, debug: Debug = False) -> None:
    """The registry (models and index per gallery) and the last runs with their gate verdicts."""
    with _errors(debug):
        _prepare(config, sets, services=False)
        from flows.status import status_tables

        console = _console()
        for table in status_tables(config, list(sets or [])):
            console.print(table)


if __name__ == "__main__":
    app()
