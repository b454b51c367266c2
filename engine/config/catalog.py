"""Every op config by name, and parsing pipeline steps into configs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from engine.config.auto import AutoConfig
from engine.config.base import OpConfig, PipelineError
from engine.config.low_rank import LowRankConfig
from engine.config.prune import PruneConfig
from engine.config.quantize import QuantizeConfig
from engine.config.training import DistillConfig, FineTuneConfig
from engine.config.weight_share import WeightShareConfig

OPS: dict[str, type[OpConfig]] = {
    "quantize": QuantizeConfig,
    "prune": PruneConfig,
    "fine_tune": FineTuneConfig,
    "distill": DistillConfig,
    "weight_share": WeightShareConfig,
    "low_rank": LowRankConfig,
    "auto": AutoConfig,
}


def _op_name(data: Any) -> Any:
    return data.get("op") if isinstance(data, dict) else None


def parse_op(data: dict[str, Any]) -> OpConfig:
    """Parse one pipeline step; raises ValueError naming the valid ops for an unknown one."""
    op = _op_name(data)
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; valid ops: {', '.join(sorted(OPS))}")
    return OPS[op].model_validate(data)


def parse_pipeline(steps: list[dict[str, Any]]) -> list[OpConfig]:
    return [parse_op(step) for step in steps]


def parse_steps(steps: Sequence[Any]) -> list[OpConfig]:
    """Parse a request's steps; PipelineError `invalid_pipeline` names the step and field at fault
    (`pipeline[i].op` for an unknown op, with `valid_ops`; `pipeline[i].<field>` for a bad value).
    """
    configs = []
    for i, step in enumerate(steps):
        where = f"pipeline[{i}]"
        op = _op_name(step)
        if op not in OPS:
            raise PipelineError(
                "invalid_pipeline",
                f"{where}: unknown op {op!r}. Valid ops: {', '.join(sorted(OPS))} "
                "(GET /v1/methods lists each with its JSON schema).",
                f"{where}.op",
                valid_ops=sorted(OPS),
            )
        try:
            configs.append(OPS[op].model_validate(step))
        except ValidationError as exc:
            errors = exc.errors()
            loc = ".".join(str(p) for p in errors[0].get("loc", ()))
            raise PipelineError(
                "invalid_pipeline",
                f"{where} ({op}): "
                + "; ".join(
                    f"{'.'.join(str(p) for p in e.get('loc', ())) or 'config'}: {e['msg']}"
                    for e in errors
                ),
                f"{where}.{loc}" if loc else where,
            ) from exc
    return configs


def op_schemas() -> dict[str, dict[str, Any]]:
    """JSON schema of every op config, keyed by op name."""
    return {name: cls.model_json_schema() for name, cls in OPS.items()}
