"""Versioned, serializable op configs; torch-free, so the API validates with the same classes.

base: OpConfig, Backend, PipelineError · one module per op's config · catalog: OPS and parsing
steps · presets: named pipelines · plan: where each step runs and `validate_request`, the one
check of a request that the API and the worker share.
"""

from engine.config.auto import BUDGET_KEYS, OBJECTIVES, AutoConfig, Budget, SearchLimits, auto_step
from engine.config.base import Backend, OpConfig, PipelineError
from engine.config.catalog import OPS, op_schemas, parse_op, parse_pipeline, parse_steps
from engine.config.low_rank import LowRankConfig
from engine.config.plan import (
    DEFAULT_HOLDOUT,
    EXPORTS,
    TASKS,
    keeps_torch_model,
    plan_pipeline,
    resolve_holdout,
    trains_on_torch,
    validate_request,
    wants_gpu,
)
from engine.config.presets import PRESETS, preset_pipeline
from engine.config.prune import PruneConfig, Schedule
from engine.config.quantize import (
    DEFAULT_MODE,
    QUANT_MODES,
    Calibration,
    QuantDtype,
    QuantizeConfig,
    QuantizeTarget,
    QuantMode,
)
from engine.config.training import DistillConfig, FineTuneConfig
from engine.config.weight_share import WeightShareConfig

__all__ = [
    "BUDGET_KEYS",
    "OBJECTIVES",
    "AutoConfig",
    "Budget",
    "SearchLimits",
    "auto_step",
    "DEFAULT_HOLDOUT",
    "DEFAULT_MODE",
    "EXPORTS",
    "OPS",
    "PRESETS",
    "QUANT_MODES",
    "TASKS",
    "Backend",
    "Calibration",
    "DistillConfig",
    "FineTuneConfig",
    "LowRankConfig",
    "OpConfig",
    "PipelineError",
    "PruneConfig",
    "QuantDtype",
    "QuantMode",
    "QuantizeConfig",
    "QuantizeTarget",
    "Schedule",
    "WeightShareConfig",
    "keeps_torch_model",
    "op_schemas",
    "parse_op",
    "parse_pipeline",
    "parse_steps",
    "plan_pipeline",
    "preset_pipeline",
    "resolve_holdout",
    "trains_on_torch",
    "wants_gpu",
    "validate_request",
]
