"""Pre-flight estimate of a job's torch training: time one real batch, multiply, refuse early.

Before the original is measured, the job's model is lifted and one real batch of the job's data
is run forward and backward with an Adam step (single-threaded, as `train.fit` trains), and
forward only (what a teacher or an evaluation pass costs). Each training step's time is that
batch's time × batches per epoch × epochs (× rounds), plus its evaluation passes, scoring,
export and measurement; the job's is the time spent so far plus every step's, with a margin.
Memory: what the process holds already (its address space, which the sandbox limits) plus the
parameters × 4 bytes × the copies training keeps (weights, gradients, Adam's two moments, the
best epoch's snapshot, a teacher) plus the activations one batch saves for backward (measured).

A step after a channel prune trains the pruned model, not the one measured: its own batches
(forward, backward, evaluation) are scaled by the fraction of channels that prune keeps — an
upper bound on the fraction of the pruned layers' work left, since removing a fraction s of the
channels removes at least s of those layers' multiply-accumulates (a convolution loses input
and output channels: (1 − s)²). The teacher's forward stays the original's. Time has parts that
do not shrink (embeddings, LayerNorms, the optimizer's per-tensor cost): all-MiniLM-L6-v2 with
30 % of its heads and FFN channels removed (0.684× MACs) took 0.70–0.75× the original's time
per training batch of 16 and 0.64–0.71× per forward pass, which the 25 % margin covers.

A job whose estimate exceeds the limits it is given fails here, within seconds, instead of
being stopped by the limit an hour later. The estimate of each training step is reported in
its details (`details.estimate`) either way.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.config import DistillConfig, FineTuneConfig, OpConfig, PruneConfig, QuantizeConfig
from engine.config.prune import MEASURED_PROBE_SAMPLES, measured_probe_counts
from engine.errors import EngineError
from engine.io.datasets import Samples
from engine.io.formats import TensorSpec
from engine.torchgraph.fidelity import HOLDOUT_LIMIT
from engine.torchgraph.program import flatten
from engine.torchgraph.train import EVAL_LIMIT, load_lifted

if TYPE_CHECKING:
    import torch

MARGIN = 1.25  # on every measured figure: batches vary, the process is not alone
# A model's latency measurement (engine.onnxgraph.metrics: warm-up, then up to 3 s of runs).
LATENCY_S = 5.0
# A fake-quantized forward+backward+Adam batch (QAT: int8 weights per channel and activations,
# straight-through estimator) against a float one: measured 1.06x on the digits CNN, 1.33x on
# the tests' token transformer, 1.13x on all-MiniLM-L6-v2 (batch 16, sequence 32).
QAT_FACTOR = 1.5
# QAT also builds and scores the post-training int8 model it must beat, and its own after
# training (engine.ops.quantize.qat): about this many ONNX exports, each scored held out.
QAT_BUILDS = 6
# Copies of the parameters a training step holds: weights, gradients, Adam's two moments, the
# best epoch's snapshot; a teacher adds one more, QAT's fake-quantized weights another.
TRAINING_COPIES = 5
BYTES_PER_PARAMETER = 4  # float32
MB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """What the job may use; None: not limited (the engine used as a library)."""

    time_s: float | None = None
    memory_mb: float | None = None


@dataclass(frozen=True)
class Timing:
    """One model measured on one real batch of the job's data."""

    params: int
    batch: int
    load_s: float  # lifting the .pt2 to a trainable module (each training step does)
    train_s: float  # forward + backward + Adam step
    forward_s: float  # forward without gradients
    saved_bytes: int  # activations saved for backward

    def forward_per_sample(self) -> float:
        return self.forward_s / self.batch


@dataclass(frozen=True)
class Work:
    """What one pipeline step trains: epochs over the data, with what per batch."""

    index: int
    op: str
    epochs: int  # all epochs of the step (rounds × epochs per round + fine-tuning)
    batch_size: int
    teacher: bool  # a teacher forward per batch (distillation)
    scored: int = 0  # samples scored with forward+backward (prune's gradient criterion) ...
    score_forward: int = 0  # ... or forward only (entropy), over all rounds
    student: str | None = None  # another uploaded model trained instead (distill student)
    fake_quant: bool = False  # QAT
    kept: float = 1.0  # the student's share of the measured model's work (after a prune)


def refit_passes(
    config: PruneConfig, blocks: Sequence[tuple[str, int]], samples: int, dataset: bool
) -> int:
    """Samples run forward (one sample = one count) by a channel prune of a transformer whose
    attention and FFN blocks are `blocks` ((kind, units) each), per the whole step: per round,
    the activation scores' pass, `scope: measured`'s probes (measured_probe_counts on
    MEASURED_PROBE_SAMPLES samples) and `reconstruct`'s two passes (pruned and original) per
    block — counted whole, though each stops at its block's LayerNorm."""
    if not blocks or config.granularity != "channels":
        return 0
    resolved = config.resolved(transformer=True, dataset=dataset)
    rounds, _ = resolved.rounds()
    n = min(resolved.samples, samples)
    per_round = n if resolved.criterion == "activation" or resolved.scope == "measured" else 0
    if resolved.scope == "measured" and dataset:
        round_to = resolved.kept_multiple()
        probes = sum(len(measured_probe_counts(k, u, round_to)) - 1 for k, u in blocks)
        per_round += probes * MEASURED_PROBE_SAMPLES
    if resolved.reconstructs(dataset):
        per_round += 2 * len(blocks) * n
    return rounds * per_round


def step_work(
    index: int,
    config: OpConfig,
    has_labels: bool,
    samples: int,
    blocks: Sequence[tuple[str, int]] = (),
    dataset: bool = True,
) -> Work | None:
    """What a step trains (None: it trains nothing and scores nothing on torch). `blocks`: the
    model's attention and FFN blocks as (kind, units) (none: not a transformer), for a channel
    prune's refits."""
    if isinstance(config, FineTuneConfig):
        return Work(index, config.op, config.epochs, config.batch_size, teacher=False)
    if isinstance(config, DistillConfig):
        student = config.student_model_id if config.student == "model" else None
        return Work(index, config.op, config.epochs, config.batch_size, True, student=student)
    if isinstance(config, QuantizeConfig) and config.mode == "qat":
        return Work(index, config.op, config.epochs, config.batch_size, True, fake_quant=True)
    if isinstance(config, PruneConfig) and "onnx" not in config.backends():
        rounds, per_round = config.rounds()
        epochs = per_round * rounds + config.fine_tune_epochs
        scored = rounds * min(config.samples, samples)
        refits = refit_passes(config, blocks, samples, dataset)
        if not epochs and not refits and config.criterion not in ("gradient", "entropy"):
            return None  # a one-shot magnitude/random prune: no batch worth timing
        return Work(
            index,
            config.op,
            epochs,
            config.batch_size,
            teacher=not has_labels or refits > 0,  # distillation, or reconstruct's reference
            scored=scored if config.criterion == "gradient" else 0,
            score_forward=(scored if config.criterion == "entropy" else 0) + refits,
        )
    return None


def kept_after(configs: Sequence[OpConfig], index: int) -> float:
    """The fraction of channels the channel prunes before step `index` keep, multiplied: the
    share of the original's work a later step's model has at most (module docstring)."""
    kept = 1.0
    for config in configs[:index]:
        if isinstance(config, PruneConfig) and config.granularity == "channels":
            heads = config.head_sparsity if config.head_sparsity is not None else config.sparsity
            kept *= 1.0 - min(config.sparsity, heads)
    return kept


def batches_per_epoch(samples: int, batch_size: int, fixed: int | None) -> int:
    """How many batches `train.Data.batches` gives an epoch."""
    if fixed:
        return samples // fixed
    return math.ceil(samples / batch_size)


@dataclass(frozen=True)
class Job:
    """What every step's estimate shares."""

    train_samples: int
    eval_samples: int
    classification: bool
    fixed_batch: int | None
    convert_s: float  # exporting a .pt2 to ONNX (measured on the upload)
    baseline_mb: float  # the process's address space before training


def step_estimate(work: Work, job: Job, timing: Timing, teacher: Timing) -> dict[str, Any]:
    """Seconds and MiB one step needs, and the figures they come from."""
    per_batch = timing.train_s * work.kept * (QAT_FACTOR if work.fake_quant else 1.0)
    if work.teacher:
        per_batch += teacher.forward_s
    batches = batches_per_epoch(job.train_samples, work.batch_size, job.fixed_batch)
    forward = timing.forward_per_sample() * work.kept
    teacher_forward = teacher.forward_per_sample() if work.teacher else 0.0
    held_out = min(job.eval_samples, HOLDOUT_LIMIT) * forward
    per_epoch = batches * per_batch + held_out
    if job.classification:  # train.evaluate: accuracy/agreement on the training samples
        per_epoch += min(job.train_samples, EVAL_LIMIT) * (forward + teacher_forward)
    scoring = work.scored * (timing.train_s / timing.batch + teacher_forward)
    scoring += work.score_forward * forward
    measuring = job.eval_samples * forward + LATENCY_S
    loading = timing.load_s + (teacher.load_s if work.teacher else 0.0)
    seconds = work.epochs * per_epoch + held_out + scoring + 2 * job.convert_s + measuring
    seconds += loading
    if work.fake_quant:
        seconds += QAT_BUILDS * (job.convert_s + held_out)
    copies = TRAINING_COPIES + (1 if work.fake_quant else 0)
    parameters = timing.params * copies + (teacher.params if work.teacher else 0)
    parameters_mb = parameters * BYTES_PER_PARAMETER / MB
    size = job.fixed_batch or min(work.batch_size, job.train_samples)
    activations_mb = timing.saved_bytes * size / timing.batch / MB
    return {
        "seconds": round(seconds * MARGIN, 1),
        "per_batch_s": round(per_batch, 4),
        "batch_size": size,
        "batches": batches,
        "epochs": work.epochs,
        "samples": job.train_samples,
        "work_kept": round(work.kept, 4),
        "parameters": timing.params,
        "memory_mb": round(job.baseline_mb + (parameters_mb + activations_mb) * MARGIN),
        "parameters_mb": round(parameters_mb, 1),
        "parameter_copies": copies,
        "activations_mb": round(activations_mb, 1),
        "process_mb": round(job.baseline_mb, 1),
    }


def address_space_mb() -> float:
    """This process's address space (what RLIMIT_AS limits), 0 where /proc cannot tell."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return 0.0
    for line in status.splitlines():
        if line.startswith("VmSize:"):
            return float(line.split()[1]) / 1024
    return 0.0


def _first_batch(samples: Samples, inputs: list[TensorSpec], size: int) -> list[torch.Tensor]:
    import torch

    rows = []
    for spec in inputs:
        data = samples.inputs[spec.name]
        if len(data) < size:
            data = np.concatenate([data] * (size // len(data) + 1))
        rows.append(torch.from_numpy(np.ascontiguousarray(data[:size])))
    return rows


def _timed(run: Callable[[], None], cap_s: float = 2.0) -> float:
    """Seconds one call takes: the second of two calls (the first warms up) unless the first
    alone took more than cap_s (then it stands, slightly high)."""
    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    if first > cap_s:
        return first
    start = time.perf_counter()
    run()
    return min(first, time.perf_counter() - start)


def measure(model_path: Path, xs: list[torch.Tensor], threads: int = 1) -> Timing:
    """Time forward+backward+Adam and forward alone on one batch, on `threads` CPU threads as
    train.fit trains; count the saved activations."""
    import torch

    start = time.perf_counter()
    gm, _ = load_lifted(model_path)
    load_s = time.perf_counter() - start
    params = [p for p in gm.parameters() if p.requires_grad]
    own = {p.untyped_storage().data_ptr() for p in gm.parameters()}
    opt = torch.optim.Adam(params, lr=1e-6)
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    def train_batch() -> None:
        saved.clear()
        gm.train()
        opt.zero_grad()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            outs = [o for o in flatten(gm(*xs)) if torch.is_tensor(o) and o.is_floating_point()]
        loss = sum((o.float().pow(2).mean() for o in outs), torch.zeros(()))
        if loss.requires_grad:
            loss.backward()
            opt.step()

    def forward() -> None:
        gm.eval()
        with torch.no_grad():
            gm(*xs)

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        train_s = _timed(train_batch)
        activations = sum(saved.values())
        forward_s = _timed(forward)
    except (MemoryError, RuntimeError) as exc:
        if "memory" not in str(exc).lower() and not isinstance(exc, MemoryError):
            raise
        raise EngineError(
            "estimated_memory_exceeds_limit",
            f"One training batch of {len(xs[0])} samples did not fit in the job's memory "
            f"({exc}). Use a smaller batch_size, or ask the operator to raise "
            "COMPAAS_JOB_MEMORY_LIMIT_MB.",
            field="pipeline",
        ) from exc
    finally:
        torch.set_num_threads(previous)
    return Timing(
        params=sum(p.numel() for p in gm.parameters()),
        batch=len(xs[0]),
        load_s=load_s,
        train_s=train_s,
        forward_s=forward_s,
        saved_bytes=activations,
    )


def transformer_blocks(model_path: Path, configs: Sequence[OpConfig]) -> list[tuple[str, int]]:
    """(kind, units) of each attention and FFN block a channel prune would find in the model
    (none when no step prunes channels or the model has no attention)."""
    if not any(isinstance(c, PruneConfig) and c.granularity == "channels" for c in configs):
        return []
    from engine.torchgraph.blocks import attention_blocks

    found = attention_blocks(load_lifted(model_path)[0])
    return [(b.kind, b.units) for b in found or []]


def estimate(
    model_path: Path,
    configs: Sequence[OpConfig],
    *,
    start: int,
    data: Samples,
    eval_samples: int,
    inputs: list[TensorSpec],
    fixed_batch: int | None,
    task: str,
    models: dict[str, Path],
    convert_s: float,
    elapsed_s: float,
    limits: Limits,
    threads: int = 1,
) -> dict[int, dict[str, Any]]:
    """Each training step's estimate by pipeline index; raises when the job cannot fit."""
    blocks = transformer_blocks(model_path, configs)
    dataset = data.source == "dataset"
    works = [
        dataclasses.replace(w, kept=kept_after(configs, i) if w.student is None else 1.0)
        for i, c in enumerate(configs)
        if i >= start
        and (w := step_work(i, c, data.labels is not None, len(data), blocks, dataset)) is not None
    ]
    if not works:
        return {}
    job = Job(
        train_samples=len(data),
        eval_samples=eval_samples,
        classification=task == "classification",
        fixed_batch=fixed_batch,
        convert_s=convert_s,
        baseline_mb=address_space_mb(),
    )
    timings: dict[tuple[str | None, int], Timing] = {}

    def timing(student: str | None, size: int) -> Timing:
        key = (student, size)
        if key not in timings:
            path = model_path if student is None else models.get(student, model_path)
            timings[key] = measure(path, _first_batch(data, inputs, size), threads)
        return timings[key]

    estimates: dict[int, dict[str, Any]] = {}
    for work in works:
        size = fixed_batch or min(work.batch_size, len(data))
        estimates[work.index] = step_estimate(
            work, job, timing(work.student, size), timing(None, size)
        )
    original = timing(None, fixed_batch or min(works[0].batch_size, len(data)))
    # the original's measurement, and the final latency side by side with it
    measuring = eval_samples * original.forward_per_sample() + 3 * LATENCY_S
    total = elapsed_s + MARGIN * measuring + sum(e["seconds"] for e in estimates.values())
    for entry in estimates.values():
        entry["job_seconds"] = round(total, 1)
    check(estimates, total, limits)
    return estimates


def _figure(value: float) -> str:
    """1234.5 -> "1,234"; 0.1234 -> "0.12"."""
    return f"{value:,.0f}" if value >= 10 else f"{value:.2g}"


def _parameters(count: int) -> str:
    return f"{count / 1e6:.1f} M" if count >= 100_000 else f"{count:,}"


def check(estimates: dict[int, dict[str, Any]], total_s: float, limits: Limits) -> None:
    """Refuse a job whose estimate exceeds its time or memory limit, saying what to change."""
    if not estimates:
        return
    index, largest = max(estimates.items(), key=lambda item: item[1]["seconds"])
    if limits.time_s is not None and total_s > limits.time_s:
        raise EngineError(
            "estimated_time_exceeds_limit",
            f"The job would take about {_figure(total_s)} s, more than its time limit of "
            f"{_figure(limits.time_s)} s. pipeline[{index}] alone needs about "
            f"{_figure(largest['seconds'])} s: {_parameters(largest['parameters'])} parameters "
            f"× {largest['samples']:,} samples × {largest['epochs']} epochs at the measured "
            f"{_figure(largest['per_batch_s'])} s per batch of {largest['batch_size']}, plus "
            "evaluation, export and measurement, with a 25 % margin. Use fewer epochs or "
            "samples (or a smaller model), or ask the operator to raise "
            "COMPAAS_JOB_TIME_LIMIT_S.",
            field="pipeline",
        )
    index, largest = max(estimates.items(), key=lambda item: item[1]["memory_mb"])
    if limits.memory_mb is not None and largest["memory_mb"] > limits.memory_mb:
        raise EngineError(
            "estimated_memory_exceeds_limit",
            f"pipeline[{index}] would need about {_figure(largest['memory_mb'])} MiB, more "
            f"than the job's memory limit of {_figure(limits.memory_mb)} MiB: "
            f"{_figure(largest['process_mb'])} MiB the process holds already + "
            f"{_figure(largest['parameters_mb'])} MiB of weights and training state "
            f"({_parameters(largest['parameters'])} parameters × {BYTES_PER_PARAMETER} bytes × "
            f"{largest['parameter_copies']} copies: weights, gradients, Adam's two moments, "
            "the best epoch's snapshot, and the teacher's weights where one is used) + "
            f"{_figure(largest['activations_mb'])} MiB of activations for a batch of "
            f"{largest['batch_size']} (measured), the last two with a 25 % margin. Use a "
            "smaller batch_size (or a smaller model), or ask the operator to raise "
            "COMPAAS_JOB_MEMORY_LIMIT_MB.",
            field="pipeline",
        )
