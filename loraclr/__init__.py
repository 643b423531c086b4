"""LoRACLR in pure torch: activation statistics, the contrastive objective, solvers, baselines
and low-rank export. Nothing here imports ComfyUI, so scripts and other UIs can use it alone."""
from . import metrics
from .export import low_rank_factors
from .objective import Problem, distance_matrix, loraclr_objective
from .solvers import (METHODS, MergeConfig, MergeResult, average_merge, least_squares_merge, merge_layer,
                      smooth_minimiser, sum_merge)
from .stats import LayerStats, StatsAccumulator

__all__ = ["LayerStats", "StatsAccumulator", "MergeConfig", "MergeResult", "merge_layer", "loraclr_objective",
           "distance_matrix", "Problem", "sum_merge", "average_merge", "least_squares_merge", "low_rank_factors",
           "smooth_minimiser", "METHODS", "metrics"]
