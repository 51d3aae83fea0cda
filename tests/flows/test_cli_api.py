"""`dml api` end to end: a real `dml` process serves the registry on 127.0.0.1, answers /query as `dml query
--json` answers the same images (one code path), and stops on SIGINT, its port closed; a gallery not served is
a one-line error before Ray starts."""
import base64
import json
import os
import signal
import subprocess
import time

import httpx
import pytest
import yaml

from tests.conftest import free_port
from tests.dml_core.gallery._served_gallery import build_served_files
from tests.flows._cli_helpers import REPO, dml_command

pytestmark = pytest.mark.slow
TIMEOUT = 300


@pytest.fixture
def served(tmp_path):
    files = build_served_files(tmp_path)
    root = str(tmp_path / "served")
    files.query_model_update(files.registry(root))  # v2 queries v1's index
    config = tmp_path / "api.yaml"
    config.write_text(yaml.safe_dump({"run": {"name": "api", "root": root}, "data": {"dataset": files.gallery}}))
    return files, str(config)


def test_dml_api_answers_as_dml_query_and_stops_on_sigint(served, tmp_path):
    files, config = served
    env, port = {**os.environ, "PYTHONPATH": REPO, "COLUMNS": "200"}, free_port()
    expected = subprocess.run(dml_command() + ["query", config, *files.images, "--k", "3", "--json"], env=env,
                              capture_output=True, text=True, timeout=TIMEOUT)
    assert expected.returncode == 0, expected.stderr
    expected = json.loads(expected.stdout)
    log = open(tmp_path / "api.log", "w+")
    proc = subprocess.Popen(dml_command() + ["api", config, "--port", str(port), "--poll", "0.5", "--replicas", "1"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while "Ctrl-C stops" not in open(log.name).read():  # the line printed once the service answers
            assert proc.poll() is None and time.monotonic() < deadline, open(log.name).read()[-3000:]
            time.sleep(0.2)
        images = [base64.b64encode(open(p, "rb").read()).decode() for p in files.images]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            health = client.get("/health").json()
            answer = client.post("/query", json={"images": images, "k": 3}).json()
        assert {k: v for k, v in answer.items() if k != "results"} == health == \
            {k: v for k, v in expected.items() if k != "results"}
        assert health["query_model"] == "v2" and health["gallery_model"] == "v1"
        strip = [{k: v for k, v in r.items() if k != "image"} for r in expected["results"]]
        assert [{k: v for k, v in r.items() if k != "image"} for r in answer["results"]] == strip
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0, open(log.name).read()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert "[api] stopping" in open(log.name).read()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)


def test_dml_api_on_a_gallery_not_served_is_one_line(tmp_path):
    config = tmp_path / "api.yaml"
    config.write_text(yaml.safe_dump({"run": {"name": "api", "root": str(tmp_path / "root")},
                                      "data": {"dataset": "nothing"}}))
    (tmp_path / "root").mkdir()
    out = subprocess.run(dml_command() + ["api", config.as_posix()], env={**os.environ, "PYTHONPATH": REPO},
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    assert "gallery 'nothing' is not served" in out.stderr
