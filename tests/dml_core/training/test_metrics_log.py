"""metrics.jsonl: whole lines from concurrent appenders, NaN kept visible, reopening appends."""
import json
import multiprocessing as mp

from dml_core.training.metrics_log import MetricsLog, read_metrics


def _writer(path, who, n):
    log = MetricsLog(path)
    for i in range(n):
        log.log({"who": who, "i": i, "pad": "x" * 500})
    log.close()


def test_concurrent_appends_give_whole_lines(tmp_path):
    path = str(tmp_path / "m" / "metrics.jsonl")
    procs = [mp.get_context("spawn").Process(target=_writer, args=(path, w, 200)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    recs = read_metrics(path)
    assert len(recs) == 600
    for w in range(3):
        assert [r["i"] for r in recs if r["who"] == w] == list(range(200))


def test_reopen_appends_and_nan_is_a_string(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    log = MetricsLog(path)
    log.log({"step": 1, "loss": float("nan")})
    log.close()
    log = MetricsLog(path)
    log.log({"step": 2, "loss": 0.5})
    log.close()
    lines = open(path).read().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    assert json.loads(lines[0])["loss"] == "nan"
