"""The backfill stage on Ray: embed a gallery split with a checkpoint, shard by shard, in a pool of actors.

Each actor holds one model and is fed whole dataset shards, two queued at a time; each shard's embeddings
and completion record are written by `dml_core.gallery.embeddings.embed_shard`. Actors fed shard by shard,
rather than Ray Data's `map_batches`, because completion is recorded per shard (a re-run embeds only what is
missing), the shards are read by the project's own readers (sample-count checks, `on_error`, the S3 fork
guard), and no dataset-wide plan has to be rebuilt after a crash. A killed actor is restarted by Ray and its
shard retried (`max_restarts`, `max_task_retries`); a killed driver is a re-run. An `EmbedPool` passed in
keeps its actors (and their models) for the caller's next embedding work.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import ray

from dml_core import storage
from dml_core.config import Config
from dml_core.data.manifest import Manifest
from dml_core.gallery.embeddings import gallery_url, pending, shard_tasks, write_manifest
from dml_core.training.embed import model_url
from tasks import ray_runtime

QUEUED = 2  # shards sent ahead to each actor


@dataclass
class BackfillResult:
    url: str  # the gallery embeddings' folder
    manifest: dict  # its manifest.json
    embedded: int  # shards embedded by this call (the rest were done before)
    shards: int


def model_key(checkpoint: str | None) -> tuple[str, str] | None:
    """(checkpoint, file tag): an actor reloads a checkpoint rewritten in place."""
    return None if checkpoint is None else (checkpoint, storage.file_tag(model_url(checkpoint)))


@ray.remote
class EmbedActor:
    """Holds the models of the last checkpoints it was given; embeds whole shards into a gallery folder, or
    maps stored gallery shards through a transformation h."""

    def __init__(self, threads: int, use_gpu: bool) -> None:
        import torch

        ray_runtime.die_with_raylet()  # a killed driver leaves no actor writing shards
        torch.set_num_threads(threads)
        self.device = "cuda" if use_gpu else "cpu"
        self.models: dict = {}

    def _model(self, key: tuple[str, str] | None, load):
        if key is None:
            return None
        held = self.models.get(key[0])
        if held is None or held[0] != key:
            held = self.models[key[0]] = (key, load(key[0]).to(self.device))
        return held[1]

    def embed(self, task, key: tuple[str, str], out_dir: str, options: dict, side_key=None) -> dict:
        from dml_core.gallery.embeddings import embed_shard
        from dml_core.training.embed import load_checkpoint_model

        return embed_shard(self._model(key, load_checkpoint_model), task, out_dir, device=self.device,
                           side_model=self._model(side_key, load_checkpoint_model), **options)

    def transform(self, task, key: tuple[str, str], out_dir: str, options: dict) -> dict:
        from dml_core.gallery.transform import transform_shard
        from dml_core.models.transformation import load_transformation

        return transform_shard(self._model(key, load_transformation), task, out_dir, **options)

    def embed_items(self, task, key: tuple[str, str], ids, options: dict) -> dict:
        """The embeddings of the items `ids` of one dataset shard (a partial backfill's step), as arrays."""
        from dml_core.gallery.partial_backfill import embed_items
        from dml_core.training.embed import load_checkpoint_model

        return embed_items(self._model(key, load_checkpoint_model), task, ids, device=self.device, **options)


class EmbedPool:
    """`ray.num_workers` embedding actors, started on first use and kept until `close()` (or the end of a
    `with` block): a driver that embeds several times (the evaluation, then the backfill) starts them once.
    While they live they hold their CPUs (or GPUs), so close the pool before training in the same cluster."""

    def __init__(self, cfg: Config) -> None:
        self.cfg, self._actors = cfg, []

    @property
    def actors(self) -> list:
        if not self._actors:
            ray_runtime.init_ray(self.cfg)
            threads = max(1, int(self.cfg.ray.resources_per_worker.get("CPU", 1)))
            actor = EmbedActor.options(num_cpus=threads, num_gpus=1 if self.cfg.ray.use_gpu else 0,
                                       max_restarts=2, max_task_retries=2)
            self._actors = [actor.remote(threads, self.cfg.ray.use_gpu) for _ in range(self.cfg.ray.num_workers)]
        return self._actors

    def start(self) -> "EmbedPool":
        """Start the actors now and wait until they are up."""
        ray.get([a.__ray_ready__.remote() for a in self.actors])
        return self

    def close(self) -> None:
        for a in self._actors:
            ray.kill(a)
        self._actors = []

    def __enter__(self) -> "EmbedPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def side_info_checkpoint(cfg: Config) -> str | None:
    """`backfill.side_info` as a checkpoint directory: one given as such is used as is; a config file
    (`.yaml`) names a run, e.g. a small self-supervised model, trained through the trainer first unless its
    newest checkpoint has reached its `train.steps`."""
    side = cfg.backfill.side_info
    if side is None or not side.endswith((".yaml", ".yml")):
        return side
    from dml_core.config import load_config
    from dml_core.training.state import checkpoint_metrics
    from tasks.train import newest_checkpoint_url, run_training

    side_cfg = load_config(side)
    url = newest_checkpoint_url(side_cfg.run_dir)
    if url is None or checkpoint_metrics(url).get("step", 0) < side_cfg.train.steps:
        print(f"[backfill] training the side-info model {side_cfg.run.name} ({side})", flush=True)
        url = run_training(side_cfg).checkpoint
    return url


def run_backfill(cfg: Config, checkpoint: str, model_version: str, on_shard=None,
                 pool: EmbedPool | None = None) -> BackfillResult:
    """Embed the `backfill.split` of the config's dataset with `checkpoint` into
    `<run.root>/galleries/<gallery>/<model_version>/` with `ray.num_workers` actors (the `pool`'s, else new
    ones), resuming what a crashed run left, then write its manifest. `on_shard(n, record)` (driver side)
    sees each finished shard."""
    storage.configure(cfg.storage)
    bf = cfg.backfill
    manifest = Manifest.read(cfg.data_root, cfg.data.dataset, cfg.data.version)
    gallery = bf.gallery or manifest.name
    out = gallery_url(cfg.run.root, gallery, model_version)
    tasks = shard_tasks(manifest, bf.split)
    todo = pending(out, tasks)
    side = side_info_checkpoint(cfg)
    if todo:
        options = {"dtype": bf.dtype, "batch_size": bf.batch_size, "on_error": cfg.data.on_error,
                   "attempt": uuid.uuid4().hex}
        key, side_key = model_key(checkpoint), model_key(side)
        run_on_pool(cfg, pool, lambda a, t: a.embed.remote(t, key, out, options, side_key), todo, len(tasks),
                    on_shard)
    meta = {"gallery": gallery, "model_version": model_version, "checkpoint": checkpoint, "side_info": side,
            "dataset": {"name": manifest.name, "version": manifest.version, "split": bf.split}}
    return BackfillResult(out, write_manifest(out, tasks, meta), embedded=len(todo), shards=len(tasks))


def run_on_pool(cfg: Config, pool: EmbedPool | None, call, todo: list, total: int, on_shard=None,
                label: str = "backfill") -> None:
    """`call(actor, task)` for every task of `todo` on the `pool`'s actors (else a pool of its own, closed at
    the end); a failure closes the pool, whose actors may still hold queued tasks."""
    own, pool = pool is None, pool or EmbedPool(cfg)
    try:
        _feed(pool.actors[:len(todo)], call, todo, total, on_shard, label)
    except BaseException:
        pool.close()
        raise
    if own:
        pool.close()


def _feed(actors: list, call, todo: list, total: int, on_shard, label: str) -> None:
    """Feed the shards to the actors (`call(actor, task)`), QUEUED waiting at each so none idles between
    shards; progress on the console."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    waiting, running = list(reversed(todo)), {}

    def submit(actor) -> None:
        if waiting:
            running[call(actor, waiting.pop())] = actor

    for actor in actors * QUEUED:
        submit(actor)
    done_before, items, t0 = total - len(todo), 0, time.perf_counter()
    columns = (TextColumn(f"[{label}] shards"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]} items/s"), TimeRemainingColumn())
    with Progress(*columns, transient=False) as progress:
        bar = progress.add_task("embed", total=total, completed=done_before, rate="-")
        for n in range(1, len(todo) + 1):
            (ref,), _ = ray.wait(list(running), num_returns=1)
            record = ray.get(ref)
            submit(running.pop(ref))
            items += record["count"]
            progress.update(bar, advance=1, rate=f"{items / max(time.perf_counter() - t0, 1e-9):.0f}")
            if on_shard is not None:
                on_shard(n, record)
