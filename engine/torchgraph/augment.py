"""Input augmentation for distillation when the dataset is small.

A student distilled on a few hundred samples learns the teacher on those samples and little
around them. Distillation needs no labels — the teacher labels whatever it is shown — so the
training batches can be varied freely; each sample of a batch is replaced, with probability
`P`, by a variant, and the teacher is asked about the variant.

What a variant is depends on what the inputs are (`plan`):
- **text** — an integer [batch, sequence] input of token ids with a 0/1 attention mask of the
  same shape (found by name: `mask` in it; token type ids may ride along): *token dropout*
  deletes each inner token (not the first or the last real one, [CLS] / [SEP]) with
  probability `TOKEN_DROP` and closes the gap, padding at the end; *mixing* joins the first
  part of the sample (up to a random cut) with the tail of another sample of the batch, so the
  teacher sees sentences that are in no dataset row. Half the variants are each kind.
- **image** — a float [batch, channels, height, width] input: a random horizontal flip, a
  random crop of `CROP` of each side resized back (bilinear), and Gaussian noise of `NOISE` ×
  the batch's standard deviation.
- anything else is left as it is (`plan` returns None).

It is seeded from the training loop's generator, so a rerun gives the same model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

P = 0.5
TOKEN_DROP = 0.15
CROP = 0.1
NOISE = 0.05
# `augment: auto` augments when the dataset has fewer samples than this
SMALL_DATASET = 5000


@dataclass(frozen=True)
class Plan:
    """Which inputs are varied, and how."""

    kind: str  # "text" | "image"
    ids: int  # the token ids (text) or the image (image) input's position
    mask: int | None = None  # the attention mask's position (text)
    aligned: tuple[int, ...] = ()  # other [batch, sequence] inputs moved with the tokens

    def describe(self) -> dict[str, Any]:
        if self.kind == "text":
            what = [f"token dropout {TOKEN_DROP:g}", "mixing two samples at a random cut"]
        else:
            what = ["horizontal flip", f"random crop {CROP:g} resized", f"noise {NOISE:g}·std"]
        return {"kind": self.kind, "variants": what, "probability": P}


def plan(inputs: list[torch.Tensor], names: list[str]) -> Plan | None:
    """How to vary these inputs (one tensor per model input, batch first), or None."""
    import torch

    if len(inputs) == 1 and inputs[0].is_floating_point() and inputs[0].dim() == 4:
        return Plan("image", 0)
    ints = [
        i
        for i, x in enumerate(inputs)
        if x.dim() == 2 and not x.is_floating_point() and x.dtype != torch.bool
    ]
    masks = [i for i in ints if "mask" in names[i].lower()]
    if len(masks) != 1 or len(ints) != len(inputs):
        return None
    mask = masks[0]
    if not bool(((inputs[mask] == 0) | (inputs[mask] == 1)).all()):
        return None
    shape = inputs[mask].shape
    others = [i for i in ints if i != mask and inputs[i].shape == shape]
    if len(others) != len(ints) - 1 or not others:
        return None
    ids = max(others, key=lambda i: int(inputs[i].max()))  # the token ids span the vocabulary
    return Plan("text", ids, mask, tuple(i for i in others if i != ids))


def token_mask(inputs: list[torch.Tensor], names: list[str]) -> int | None:
    """The position of the attention-mask input when the inputs are text (see `plan`)."""
    found = plan(inputs, names)
    return found.mask if found is not None and found.kind == "text" else None


def apply(plan: Plan, xs: list[torch.Tensor], gen: torch.Generator) -> list[torch.Tensor]:
    """The batch with about P of its samples replaced by variants."""
    import torch

    n = len(xs[plan.ids])
    chosen = torch.rand(n, generator=gen) < P
    if not bool(chosen.any()):
        return xs
    if plan.kind == "image":
        return [_image(xs[0], chosen, gen)]
    return _text(plan, xs, chosen, gen)


def _image(x: torch.Tensor, chosen: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    import torch
    import torch.nn.functional as F

    out = x.clone()
    h, w = x.shape[2], x.shape[3]
    std = float(x.std()) if x.numel() > 1 else 0.0
    for i in torch.nonzero(chosen).flatten().tolist():
        img = x[i]
        if float(torch.rand(1, generator=gen)) < 0.5:
            img = img.flip(-1)
        ch, cw = max(1, round(h * (1 - CROP))), max(1, round(w * (1 - CROP)))
        top = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
        left = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
        crop = img[:, top : top + ch, left : left + cw][None]
        img = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)[0]
        noise = torch.randn(img.shape, generator=gen, dtype=img.dtype) * (NOISE * std)
        out[i] = img + noise
    return out


def _text(
    plan: Plan, xs: list[torch.Tensor], chosen: torch.Tensor, gen: torch.Generator
) -> list[torch.Tensor]:
    """Token dropout or mixing per chosen sample; every [batch, sequence] input moves with the
    token ids (a kept position keeps its token type), the mask says which positions are real."""
    import torch

    assert plan.mask is not None
    mask = xs[plan.mask]
    moved = [plan.ids, *plan.aligned]
    out = [x.clone() for x in xs]
    n, seq = mask.shape
    for i in torch.nonzero(chosen).flatten().tolist():
        real = int(mask[i].sum())
        if real < 4:
            continue
        if float(torch.rand(1, generator=gen)) < 0.5 or n < 2:  # token dropout
            inner = torch.rand(real - 2, generator=gen) >= TOKEN_DROP
            positions = torch.cat([torch.tensor([0]), 1 + torch.nonzero(inner).flatten()])
            positions = torch.cat([positions, torch.tensor([real - 1])])
            rows = [(k, xs[k][i, positions]) for k in moved]
        else:  # mixing: this sample up to a cut, then another sample's tail
            j = int(torch.randint(0, n - 1, (1,), generator=gen))
            j = j + 1 if j >= i else j
            other = int(mask[j].sum())
            if other < 4:
                continue
            cut = int(torch.randint(1, real - 1, (1,), generator=gen))
            start = int(torch.randint(1, other - 1, (1,), generator=gen))
            start = max(start, other - (seq - cut))  # the tail ends with the other's [SEP]
            rows = [(k, torch.cat([xs[k][i, :cut], xs[k][j, start:other]])) for k in moved]
        length = len(rows[0][1])
        for k, row in rows:
            out[k][i] = 0
            out[k][i, :length] = row
        out[plan.mask][i] = 0
        out[plan.mask][i, :length] = 1
    return out
