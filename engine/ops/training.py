"""`fine_tune` and `distill` on the pipeline's torch model (.pt2 in, .pt2 out).

Both keep the epoch with the best fidelity on the held-out samples (torchgraph.train's
best-epoch rule); when no epoch beats the step's input, the input is delivered unchanged with a
warning naming both figures.
"""

from __future__ import annotations

import fnmatch
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.config import DistillConfig, FineTuneConfig
from engine.context import StepContext
from engine.errors import EngineError
from engine.ops.registry import register
from engine.torchgraph.augment import SMALL_DATASET, Plan, token_mask
from engine.torchgraph.augment import plan as augment_plan
from engine.torchgraph.fidelity import (
    History,
    Holdout,
    fidelity_change,
    fidelity_figure,
    history_details,
    holdout_check,
    training_warning,
)
from engine.torchgraph.hidden import HiddenStates
from engine.torchgraph.lift import weight_layers
from engine.torchgraph.losses import Loss, describe_loss, loss_name
from engine.torchgraph.program import example_args, flatten, save_program
from engine.torchgraph.train import (
    Data,
    epoch_progress,
    evaluate,
    first_output,
    fit,
    frozen,
    job_data,
    load_lifted,
    lr_for,
    teacher_module,
)

if TYPE_CHECKING:
    import torch
    from torch import nn


def _deliver(
    gm: nn.Module,
    history: History,
    holdout: Holdout | None,
    model_path: Path,
    ctx: StepContext,
    *,
    op: str,
    what: str,
) -> Path:
    """The trained model as a .pt2, or the step's input unchanged when no epoch beat it."""
    if holdout is not None and history.best_epoch == 0:
        warning = training_warning(op, history, holdout, "the step's input")
        if warning:
            ctx.warnings.append(warning)
        shutil.copyfile(model_path, ctx.output)
        return ctx.output
    return save_program(
        gm,
        example_args(ctx),
        ctx.output,
        batch=ctx.batch,
        error_code="training_failed",
        what=what,
    )


@register(FineTuneConfig, on="torch")
def fine_tune(config: FineTuneConfig, model_path: Path, ctx: StepContext) -> Path:
    """Cross-entropy training on the labels; BatchNorm statistics are updated too."""
    gm, _ = load_lifted(model_path)
    data = job_data(ctx)
    holdout = holdout_check(ctx)
    before = evaluate(gm, data, task=ctx.task)
    lr = lr_for(config.lr, gm)
    history = fit(
        gm,
        data,
        Loss(use_labels=True, task=ctx.task),
        epochs=config.epochs,
        lr=lr,
        batch_size=config.batch_size,
        seed=ctx.seed,
        report=epoch_progress(ctx.report, "fine-tuning", config.epochs, 0.05, 0.9),
        holdout=holdout,
        schedule=config.lr_schedule,
        device=ctx.device,
        threads=ctx.train_threads,
    )
    ctx.details.update(
        {"before": before, "loss": "cross_entropy", "lr": lr, **history_details(history, holdout)}
    )
    return _deliver(gm, history, holdout, model_path, ctx, op="fine_tune", what="fine-tuned model")


def _fresh_width_student(
    teacher_path: Path, width: float, ctx: StepContext
) -> torch.fx.GraphModule:
    """The teacher's architecture with every hidden layer's channels scaled by `width`, with
    freshly initialised weights (Torch-Pruning keeps the graph consistent)."""
    import torch
    import torch_pruning as tp

    gm, outputs = load_lifted(teacher_path)
    example = example_args(ctx)
    if width < 1:
        layers = weight_layers(gm)
        pruner = tp.pruner.MagnitudePruner(
            gm,
            example_inputs=example if len(example) > 1 else example[0],
            importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=1 - width,
            ignored_layers=[layers[n] for n in outputs if n in layers],
        )
        pruner.step()
    torch.manual_seed(ctx.seed)
    for module in gm.modules():
        reset = getattr(module, "reset_parameters", None)
        if module is not gm and callable(reset):
            reset()
    return gm.eval()


def _student(config: DistillConfig, model_path: Path, ctx: StepContext) -> torch.fx.GraphModule:
    if config.student == "current":
        gm, _ = load_lifted(model_path)
        return gm
    if config.student == "width":
        if ctx.source_model is None:
            raise EngineError("unsupported_op", "The width student needs the original .pt2.")
        return _fresh_width_student(ctx.source_model, config.width, ctx)
    path = ctx.models.get(config.student_model_id or "")
    if path is None:
        raise EngineError(
            "student_not_found",
            f"The student model {config.student_model_id!r} was not given to the worker.",
            field=f"pipeline[{ctx.index}].student_model_id",
        )
    gm, _ = load_lifted(path)
    return gm


class _Features:
    """Feature distillation: MSE between a student layer's output, passed through a learned
    1×1 projection to the teacher layer's channel count, and the teacher layer's output."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        pairs: list[tuple[str, str]],
        example: tuple[Any, ...],
        weight: float,
        where: str,
    ) -> None:
        import torch
        from torch import nn

        self.weight = weight
        self.captured: dict[str, torch.Tensor] = {}
        self.pairs = pairs
        self.hooks: list[Any] = []
        names_s = dict(student.named_modules())
        names_t = dict(teacher.named_modules())
        for s_name, t_name in pairs:
            for name, table, side in ((s_name, names_s, "student"), (t_name, names_t, "teacher")):
                match = [n for n in table if n and fnmatch.fnmatch(n, name)]
                if len(match) != 1:
                    raise EngineError(
                        "invalid_pipeline",
                        f"feature_layers: {side} layer {name!r} matches {len(match)} layers; "
                        f"available: {', '.join(sorted(n for n in table if n))[:400]}.",
                        field=f"{where}.feature_layers",
                    )
        for s_name, t_name in pairs:
            self._hook(names_s[s_name], f"s:{s_name}")
            self._hook(names_t[t_name], f"t:{t_name}")
        with torch.no_grad():
            student(*example)
            teacher(*example)
        self.projections = nn.ModuleDict()
        for i, (s_name, t_name) in enumerate(pairs):
            s, t = self.captured[f"s:{s_name}"], self.captured[f"t:{t_name}"]
            if s.dim() != t.dim() or s.shape[2:] != t.shape[2:]:
                raise EngineError(
                    "invalid_pipeline",
                    f"feature_layers: {s_name} outputs {list(s.shape[1:])} and {t_name} "
                    f"{list(t.shape[1:])}; pair layers whose outputs differ only in channels.",
                    field=f"{where}.feature_layers",
                )
            proj: nn.Module = (
                nn.Conv2d(s.shape[1], t.shape[1], 1)
                if s.dim() == 4
                else nn.Linear(s.shape[-1], t.shape[-1])
            )
            self.projections[str(i)] = proj

    def _hook(self, module: nn.Module, key: str) -> None:
        def save(_m: Any, _args: Any, output: Any) -> None:
            self.captured[key] = first_output(output)

        self.hooks.append(module.register_forward_hook(save))

    def loss(self) -> torch.Tensor:
        import torch.nn.functional as F

        total = None
        for i, (s_name, t_name) in enumerate(self.pairs):
            s = self.projections[str(i)](self.captured[f"s:{s_name}"])
            value = F.mse_loss(s, self.captured[f"t:{t_name}"].detach())
            total = value if total is None else total + value
        assert total is not None
        return total * self.weight

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


def _augmentation(config: DistillConfig, data: Data, ctx: StepContext) -> Plan | None:
    """The augmentation plan for this distillation, or None (see DistillConfig.augment)."""
    if config.augment == "off" or (config.augment == "auto" and len(data) >= SMALL_DATASET):
        return None
    found = augment_plan(data.inputs, [spec.name for spec in ctx.inputs])
    if found is None and config.augment == "on":
        ctx.warnings.append(
            "augment is on, but the inputs are neither text (token ids with an attention mask) "
            "nor one image batch [N, C, H, W]: distilled on the dataset's samples as they are."
        )
    return found


@register(DistillConfig, on="torch")
def distill(config: DistillConfig, model_path: Path, ctx: StepContext) -> Path:
    """Train the student on the teacher's outputs with the task's loss (and the labels, if any)."""
    import torch

    teacher_gm = teacher_module(ctx)
    teacher = frozen(teacher_gm)
    student = _student(config, model_path, ctx)
    example = example_args(ctx)
    data: Data = job_data(ctx)
    mask = token_mask(data.inputs, [spec.name for spec in ctx.inputs])
    taps = HiddenStates(student, teacher_gm, config.hidden_weight, mask)
    with torch.no_grad():
        t_out, s_out = teacher(*example), student(*example)
    hidden = taps if config.hidden_weight > 0 and taps.shapes_match() else None
    if hidden is None:
        taps.close()
    t_shapes = [list(t.shape) for t in flatten(t_out)]
    s_shapes = [list(getattr(s, "shape", [])) for s in flatten(s_out)]
    if t_shapes != s_shapes:
        raise EngineError(
            "invalid_pipeline",
            f"The student's outputs are shaped {s_shapes}, the teacher's {t_shapes}; a student "
            "must produce the teacher's output shapes.",
            field=f"pipeline[{ctx.index}].student",
        )
    alpha = config.alpha if data.labels is not None else 1.0
    loss = Loss(
        teacher=teacher,
        use_labels=data.labels is not None,
        alpha=alpha,
        temperature=config.temperature,
        task=ctx.task,
        mse_weight=config.mse_weight,
    )
    name = loss_name(loss, flatten(s_out), data.labels is not None)
    features = None
    params: Any = None
    if config.feature_layers:
        features = _Features(
            student,
            teacher_gm,
            config.feature_layers,
            example,
            config.feature_weight,
            f"pipeline[{ctx.index}]",
        )
        params = list(student.parameters()) + list(features.projections.parameters())
    extra = [x.loss for x in (features, hidden) if x is not None]
    holdout = holdout_check(ctx)
    teacher_scores = evaluate(teacher, data, task=ctx.task)
    before = evaluate(student, data, teacher, task=ctx.task)
    lr = lr_for(config.lr, student)
    augment = _augmentation(config, data, ctx)
    ctx.report(0.03, f"distillation: {describe_loss(name, loss)}, lr {lr:g}")
    try:
        history = fit(
            student,
            data,
            loss,
            epochs=config.epochs,
            lr=lr,
            batch_size=config.batch_size,
            seed=ctx.seed,
            params=params,
            report=epoch_progress(ctx.report, "distillation", config.epochs, 0.05, 0.9),
            extra_loss=(lambda: torch.stack([f() for f in extra]).sum()) if extra else None,
            holdout=holdout,
            # a width student starts from fresh weights: its epoch 0 is no candidate
            start_counts=config.student != "width",
            schedule=config.schedule(),
            augment=augment,
            device=ctx.device,
            threads=ctx.train_threads,
        )
    finally:
        for x in (features, hidden):
            if x is not None:
                x.close()
    ctx.details.update(
        {
            "teacher": teacher_scores,
            "student_before": before,
            "loss": name,
            "lr": lr,
            "hidden_states": (
                {
                    "pairs": hidden.pairs,
                    "weight": config.hidden_weight,
                    "at": "LayerNorm outputs",
                    "tokens": "real (attention mask)" if mask is not None else "all",
                }
                if hidden is not None
                else None
            ),
            "alpha": alpha,
            "temperature": config.temperature,
            "augment": augment.describe() if augment is not None else None,
            **history_details(history, holdout),
        }
    )
    if data.labels is None and name == "kl":
        ctx.warnings.append(
            "The dataset has no labels: distilled on the teacher's soft targets only (alpha = 1)."
        )
    if config.student == "current":
        return _deliver(
            student, history, holdout, model_path, ctx, op="distill", what="distilled model"
        )
    if holdout is not None:
        _compare_with_input(config, history, holdout, model_path, ctx)
    return save_program(
        student,
        example,
        ctx.output,
        batch=ctx.batch,
        error_code="training_failed",
        what="distilled model",
    )


def _compare_with_input(
    config: DistillConfig, history: History, holdout: Holdout, model_path: Path, ctx: StepContext
) -> None:
    """A new student (width / model) replaces the step's input: say so when it scores lower."""
    gm, _ = load_lifted(model_path)
    before = holdout.score(gm)
    ctx.details["held_out"]["input"] = fidelity_figure(before)
    metric = holdout.metric
    if history.best is not None and history.best < before:
        change = fidelity_change(
            metric, before, history.best, until=f" after the best epoch, {history.best_epoch}"
        )
        ctx.warnings.append(
            f"The distilled {config.student} student scores below the step's input on "
            f"{holdout.where} ({change}); delivered the student."
        )
