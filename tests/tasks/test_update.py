"""The serving update, end to end on tiny data: v1 is backfilled and indexed; v2, whose gate decision is allowed,
only becomes the query model (no gallery embedding at all), and its queries against v1's index return brute
force's neighbours; an untrained model is gated for real on the evaluation split (below the raw-pixel floor,
worse than what is served) and rejected with the registry byte for byte as it was; v3 is backfilled, and a
driver killed during that backfill leaves the registry as it was.

The decisions other than the rejection are given, not measured: models this small, trained for seconds, are
below the raw-pixel floor on the evaluation split's unseen Fashion-MNIST classes; the gate itself is checked
against its formulas in tests/dml_core/metrics and its outcomes in tests/dml_core/gallery/test_update.py."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from dml_core import storage
from dml_core.config import config_from_dict
from dml_core.data.shard_stream import iter_shard
from dml_core.gallery.embeddings import GALLERIES, load_gallery
from dml_core.gallery.query import GalleryQuery
from dml_core.gallery.registry import ModelRef, Registry, RegistryError
from dml_core.models.checkpoint import save_model
from dml_core.training.build import build_model_from_config
from dml_core.training.embed import load_checkpoint_model
from dml_core.training.loop import Worker, fit
from tasks.update import run_update
from tests.tasks._gallery_helpers import shard_gallery_dataset

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _raw(root: str, manifest, name: str, **over) -> dict:
    raw = {"run": {"name": name, "root": root},
           "data": {"dataset": manifest.name, "version": manifest.version, "batch_size": 16, "p": 4, "k": 4},
           "model": {"embedding_dim": 16, "backbone_options": {"widths": [8, 16]}},
           "train": {"steps": 40, "lr": 3e-3, "checkpoint_every": 40, "log_every": 40},
           "ray": {"num_workers": 2}, "backfill": {"batch_size": 16},
           "gate": {"max_nfr": 1.0, "min_gain": -1.0}}  # only the strict criterion M(new,old) > M(old,old)
    for section, values in over.items():
        raw.setdefault(section, {}).update(values)
    return raw


def _random_checkpoint(raw: dict, seed: int) -> str:
    cfg = config_from_dict(raw)
    torch.manual_seed(seed)
    url = storage.join(cfg.run_dir, "checkpoints", "checkpoint_00000000")
    save_model(build_model_from_config(cfg), storage.join(url, "model.pt"))
    return url


def _given(outcome: str):
    """A gate decision with `outcome` ("first" or "backfill"), given rather than measured."""
    from dml_core.metrics.gate import ACTIONS, GateDecision

    return GateDecision(outcome, ACTIONS[outcome], "recall_at_1", 1.0, -1.0)


def _allowed():
    """A real gate decision on embeddings that share one space: class centres, noisier in the old model."""
    from dml_core.metrics.compatibility import evaluate_compatibility
    from dml_core.metrics.gate import UpdateGate

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(60) // 12
    centres = torch.eye(16)[labels]
    old, new = (centres + noise * torch.randn(60, 16, generator=g) for noise in (0.6, 0.2))
    decision = UpdateGate(max_nfr=1.0, min_gain=-1.0).decide(evaluate_compatibility(old, new, labels))
    assert decision.allowed, decision.reasons()
    return decision


def _kill_during_backfill(raw: dict, checkpoint: str, version: str) -> subprocess.CompletedProcess:
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {REPO!r})
        from dml_core.config import config_from_dict
        from dml_core.metrics.gate import ACTIONS, GateDecision
        from tasks.update import run_update

        def on_shard(n, record):
            if n == 3:
                os.kill(os.getpid(), signal.SIGKILL)

        backfill = GateDecision("backfill", ACTIONS["backfill"], "recall_at_1", 1.0, -1.0)
        run_update(config_from_dict({raw!r}), {checkpoint!r}, {version!r}, on_shard=on_shard,
                   decide=lambda current: backfill)
    """)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=600)


def test_compatible_update_needs_no_backfill_and_an_incompatible_one_switches(tmp_path):
    root = str(tmp_path)
    manifest = shard_gallery_dataset(root)
    gallery, registry = manifest.name, Registry(root)
    raw1 = _raw(root, manifest, "v1")
    v1 = ModelRef("v1", _random_checkpoint(raw1, seed=0))

    first = run_update(config_from_dict(raw1), v1.checkpoint, decide=lambda current: _given("first"))
    assert first.action == "first" and registry.gallery(gallery).gallery_model == v1

    cfg2 = config_from_dict(_raw(root, manifest, "v2"))
    final = fit(cfg2, manifest, Worker())
    v2 = ModelRef("v2", storage.join(cfg2.run_dir, "checkpoints", f"checkpoint_{final['step']:08d}"))
    wide = ModelRef("wide", _random_checkpoint(_raw(root, manifest, "wide", model={"embedding_dim": 24}), seed=0))
    with pytest.raises(RegistryError, match=r"embeds into 24 dimensions.*holds 16"):
        run_update(cfg2, wide.checkpoint, "wide", decide=lambda current: _allowed())
    asked = []
    second = run_update(cfg2, v2.checkpoint, decide=lambda current: asked.append(current.gallery_model) or _allowed())
    assert second.action == "query_model", second.decision.reasons()
    assert asked == [v1] and second.old_model == v1 and registry.gallery(gallery).query_model == v2
    assert not storage.exists(storage.join(root, GALLERIES, gallery, "v2"))  # no embedding of the gallery

    images = [s["png"] for s in iter_shard(manifest.shard_urls("eval")[0])][:6]
    served = GalleryQuery(registry, gallery).search(images, k=5)
    old_gallery = load_gallery(registry.gallery(gallery).embeddings.rsplit("/", 1)[0])
    q_model = load_checkpoint_model(v2.checkpoint)
    from dml_core.data.decode import decode_image

    with torch.no_grad():
        zq = q_model(torch.stack([decode_image(b, 28, 1) for b in images]))
    sims = torch.nn.functional.normalize(zq, dim=1) @ torch.nn.functional.normalize(old_gallery.z, dim=1).T
    brute = old_gallery.ids[sims.topk(5, dim=1).indices]
    assert torch.equal(served.ids, brute)
    assert torch.equal(served.labels, old_gallery.labels[sims.topk(5, dim=1).indices])

    raw4 = _raw(root, manifest, "untrained")
    before = storage.read_bytes(registry.url)
    rejected = run_update(config_from_dict(raw4), _random_checkpoint(raw4, seed=2))  # the real gate
    assert rejected.action == "rejected" and rejected.decision.below_floor, rejected.decision.reasons()
    assert rejected.decision.served is not None  # compared with what v2 serves against v1's gallery
    assert storage.read_bytes(registry.url) == before
    assert not storage.exists(storage.join(root, GALLERIES, gallery, "untrained"))

    raw3 = _raw(root, manifest, "v3")
    v3 = ModelRef("v3", _random_checkpoint(raw3, seed=1))
    killed = _kill_during_backfill(raw3, v3.checkpoint, "v3")
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    assert storage.read_bytes(registry.url) == before  # never an incomplete index
    third = run_update(config_from_dict(raw3), v3.checkpoint, decide=lambda current: _given("backfill"))
    assert third.action == "switch" and third.old_model == v1  # compared with the gallery model, not v2
    assert registry.gallery(gallery).gallery_model == registry.gallery(gallery).query_model == v3
    assert [h["event"] for h in registry.history(gallery)] == ["switch", "query_model", "switch"]
