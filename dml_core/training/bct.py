"""BCT's old-model class prototypes for a run (METHODS.md 3): the OLD model embeds the training split,
each rank its share, and each class gets the L2-normalised mean of its old embeddings. The maths is
`dml_core.losses.bct`'s; this module only feeds it a split and adds the per-rank sums up."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from dml_core.losses.bct import prototype_sums, prototypes_from_sums
from dml_core.training.embed import Embeddings, embed_split

if TYPE_CHECKING:
    from dml_core.config import Config
    from dml_core.data.manifest import Manifest


def old_train_embeddings(cfg: "Config", manifest: "Manifest", rank: int = 0, world_size: int = 1,
                         device: torch.device | str = "cpu") -> Embeddings:
    """This rank's share of the training split embedded by `loss.bct.old_checkpoint` (float32, CPU)."""
    return embed_split(cfg.loss.bct.old_checkpoint, manifest, "train", rank=rank, world_size=world_size,
                       batch_size=cfg.data.eval_batch_size, num_workers=cfg.data.loader_workers, device=device,
                       endpoint_url=cfg.storage.endpoint_url)


def bct_prototypes(cfg: "Config", manifest: "Manifest", rank: int = 0, world_size: int = 1,
                   device: torch.device | str = "cpu", old: Embeddings | None = None) -> torch.Tensor | None:
    """(training labels, D) prototypes of `loss.bct.old_checkpoint` over the training split, or None without
    BCT. Classes absent from the split get a zero row (they are never BCT targets). `old`: this rank's
    share of `old_train_embeddings`, when the caller has it already."""
    if cfg.loss.bct is None:
        return None
    old = old if old is not None else old_train_embeddings(cfg, manifest, rank, world_size, device)
    sums, counts = prototype_sums(old.z, old.labels, manifest.num_train_labels)
    if world_size > 1:
        both = torch.cat([sums, counts[:, None]], dim=1).to(device)
        dist.all_reduce(both)
        sums, counts = both[:, :-1].cpu(), both[:, -1].cpu()
    return prototypes_from_sums(sums, counts, allow_empty=True).float().to(device)
