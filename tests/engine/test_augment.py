"""Distillation's input variants: token dropout and mixing for text, flip/crop/noise for images."""

from __future__ import annotations

import torch

from engine.torchgraph.augment import P, Plan, apply, plan

SEQ = 24
CLS, SEP = 101, 102


def _text_batch(n: int) -> list[torch.Tensor]:
    """BERT-style rows: [CLS] w1 … wk [SEP] then padding; token types 0 then 1 after a cut."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.zeros(n, SEQ, dtype=torch.int64)
    mask = torch.zeros(n, SEQ, dtype=torch.int64)
    types = torch.zeros(n, SEQ, dtype=torch.int64)
    for i in range(n):
        real = int(torch.randint(6, SEQ + 1, (1,), generator=gen))
        words = torch.randint(1000, 30000, (real - 2,), generator=gen)
        ids[i, :real] = torch.cat([torch.tensor([CLS]), words, torch.tensor([SEP])])
        mask[i, :real] = 1
        types[i, real // 2 : real] = 1
    return [ids, mask, types]


def test_the_plan_follows_what_the_inputs_are() -> None:
    text = _text_batch(4)
    found = plan(text, ["input_ids", "attention_mask", "token_type_ids"])
    assert found == Plan("text", 0, 1, (2,))
    # the order of the inputs does not matter; the ids are the input spanning the vocabulary
    assert plan([text[2], text[1], text[0]], ["tt", "mask", "ids"]) == Plan("text", 2, 1, (0,))
    assert plan([torch.rand(4, 3, 16, 16)], ["image"]) == Plan("image", 0)
    assert plan([torch.rand(4, 10)], ["features"]) is None  # tabular: left as it is
    assert plan(text[:1], ["input_ids"]) is None  # no attention mask: positions unknown
    assert plan([text[0], text[0] * 2], ["input_ids", "attention_mask"]) is None  # not 0/1


def test_text_variants_are_real_sentences_of_the_batch() -> None:
    ids, mask, types = _text_batch(64)
    found = plan([ids, mask, types], ["input_ids", "attention_mask", "token_type_ids"])
    assert found is not None
    out = apply(found, [ids, mask, types], torch.Generator().manual_seed(3))
    again = apply(found, [ids, mask, types], torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(out, again, strict=True))  # seeded
    changed = [i for i in range(64) if not torch.equal(out[0][i], ids[i])]
    assert 0.25 * 64 < len(changed) < 0.75 * 64  # about P of the samples vary
    assert P == 0.5
    vocabulary = {int(t) for t in ids[mask.bool()]}
    shorter = mixed = 0
    for i in range(64):
        real = int(out[1][i].sum())
        # the mask stays one run of ones, then zeros; padding is zero in every moved input
        assert torch.equal(out[1][i], (torch.arange(SEQ) < real).long())
        assert int(out[0][i, real:].abs().sum()) == int(out[2][i, real:].sum()) == 0
        row = out[0][i, :real]
        assert int(row[0]) == CLS and int(row[-1]) == SEP  # [CLS] … [SEP] survive
        assert {int(t) for t in row} <= vocabulary  # tokens only move, none is invented
        original = ids[i, : int(mask[i].sum())]
        if i in changed:
            kept = [int(t) for t in row]
            if all(t in original.tolist() for t in kept) and real < len(original):
                shorter += 1  # token dropout: a subsequence of the sentence
            else:
                mixed += 1  # a cut of this sentence joined to another one's tail
    assert shorter > 0 and mixed > 0


def test_image_variants_keep_the_shape_and_stay_close() -> None:
    gen = torch.Generator().manual_seed(1)
    coarse = torch.rand(32, 3, 4, 4, generator=gen)  # smooth images, as photographs are
    x = torch.nn.functional.interpolate(coarse, size=(20, 20), mode="bilinear")
    out = apply(Plan("image", 0), [x], torch.Generator().manual_seed(5))[0]
    assert out.shape == x.shape and out.dtype == x.dtype
    changed = [i for i in range(32) if not torch.equal(out[i], x[i])]
    assert 8 < len(changed) < 24
    unchanged = [i for i in range(32) if i not in changed]
    assert all(torch.equal(out[i], x[i]) for i in unchanged)
    # a variant is the image moved a little: far closer to it (or its mirror) than to another
    for i in changed:
        near = min(
            float((out[i] - x[i]).abs().mean()), float((out[i] - x[i].flip(-1)).abs().mean())
        )
        other = float((out[i] - x[(i + 1) % 32]).abs().mean())
        assert near < 0.5 * other
