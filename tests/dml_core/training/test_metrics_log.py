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


def test_each_record_carries_its_attempt_and_superseded_steps_are_dropped(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    # attempt 1 runs to step 7 (checkpoint at 4); attempt 2 resumes at 4 and dies at 5; attempt 3 resumes at 4
    for event, start, steps in (("started", 0, range(1, 8)), ("resumed", 4, [5]), ("resumed", 4, range(5, 9))):
        log = MetricsLog(path)
        log.log({"event": event, "step": start})
        for s in steps:
            log.log({"step": s, "loss": 1.0})
        log.close()
    everything = read_metrics(path, all_attempts=True)
    assert len(everything) == 3 + 7 + 1 + 4
    clean = read_metrics(path)
    assert [(r["step"], r["attempt"]) for r in clean if "loss" in r] == [(1, 1), (2, 1), (3, 1), (4, 1), (5, 3),
                                                                          (6, 3), (7, 3), (8, 3)]
    assert [(r["event"], r["attempt"]) for r in clean if "event" in r] == [("started", 1), ("resumed", 2),
                                                                            ("resumed", 3)]


def test_records_of_an_older_file_without_attempts_are_superseded_too(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [{"event": "started", "step": 0}, {"step": 1}, {"step": 2}]))
    log = MetricsLog(str(path))
    log.log({"event": "resumed", "step": 1})
    log.log({"step": 2})
    log.close()
    assert [(r["step"], r.get("attempt")) for r in read_metrics(str(path)) if "event" not in r] == [(1, None), (2, 1)]
