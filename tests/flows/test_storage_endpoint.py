"""The README's way to use S3: `run.root` on s3:// and `storage.endpoint_url` in the config, no AWS_ENDPOINT_URL
in the environment. Every command (but `dml serve`, which reads storage only when its schedule starts a run,
the retrain flow this test runs) reaches the configured server from its first storage access (before, the
dataset version was looked up at AWS, retried for 120 s whatever `storage.retry_seconds` said, and failed)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from tests.flows._cli_helpers import dml_command
from tests.flows._flow_helpers import write_config

pytestmark = pytest.mark.slow


def test_every_command_uses_the_configured_endpoint_without_aws_endpoint_url(s3_server, prefect_api, tmp_path):
    from prefect.settings import PREFECT_API_URL

    from dml_core import storage
    from dml_core.data.manifest import Manifest
    from dml_core.data.shard_stream import iter_shard
    from dml_core.gallery.registry import Registry

    root = s3_server.url(f"endpoint-{tmp_path.name}")
    config = write_config(str(tmp_path), run={"name": "v1", "root": root},
                          storage={"endpoint_url": s3_server.endpoint_url, "retry_seconds": 5})
    env = {k: v for k, v in os.environ.items() if k != storage.ENDPOINT_ENV}
    env["PREFECT_API_URL"] = PREFECT_API_URL.value()  # one Prefect server for all the commands

    def dml(*args: str) -> str:
        done = subprocess.run(dml_command() + list(args), cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, (args, done.stderr[-3000:])
        return done.stdout

    dml("run", config)
    assert Registry(root).gallery("glyphs-tiny").query_model.version == "v1"
    dml("shard", config)
    dml("train", config)
    dml("evaluate", config)
    dml("backfill", config)
    dml("transform", config, "--set", "backfill.transformation={steps: 20, batch_size: 64}")
    entry = Registry(root).gallery("glyphs-tiny")
    assert entry.transformation is not None and [h["reason"] for h in Registry(root).history()][-1]
    assert "glyphs-tiny" in dml("status", config)

    manifest = Manifest.read(root, "glyphs-tiny")
    image = tmp_path / "query.png"
    image.write_bytes(next(iter(iter_shard(manifest.shard_urls("eval")[0])))["png"])
    answer = json.loads(dml("query", config, str(image), "--json", "-k", "3"))
    assert answer["query_model"] == "v1" and len(answer["results"][0]["ids"]) == 3
    assert _api_health(config, env, tmp_path) == {k: v for k, v in answer.items() if k != "results"}
    assert "trials" in dml("sweep", config, "--grid", "train.steps=20", "--name", "endpoint")


def _api_health(config: str, env: dict, tmp_path) -> dict:
    """`dml api`'s GET /health once it answers; then SIGINT stops it."""
    import httpx

    from tests.conftest import free_port

    port, log = free_port(), tmp_path / "api.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(dml_command() + ["api", config, "--port", str(port), "--replicas", "1"], cwd=tmp_path,
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while "Ctrl-C stops" not in log.read_text():  # printed once the service answers
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=60).json()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
        return health
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
