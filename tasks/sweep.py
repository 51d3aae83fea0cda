"""A sweep on Ray Tune: one Tune trial per grid point and seed, each running the Ray Train trainer of
`tasks/train.py` for its own run and then evaluating that run's final checkpoint.

Tune schedules the trials side by side as far as the cluster holds their training workers. A finished trial
is one whose report (`<run dir>/sweep_report.json`) exists on storage: a sweep started again skips it, and an
unfinished trial resumes its run from its checkpoints. Tune's own bookkeeping stays on local disk outside
`run.root`.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass

import ray

from dml_core import storage
from dml_core.config import Config, config_from_dict, load_config, parse_overrides
from dml_core.sweep import (REPORT_FILE, SWEEPS, TABLE_JSON, TABLE_MD, Trial, expand_grid, parse_grid,
                            table_json, table_markdown, trial_row)
from tasks import ray_runtime


class SweepError(RuntimeError):
    """Some trials of a sweep failed; the finished ones are in the table and are kept for the next start."""


@dataclass
class SweepResult:
    name: str
    url: str  # <run.root>/sweeps/<name>
    rows: list[dict]  # one per finished trial, in grid order
    ran: list[str]  # trial keys run by this call
    skipped: list[str]  # trial keys finished before this call

    @property
    def table_url(self) -> str:
        return storage.join(self.url, TABLE_MD)


def report_url(cfg: Config) -> str:
    return storage.join(cfg.run_dir, REPORT_FILE)


def plan(config: str, grid_items: list[str], seeds: int = 1, sets: list[str] | None = None):
    """The base config and each trial with its validated config (`--set` items, then the trial's values)."""
    sets = list(sets or [])
    base = load_config(config, parse_overrides(sets))
    trials = expand_grid(parse_grid(grid_items), seeds, first_seed=base.train.seed)
    return base, [(t, load_config(config, parse_overrides(sets + t.overrides(base.run.name)))) for t in trials]


def evaluate_trial(cfg: Config, checkpoint: str) -> dict:
    """Evaluate `checkpoint` on the evaluation split beside the split's raw-pixel floor; the report (with the OPIS
    utility curves) is written beside the run and is its finish mark."""
    from dml_core.metrics.evaluate import evaluate_embeddings
    from dml_core.training.embed import embed_with_config
    from dml_core.training.preflight import read_dataset
    from tasks.evaluate import config_floor

    manifest = read_dataset(cfg)
    z, labels, _ = embed_with_config(cfg, checkpoint, manifest)
    report = evaluate_embeddings(z, labels, floor=config_floor(cfg, manifest, checkpoint),
                                 meta={"run": cfg.run.name, "checkpoint": checkpoint, "split": "eval",
                                       "dataset": cfg.data.dataset})
    storage.write_bytes_atomic(report_url(cfg), report.to_json(include_curves=True).encode())
    return report.to_dict()


def run_trial(cfg: Config, callbacks: list | None = None) -> dict:
    """Train the trial's run (resuming it if it has checkpoints), then evaluate its final checkpoint."""
    from tasks.train import run_training

    result = run_training(cfg, callbacks=callbacks)
    if result.checkpoint is None:
        raise RuntimeError(f"trial run {cfg.run_dir} ended without a checkpoint")
    return evaluate_trial(cfg, result.checkpoint)


def _tune_trial(params: dict, configs: dict) -> None:
    """The Tune trainable: the Ray Train trainer reports its metrics to Tune, then the evaluation's."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = config_from_dict(configs[params["trial"]])
    storage.configure(cfg.storage)
    report = run_trial(cfg, callbacks=[TuneReportCallback()])
    tune.report({**(report.get("retrieval") or {}), "opis": report["opis"]["opis"],
                 "eps_opis": report["opis"]["eps_opis"], "done": True})


def concurrent_trials(configs: list[Config]) -> int:
    """How many trials' training workers the cluster holds at once (at least one)."""
    total = ray.cluster_resources()
    fits = []
    for cfg in configs:
        need = {r: a * cfg.ray.num_workers for r, a in ray_runtime.worker_resources(cfg).items() if a}
        fits.append(min((int(total.get(r, 0) // a) for r, a in need.items()), default=len(configs)))
    return max(1, min(fits, default=1))


def run_sweep(config: str, grid_items: list[str], seeds: int = 1, sets: list[str] | None = None,
              name: str | None = None) -> SweepResult:
    """Run every unfinished trial of the grid on Ray Tune, then write the table of all finished trials."""
    base, trials = plan(config, grid_items, seeds, sets)
    storage.configure(base.storage)
    name = name or base.run.name
    url = storage.join(base.run.root, SWEEPS, name)
    pending = [(t, c) for t, c in trials if not storage.exists(report_url(c))]
    storage.write_bytes_atomic(storage.join(url, "sweep.json"), json.dumps(
        {"config": config, "grid": list(grid_items), "seeds": seeds, "set": list(sets or []),
         "trials": [{"trial": t.key, "run": c.run.name} for t, c in trials]}, indent=2).encode())
    if pending:
        print(f"[sweep] {name}: {len(pending)} trial(s) to run, {len(trials) - len(pending)} finished before",
              flush=True)
        _tune(base, url, pending)
    rows, missing = [], []
    for trial, cfg in trials:
        if storage.exists(report_url(cfg)):
            rows.append(trial_row(trial, cfg.run.name, json.loads(storage.read_bytes(report_url(cfg)))))
        else:
            missing.append(trial.key)
    storage.write_bytes_atomic(storage.join(url, TABLE_JSON), table_json(name, rows).encode())
    storage.write_bytes_atomic(storage.join(url, TABLE_MD), table_markdown(name, rows).encode())
    if missing:
        raise SweepError(f"sweep {name}: trial(s) {', '.join(missing)} failed (see the Ray output above); the "
                         f"{len(rows)} finished are in {storage.join(url, TABLE_MD)}; run the sweep again to retry")
    done = {t.key for t, _ in pending}
    return SweepResult(name=name, url=url, rows=rows, ran=[t.key for t, _ in trials if t.key in done],
                       skipped=[t.key for t, _ in trials if t.key not in done])


def _tune(base: Config, url: str, pending: list[tuple[Trial, Config]]) -> None:
    """One Tune run over the pending trials; a trial that fails leaves no report (the caller names it)."""
    from ray import tune

    # Tune's own console output names its bookkeeping folder, removed at the end; the sweep prints its table
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: silent (a user's own setting wins)
    ray_runtime.init_ray(base, url)
    for _, cfg in pending:
        ray_runtime.check_placement(cfg)
    bookkeeping = os.path.join(ray_runtime.ray_temp_dir(base, url), "tune")  # Tune's own, never on run storage
    run_name = f"sweep-{uuid.uuid4().hex[:12]}"
    configs = {t.key: c.to_dict() for t, c in pending}
    # the trial's driver holds no CPU (its trainer's workers hold theirs); Tune needs some resource: a byte
    trainable = tune.with_resources(tune.with_parameters(_tune_trial, configs=configs), {"cpu": 0, "memory": 1})
    tuner = tune.Tuner(
        trainable, param_space={"trial": tune.grid_search(list(configs))},
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrent_trials([c for _, c in pending])),
        run_config=tune.RunConfig(name=run_name, storage_path=bookkeeping, verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0)))
    try:
        tuner.fit()
    finally:
        shutil.rmtree(os.path.join(bookkeeping, run_name), ignore_errors=True)
