"""Loader workers forked inside a flow run's process."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


def test_loader_workers_in_a_flow_run_embed_exactly_as_the_flow_process_alone(prefect_api, tmp_path, fmnist_shards):
    """A loader worker forked from a process that has run a Prefect flow failed at exit (it inherited Prefect's
    service at-exit hooks), so `data.loader_workers` broke the evaluation stage; workers now drop those hooks
    (`shard_stream.worker_init`) and embed what the process embeds alone."""
    from prefect import flow

    from dml_core.models.checkpoint import save_model
    from dml_core.models.registry import build_model
    from dml_core.training.embed import embed_with_config
    from tests.tasks._train_helpers import SMALL_CNN, small_config

    spec = dict(SMALL_CNN)
    torch.manual_seed(0)
    model = build_model(spec.pop("backbone"), **spec.pop("backbone_options"), **spec)
    checkpoint = str(tmp_path / "model.pt")
    save_model(model, checkpoint)

    @flow
    def embed_in_a_flow_run(loader_workers: int):
        cfg = small_config(str(tmp_path), fmnist_shards, "embed", steps=1, data={"loader_workers": loader_workers})
        return embed_with_config(cfg, checkpoint, fmnist_shards["manifest"])

    alone, workers = embed_in_a_flow_run(0), embed_in_a_flow_run(2)
    order_alone, order_workers = torch.argsort(alone.ids), torch.argsort(workers.ids)
    assert torch.equal(alone.ids[order_alone], workers.ids[order_workers]) and len(alone.ids) > 0
    torch.testing.assert_close(alone.z[order_alone], workers.z[order_workers], rtol=0, atol=1e-6)
    assert torch.equal(alone.labels[order_alone], workers.labels[order_workers])
