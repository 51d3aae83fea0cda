"""Contrastive and proxy-based losses (METHODS.md sections 1-3.1): composable with `+` and `*`, exact under
DDP through `DistributedLoss`; a loss called on its own never communicates."""
from dml_core.losses.arcface import ArcFace, CosFace
from dml_core.losses.base import CombinedLoss, EmbeddingLoss
from dml_core.losses.batch import EmbeddingBatch
from dml_core.losses.bct import BCT, class_prototypes, prototype_sums, prototypes_from_sums
from dml_core.losses.clip import ClipLoss, clip_loss
from dml_core.losses.decomposable import DecomposableLoss, decomposable_loss
from dml_core.losses.distributed import DistributedLoss
from dml_core.losses.info_nce import InfoNCE, info_nce_loss
from dml_core.losses.pc import OldEmbeddingTable, OldModelEmbeddings, PositiveCongruent
from dml_core.losses.proxies import ProxyLoss
from dml_core.losses.proxy_anchor import ProxyAnchor
from dml_core.losses.tcm import TCM, tcm_loss
from dml_core.losses.tiled import tiled_info_nce_rows, tiled_info_nce_sum

__all__ = [
    "EmbeddingBatch", "EmbeddingLoss", "CombinedLoss", "DistributedLoss",
    "InfoNCE", "info_nce_loss", "tiled_info_nce_rows", "tiled_info_nce_sum", "ClipLoss", "clip_loss",
    "DecomposableLoss", "decomposable_loss", "TCM", "tcm_loss",
    "ProxyLoss", "ArcFace", "CosFace", "ProxyAnchor",
    "BCT", "class_prototypes", "prototype_sums", "prototypes_from_sums",
    "PositiveCongruent", "OldEmbeddingTable", "OldModelEmbeddings",
]
