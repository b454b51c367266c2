"""Where each step of a request runs, and the one check of a request before any compute is spent.

`validate_request` is called by the API when a job is created and by the worker before it
converts the model: the same rules, the same error codes and fields.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.config.auto import AutoConfig
from engine.config.base import Backend, OpConfig, PipelineError
from engine.config.prune import PruneConfig
from engine.config.quantize import QuantizeConfig

TASKS = ("classification", "embedding", "generic")
EXPORTS = ("onnx", "pt2", "torchscript")
DEFAULT_HOLDOUT = 0.3  # of the dataset, held out for measuring when a step trains


def resolve_holdout(
    holdout: float | None, configs: Sequence[OpConfig], *, has_dataset: bool
) -> float:
    """`evaluation.holdout` with its default filled in: 0.3 of the dataset when a step fits
    weights to it (`fits_data`: training, or a least-squares refit), else 0 (every sample is
    measured)."""
    if holdout is not None:
        return holdout
    return DEFAULT_HOLDOUT if has_dataset and any(c.fits_data() for c in configs) else 0.0


def validate_request(
    configs: Sequence[OpConfig],
    model_format: str,
    *,
    export: Sequence[str],
    task: str,
    has_dataset: bool,
    has_labels: bool = True,
) -> list[Backend]:
    """Where each step runs, or PipelineError for a request that cannot succeed.

    Checks the evaluation task, the order of the steps against the upload's format and the
    dataset (`plan_pipeline`), and the export formats. The worker passes `has_labels` True: it
    checks the labels once it has loaded the dataset.
    """
    if task not in TASKS:
        raise PipelineError(
            "invalid_evaluation_task",
            f"Unknown evaluation task {task!r}; use one of {', '.join(TASKS)}.",
            "evaluation.task",
        )
    plan = plan_pipeline(configs, model_format, has_dataset=has_dataset, has_labels=has_labels)
    unknown = [e for e in export if e not in EXPORTS]
    if unknown:
        raise PipelineError(
            "export_unsupported",
            f"Unknown export format(s) {', '.join(map(repr, unknown))}; use {', '.join(EXPORTS)}.",
            "export",
        )
    if "torchscript" in export:
        raise PipelineError(
            "export_unsupported",
            "TorchScript export is not available; request 'onnx' (or 'pt2' for pipelines that "
            "keep a torch model).",
            "export",
        )
    if "pt2" in export and not keeps_torch_model(configs, plan, model_format):
        reason = (
            "a step runs on ONNX (onnxruntime quantization writes QDQ/integer ONNX operators "
            "that have no torch.export equivalent)"
            if model_format == "pt2"
            else f"the model was uploaded as {model_format}, not as a .pt2"
        )
        raise PipelineError(
            "export_unsupported",
            f"A .pt2 export is not available for this job: {reason}. Request export "
            "['onnx']; the ONNX artifact runs in onnxruntime on CPU, GPU and mobile.",
            "export",
        )
    return plan


def plan_pipeline(
    configs: Sequence[OpConfig],
    model_format: str,
    *,
    has_dataset: bool = True,
    has_labels: bool = True,
) -> list[Backend]:
    """Where each step runs (torch or onnx), or PipelineError saying why the order cannot work.

    A torch model exists while the upload is a .pt2 and every earlier step ran on torch (and
    kept it). An op that can run on either backend runs on torch when a later op needs torch,
    so the torch model survives for it; otherwise on ONNX.
    """
    plan: list[Backend] = []
    torch_available = model_format == "pt2"
    lost_at: int | None = None
    for index, config in enumerate(configs):
        where = f"pipeline[{index}]"
        if isinstance(config, AutoConfig) and len(configs) > 1:
            raise PipelineError(
                "invalid_pipeline",
                f"{where} (auto) searches over every op itself and must be the only step: "
                'send {"preset": "auto", "budget": {...}} without other steps, or an '
                "explicit pipeline without auto.",
                where,
            )
        earlier = [i for i, c in enumerate(configs[:index]) if isinstance(c, QuantizeConfig)]
        if earlier:
            prev = configs[earlier[0]]
            assert isinstance(prev, QuantizeConfig)
            stacked = (
                "Stacking quantization on quantization is refused: "
                if isinstance(config, QuantizeConfig)
                else ""
            )
            raise PipelineError(
                "invalid_pipeline",
                f"{stacked}{where} ({config.op}) comes after pipeline[{earlier[0]}] (quantize "
                f"{prev.dtype}), whose output has quantized weights that no op can take as "
                "input. Make quantize the last step (e.g. prune → distill → quantize), and "
                "quantize once.",
                where,
            )
        if not has_dataset and (why := config.needs_dataset()):
            raise PipelineError(
                "invalid_pipeline",
                f"{where} ({config.op}) needs a dataset: {why}. Attach dataset_id.",
                where,
            )
        if has_dataset and not has_labels and (why := config.needs_labels()):
            raise PipelineError(
                "invalid_pipeline",
                f"{where} ({config.op}) needs a dataset with a `labels` array: {why}.",
                where,
            )
        options = config.backends()
        later_needs_torch = any(c.backends() == ("torch",) for c in configs[index + 1 :])
        if options == ("torch",):
            if not torch_available:
                if model_format != "pt2":
                    code = "unsupported_op"
                    detail = (
                        f"{where} ({config.op}) needs the torch model, and the upload is "
                        f"{model_format}: upload a torch.export .pt2 "
                        "(torch.export.save(torch.export.export(model, args), 'model.pt2'))."
                    )
                    if isinstance(config, PruneConfig):
                        detail += (
                            " On ONNX, prune supports criterion magnitude/random with "
                            "granularity 'unstructured' or 'n:m' and a one_shot schedule."
                        )
                else:
                    code = "invalid_pipeline"
                    prev = configs[lost_at or 0]
                    detail = (
                        f"{where} ({config.op}) needs the torch model, but pipeline[{lost_at}] "
                        f"({prev.op}) produces ONNX only. Order the ops that train or change "
                        "layer shapes (prune channels/gradual, distill, fine_tune, low_rank, "
                        "qat) before ONNX-only ops such as quantize."
                    )
                sub = config.torch_field()
                raise PipelineError(code, detail, f"{where}.{sub}" if sub else where)
            backend: Backend = "torch"
        elif (
            "torch" in options and torch_available and (later_needs_torch or options[0] == "torch")
        ):
            backend = "torch"
        elif "onnx" in options:
            backend = "onnx"
        else:  # pragma: no cover - every op runs somewhere
            raise PipelineError("invalid_pipeline", f"{where} ({config.op}) has no backend", where)
        plan.append(backend)
        if torch_available and (backend == "onnx" or not config.keeps_torch()):
            torch_available, lost_at = False, index
    return plan


def trains_on_torch(configs: Sequence[OpConfig], plan: Sequence[Backend]) -> bool:
    """Whether a step trains a torch model (fine_tune, distill, prune with training, QAT):
    what a GPU speeds up, so where a job is sent and whether its worker looks for one."""
    return any(b == "torch" and c.trains() for c, b in zip(configs, plan, strict=True))


def wants_gpu(configs: Sequence[OpConfig], plan: Sequence[Backend], model_format: str) -> bool:
    """Whether a GPU worker should take the job: a step trains on torch, or an op builds
    candidates that do (the auto search on a .pt2)."""
    return trains_on_torch(configs, plan) or any(c.may_train_torch(model_format) for c in configs)


def keeps_torch_model(
    configs: Sequence[OpConfig], plan: Sequence[Backend], model_format: str
) -> bool:
    """Whether the pipeline ends with a torch model (so a .pt2 can be delivered)."""
    return model_format == "pt2" and all(
        b == "torch" and c.keeps_torch() for c, b in zip(configs, plan, strict=True)
    )
