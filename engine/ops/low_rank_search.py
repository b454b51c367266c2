"""`low_rank`'s measured mode: which layers to factorize, at which rank.

Every eligible layer's rank options (those saving at least `min_saving` of its parameters)
are scored one layer at a time: the model with only that layer replaced by its rank-r
approximation, run on the step's samples, against the step's input (engine.onnxgraph.metrics
.quality; the target judges as the quantizer's does, quantize.measure.meets). Errors on the
target's scale (1 − cosine, noise/signal power, accuracy lost) roughly add over layers, so
the options are taken greedily by error per parameter saved while the summed error stays
within the target's, then the combination is measured once; while it misses, the last choices
are undone (a layer back to a higher rank, or kept whole) and it is measured again.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.config import LowRankConfig, QuantizeTarget
from engine.context import StepContext
from engine.io.datasets import Samples
from engine.onnxgraph.metrics import quality
from engine.ops.quantize.measure import meets, worst_sqnr
from engine.torchgraph.fidelity import Holdout

if TYPE_CHECKING:
    import torch
    from torch import nn

RANK_FRACTIONS = (1.0, 0.5, 0.25, 0.125)  # of the largest paying rank: the options scored
RANK_ALIGN = 8  # ranks of 16 and more are multiples of this (whole SIMD lanes)
# After the first combination measures within the target, at most FILL_ROUNDS more rounds
# take options with the allowed sum rescaled by how much the sum over-estimated (at most
# FILL_MAX_SCALE×), while the measured loss is below FILL_BELOW of what the target allows.
FILL_ROUNDS = 2
FILL_BELOW = 0.8
FILL_MAX_SCALE = 4.0
# When scoring every option on all `samples` would take longer, the options are scored on
# fewer (at least MIN_SCORE_SAMPLES); the combinations are still measured on all of them.
SEARCH_SECONDS = 180.0
MIN_SCORE_SAMPLES = 8


def paying_rank(out_dim: int, inner: int, bias: int, min_saving: float) -> int:
    """The largest rank whose factorization saves at least `min_saving` of the layer's
    parameters (out·inner + bias → r·(out + inner) + bias); 0 when no rank does."""
    full = out_dim * inner + bias
    rank = math.floor((out_dim * inner - min_saving * full) / (out_dim + inner))
    if rank * (out_dim + inner) >= out_dim * inner:  # min_saving 0: a saving all the same
        rank -= 1
    return max(0, rank)


def rank_options(largest: int) -> list[int]:
    """The ranks scored for a layer, largest first: `largest`, ½, ¼ and ⅛ of it (aligned)."""
    found: list[int] = []
    for fraction in RANK_FRACTIONS:
        r = max(1, int(largest * fraction))
        if r >= 2 * RANK_ALIGN:
            r -= r % RANK_ALIGN
        if r not in found:
            found.append(r)
    return found


@dataclass(eq=False)  # a dict key by identity
class Factor:
    """One eligible layer and the SVD of its weight reshaped to [out, in·k·k]."""

    name: str
    module: nn.Module
    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor

    @property
    def weight(self) -> Any:
        return self.module.weight

    @property
    def out_dim(self) -> int:
        return int(self.u.shape[0])

    @property
    def inner(self) -> int:
        return int(self.vh.shape[1])

    @property
    def bias(self) -> int:
        b = getattr(self.module, "bias", None)
        return 0 if b is None else int(b.numel())

    @property
    def params(self) -> int:
        return self.out_dim * self.inner + self.bias

    def params_at(self, rank: int) -> int:
        return rank * (self.out_dim + self.inner) + self.bias

    def approximation(self, rank: int) -> torch.Tensor:
        """The rank-`rank` weight, in the layer's shape and dtype."""
        w = (self.u[:, :rank] * self.s[:rank]) @ self.vh[:rank]
        return w.reshape(self.weight.shape).to(self.weight.dtype)


@dataclass
class Option:
    """A rank a layer may take, its parameters, and the fidelity with only it factorized."""

    rank: int
    params: int
    error: float  # on the target's scale (Scorer.error)
    fidelity: dict[str, Any]  # the figures (Scorer.figures)


@dataclass
class Search:
    """What the measured mode chose and how it got there (for the step's details)."""

    ranks: dict[str, int]  # layer → chosen rank
    options: dict[str, list[Option]]
    why_not: dict[str, str]  # eligible layers left whole, and why
    estimated: dict[str, Any]
    measured: dict[str, Any]
    met: bool | None  # the target (None: no target)
    backed_off: list[str] = field(default_factory=list)  # undone choices, in order
    passes: int = 0
    seconds: float = 0.0
    samples: int = 0  # the combinations were measured on
    option_samples: int = 0  # each option was scored on (fewer when time was short)


@dataclass
class _Samples:
    """Samples a model is run on, the step input's outputs there, its accuracy (labels)."""

    runner: Holdout
    reference: list[np.ndarray]
    accuracy: float | None

    @property
    def labels(self) -> np.ndarray | None:
        return self.runner.samples.labels

    def __len__(self) -> int:
        return len(self.runner.samples)


class Scorer:
    """The step's input's outputs on the samples, and a model's fidelity to them."""

    def __init__(
        self, gm: nn.Module, ctx: StepContext, samples: int, target: QuantizeTarget | None
    ) -> None:
        self.target = target
        self.task = ctx.task
        self.passes = 0
        self._names = [spec.name for spec in ctx.inputs]
        self._batch = ctx.batch
        started = time.perf_counter()
        self.all = self._reference(gm, ctx.calibration(samples))
        self.pass_seconds = time.perf_counter() - started
        self.small = self.all  # what each rank option is scored on (`limit`)

    def _reference(self, gm: nn.Module, samples: Samples) -> _Samples:
        runner = Holdout(samples, self._names, [], self.task, self._batch, held_out=False)
        self.passes += 1
        reference = runner.outputs(gm)
        base = quality(reference, None, samples.labels, "classification")
        return _Samples(runner, reference, base.get("accuracy_top1"))

    def limit(self, gm: nn.Module, passes: int) -> None:
        """Score the options on fewer samples when `passes` on all would take longer than
        SEARCH_SECONDS (at least MIN_SCORE_SAMPLES); combinations are measured on all."""
        if passes * self.pass_seconds <= SEARCH_SECONDS:
            return
        n = int(len(self.all) * SEARCH_SECONDS / (passes * self.pass_seconds))
        n = max(MIN_SCORE_SAMPLES, n)
        if n < len(self.all):
            self.small = self._reference(gm, self.all.runner.samples.take(n))

    def measure(self, gm: nn.Module, small: bool = False) -> dict[str, Any]:
        """Cosine, SQNR (worst slice), accuracy drop (labels) of `gm` against the input."""
        on = self.small if small else self.all
        self.passes += 1
        outputs = on.runner.outputs(gm)
        if not all(np.isfinite(o).all() for o in outputs if o.dtype.kind == "f"):
            return {"cosine_similarity": -1.0, "sqnr_db": -math.inf, "accuracy_drop": 1.0}
        values = quality(outputs, on.reference, on.labels, self.task)
        out = {k: values.get(k) for k in ("cosine_similarity", "sqnr_db", "sqnr_db_min")}
        if on.accuracy is not None and values.get("accuracy_top1") is not None:
            out["accuracy_drop"] = round(on.accuracy - values["accuracy_top1"], 6)
        return {k: v for k, v in out.items() if v is not None or k == "sqnr_db"}

    def error(self, fidelity: dict[str, Any]) -> float:
        """The loss on the target's scale, where layers' losses roughly add: 1 − cosine (no
        target too), noise/signal power, or the accuracy lost."""
        target = self.target
        if target is not None and target.max_accuracy_drop is not None:
            return max(0.0, float(fidelity.get("accuracy_drop", 1.0)))
        if target is not None and target.min_sqnr_db is not None:
            db = worst_sqnr(fidelity)
            return 0.0 if db is None else 10 ** (-db / 10)
        return max(0.0, 1.0 - float(fidelity.get("cosine_similarity", -1.0)))

    def allowed(self) -> float | None:
        """The error the target allows (None: no target)."""
        target = self.target
        if target is None:
            return None
        if target.max_accuracy_drop is not None:
            return target.max_accuracy_drop
        if target.min_sqnr_db is not None:
            return float(10 ** (-target.min_sqnr_db / 10))
        assert target.min_cosine is not None
        return 1.0 - target.min_cosine

    def figures(self, fidelity: dict[str, Any]) -> dict[str, Any]:
        """The figures a report shows: the target's, and the cosine."""
        keys = ["cosine_similarity"]
        if self.target is not None and self.target.min_sqnr_db is not None:
            keys.append("sqnr_db_min" if "sqnr_db_min" in fidelity else "sqnr_db")
        if self.target is not None and self.target.max_accuracy_drop is not None:
            keys.append("accuracy_drop")
        return {k: _figure(fidelity.get(k)) for k in keys}


def _figure(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 6) if math.isfinite(value) else "not finite"
    return value


@dataclass
class _Move:
    name: str
    before: int  # option index the layer had (-1: whole)
    after: int


class _Greedy:
    """Ranks taken one option at a time, cheapest error per parameter saved first; the
    summed errors (each measured alone) estimate the combination's."""

    def __init__(
        self,
        options: dict[str, list[Option]],
        by_name: dict[str, Factor],
        params: int,
        budget: int | None,
    ) -> None:
        self.options, self.by_name, self.params, self.budget = options, by_name, params, budget
        self.state = {name: -1 for name in options}  # option index (-1: whole)
        self.moves: list[_Move] = []
        self.error = 0.0

    def _at(self, name: str, index: int) -> tuple[float, int]:
        if index < 0:
            return 0.0, self.by_name[name].params
        option = self.options[name][index]
        return option.error, option.params

    def extend(self, allowed: float | None) -> None:
        """Take options while the summed error stays within `allowed` and the budget (if
        any) is not reached."""
        while self.budget is None or self.params > self.budget:
            best: tuple[float, str, int] | None = None
            for name, opts in self.options.items():
                error, params = self._at(name, self.state[name])
                for j in range(self.state[name] + 1, len(opts)):
                    cost = max(0.0, opts[j].error - error)
                    if allowed is not None and self.error + cost > allowed:
                        continue
                    key = cost / (params - opts[j].params)
                    if best is None or key < best[0]:
                        best = (key, name, j)
            if best is None:
                return
            _, name, j = best
            self._move(_Move(name, self.state[name], j))

    def _move(self, move: _Move) -> None:
        (e0, p0), (e1, p1) = self._at(move.name, move.before), self._at(move.name, move.after)
        self.error += max(0.0, e1 - e0)
        self.params -= p0 - p1
        self.state[move.name] = move.after
        self.moves.append(move)

    def undo(self) -> str:
        """Undo the last choice; what it undid, in words."""
        move = self.moves.pop()
        (e0, p0), (e1, p1) = self._at(move.name, move.before), self._at(move.name, move.after)
        self.error = max(0.0, self.error - max(0.0, e1 - e0))
        self.params += p0 - p1
        self.state[move.name] = move.before
        opts = self.options[move.name]
        back = f"rank {opts[move.before].rank}" if move.before >= 0 else "kept whole"
        return f"{move.name}: rank {opts[move.after].rank} → {back}"

    def chosen(self) -> dict[Factor, int]:
        return {self.by_name[n]: self.options[n][j].rank for n, j in self.state.items() if j >= 0}


def search(
    gm: nn.Module,
    factors: Sequence[Factor],
    config: LowRankConfig,
    ctx: StepContext,
    model_params: int,
    progress: Callable[[float, str], None],
) -> Search:
    """Score every layer's rank options alone, choose greedily, verify and back off."""
    started = time.perf_counter()
    target = config.goal()
    scorer = Scorer(gm, ctx, config.samples, target)
    allowed = scorer.allowed()
    budget = (
        None if config.max_params_ratio is None else int(config.max_params_ratio * model_params)
    )
    options: dict[str, list[Option]] = {}
    why_not: dict[str, str] = {}
    total = sum(len(rank_options(_largest(f, config))) for f in factors)
    scorer.limit(gm, total)
    done = 0
    for f in factors:
        largest = _largest(f, config)
        scored: list[Option] = []
        for rank in rank_options(largest):
            progress(done / max(1, total), f"scoring {f.name} at rank {rank}")
            done += 1
            fidelity = _with(gm, {f: rank}, lambda m: scorer.measure(m, small=True))
            scored.append(
                Option(rank, f.params_at(rank), scorer.error(fidelity), scorer.figures(fidelity))
            )
        options[f.name] = scored
    by_name = {f.name: f for f in factors}

    greedy = _Greedy(options, by_name, model_params, budget)
    greedy.extend(allowed)
    progress(0.95, "measuring the chosen ranks together")
    measured = _with(gm, greedy.chosen(), scorer.measure)
    backed_off: list[str] = []
    met = None if target is None else meets(measured, target)
    while target is not None and allowed is not None and not met and greedy.moves:
        # the summed estimate was `scale` times too low: undo choices until the scaled sum fits
        scale = max(1.0, scorer.error(measured) / max(greedy.error, 1e-12))
        while greedy.moves:
            backed_off.append(greedy.undo())
            if greedy.error * scale <= allowed:
                break
        measured = _with(gm, greedy.chosen(), scorer.measure)
        met = meets(measured, target)
    for _ in range(FILL_ROUNDS):
        # the sum over-estimated what the layers cost together: take more while it measures
        # within the target, and drop what this round took when it does not
        lost = scorer.error(measured)
        if not met or allowed is None or greedy.error <= 0 or lost >= FILL_BELOW * allowed:
            break
        mark = len(greedy.moves)
        greedy.extend(allowed * min(FILL_MAX_SCALE, greedy.error / max(lost, 1e-12)))
        if len(greedy.moves) == mark:
            break
        trial = _with(gm, greedy.chosen(), scorer.measure)
        if meets(trial, target):
            measured = trial
            continue
        while len(greedy.moves) > mark:
            backed_off.append(greedy.undo())
        break

    state, params = greedy.state, greedy.params
    ranks = {name: options[name][j].rank for name, j in state.items() if j >= 0}
    for f in factors:
        if f.name in ranks:
            continue
        first = options[f.name][0]
        if budget is not None and params <= budget:
            why_not[f.name] = "not needed: max_params_ratio was reached without it"
        elif allowed is not None and first.error > allowed:
            why_not[f.name] = (
                f"costs too much: rank {first.rank} alone gives "
                f"{describe(first.fidelity)}, below the target "
                f"({target.describe() if target else ''})"
            )
        else:
            why_not[f.name] = (
                "did not fit: the target was reached with layers that cost less fidelity "
                "per parameter saved"
            )
    return Search(
        ranks=ranks,
        options=options,
        why_not=why_not,
        estimated={"error": round(greedy.error, 6), "scale": _error_scale(scorer)},
        measured=scorer.figures(measured),
        met=met,
        backed_off=backed_off,
        passes=scorer.passes,
        seconds=round(time.perf_counter() - started, 2),
        samples=len(scorer.all),
        option_samples=len(scorer.small),
    )


def _largest(f: Factor, config: LowRankConfig) -> int:
    return paying_rank(f.out_dim, f.inner, f.bias, config.saving())


def _with(
    gm: nn.Module, ranks: dict[Factor, int], measure: Callable[[nn.Module], dict[str, Any]]
) -> dict[str, Any]:
    """Measure `gm` with these layers' weights replaced by their approximations."""
    import torch

    saved = {f: f.weight.detach().clone() for f in ranks}
    try:
        with torch.no_grad():
            for f, rank in ranks.items():
                f.weight.copy_(f.approximation(rank))
        return measure(gm)
    finally:
        with torch.no_grad():
            for f, weight in saved.items():
                f.weight.copy_(weight)


def _error_scale(scorer: Scorer) -> str:
    target = scorer.target
    if target is not None and target.max_accuracy_drop is not None:
        return "accuracy lost"
    if target is not None and target.min_sqnr_db is not None:
        return "noise/signal power"
    return "1 - cosine"


def describe(figures: dict[str, Any]) -> str:
    """Figures for a message: `cosine 0.9912, SQNR 18.2 dB`."""
    names = {"cosine_similarity": "cosine", "sqnr_db": "SQNR", "sqnr_db_min": "SQNR (worst)"}
    parts = []
    for k, v in figures.items():
        if k == "accuracy_drop":
            parts.append(f"accuracy drop {v}")
        elif isinstance(v, str):
            parts.append(f"{names.get(k, k)} {v}")
        elif v is None:
            parts.append(f"{names.get(k, k)} " + ("exact" if k.startswith("sqnr") else "n/a"))
        else:
            unit = " dB" if k.startswith("sqnr") else ""
            parts.append(f"{names.get(k, k)} {v:.6g}{unit}")
    return ", ".join(parts)
