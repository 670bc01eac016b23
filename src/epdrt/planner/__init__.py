# SPDX-License-Identifier: Apache-2.0
"""Planner: stage profiles, a discrete-event simulator of E/P/D deployments and a config search.

Entry points: ``load_profile`` (JSON or built-in), ``poisson_workload`` / ``load_trace``,
``simulate`` / ``predict`` for one config, ``goodput`` and ``search`` over configs.
"""

from epdrt.planner.config import MODES, DeployConfig, memory_plan
from epdrt.planner.metrics import SLO
from epdrt.planner.profile import (
    Bilinear,
    MemoryProfile,
    Overheads,
    PiecewiseLinear,
    StageProfile,
    TransferProfile,
    builtin_profiles,
    fit_bilinear,
    fit_piecewise_linear,
    load_profile,
)
from epdrt.planner.search import PlanResult, SearchSpace, goodput, search
from epdrt.planner.simulator import Prediction, SimResult, predict, simulate
from epdrt.planner.workload import (
    IntDist,
    Request,
    Workload,
    WorkloadSpec,
    load_trace,
    poisson_workload,
    save_trace,
)

__all__ = [
    "MODES",
    "SLO",
    "Bilinear",
    "DeployConfig",
    "IntDist",
    "MemoryProfile",
    "Overheads",
    "PiecewiseLinear",
    "PlanResult",
    "Prediction",
    "Request",
    "SearchSpace",
    "SimResult",
    "StageProfile",
    "TransferProfile",
    "Workload",
    "WorkloadSpec",
    "builtin_profiles",
    "fit_bilinear",
    "fit_piecewise_linear",
    "goodput",
    "load_profile",
    "load_trace",
    "memory_plan",
    "poisson_workload",
    "predict",
    "save_trace",
    "search",
    "simulate",
]
