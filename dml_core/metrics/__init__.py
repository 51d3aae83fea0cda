"""Evaluation: retrieval metrics, OPIS / eps-OPIS, cross-model compatibility and the update gate."""
from dml_core.metrics.compatibility import CompatibilityResult, CrossModelScores, NegativeFlips, evaluate_compatibility
from dml_core.metrics.evaluate import evaluate_embeddings
from dml_core.metrics.gate import GateCondition, GateDecision, UpdateGate, update_gate
from dml_core.metrics.knn import KnnResult, KnnSearcher, knn, knn_leave_one_out
from dml_core.metrics.opis import opis, utility
from dml_core.metrics.opis_result import OpisResult
from dml_core.metrics.report import EvaluationReport
from dml_core.metrics.retrieval import RetrievalResult, evaluate_retrieval, map_at_r, recall_at_k
from dml_core.metrics.utility_plot import save_utility_plot, utility_plot_png

__all__ = [
    "recall_at_k", "map_at_r", "opis", "utility", "evaluate_retrieval", "RetrievalResult",
    "knn", "knn_leave_one_out", "KnnSearcher", "KnnResult", "OpisResult",
    "utility_plot_png", "save_utility_plot",
    "evaluate_compatibility", "CompatibilityResult", "CrossModelScores", "NegativeFlips",
    "UpdateGate", "GateDecision", "GateCondition", "update_gate",
    "EvaluationReport", "evaluate_embeddings",
]
