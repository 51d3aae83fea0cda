"""Compare-and-swap on one object, on local disk and on a real SeaweedFS server: the primitive under the
run lease. The races are real: separate processes write at once, and exactly one may win."""
from __future__ import annotations

import multiprocessing as mp

import pytest

from dml_core import conditional


def _cas_contract(url: str) -> None:
    assert conditional.read(url) is None
    first = conditional.create(url, b"a")
    assert first is not None and conditional.create(url, b"b") is None  # exclusive create
    assert conditional.read(url) == (b"a", first)
    assert conditional.replace(url, b"c", "stale-token") is None and conditional.read(url).data == b"a"
    second = conditional.replace(url, b"c", first)
    assert second is not None and second != first and conditional.read(url) == (b"c", second)
    assert conditional.replace(url, b"d", first) is None  # the token read before is spent
    assert not conditional.delete(url, first) and conditional.read(url).data == b"c"
    assert conditional.delete(url, second) and conditional.read(url) is None


def test_compare_and_swap_on_local_disk(tmp_path):
    _cas_contract(str(tmp_path / "run" / "lease.json"))


@pytest.mark.slow
def test_compare_and_swap_on_s3(s3_server):
    _cas_contract(s3_server.url("cas/contract/lease.json"))


def _create_at(url: str, value: bytes, start, out) -> None:
    start.wait()
    out.put((value, conditional.create(url, value) is not None))


def _race(url: str, n: int = 6) -> list[bytes]:
    """`n` processes create `url` at once; the values whose create succeeded."""
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_create_at, args=(url, str(i).encode(), start, out)) for i in range(n)]
    for p in procs:
        p.start()
    start.set()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    return [value for value, won in results if won]


def test_one_of_racing_processes_creates_on_local_disk(tmp_path):
    for i in range(3):
        url = str(tmp_path / f"race{i}.json")
        winners = _race(url)
        assert len(winners) == 1 and conditional.read(url).data == winners[0]


@pytest.mark.slow
def test_one_of_racing_processes_creates_on_s3(s3_server):
    """Also shows that the server in use honours If-None-Match (one that ignored it lets every PUT win)."""
    for i in range(3):
        url = s3_server.url(f"cas/race{i}.json")
        winners = _race(url)
        assert len(winners) == 1 and conditional.read(url).data == winners[0]
