"""bench/zoo_torch.py and bench/cnns.py without the service: the torchvision layouts have
torchvision's parameter counts, the row's image sets never share a digit, and the verdict
reads each criterion's direction."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from torch import nn

from bench import cnns, zoo_torch


@pytest.mark.parametrize(
    ("build", "params"),
    [
        # torchvision 0.28's resnet18 / mobilenet_v2 / mobilenet_v3_small with num_classes=10
        (lambda: cnns.resnet18(10), 11_181_642),
        (lambda: cnns.mobilenet_v2(10), 2_236_682),
        (lambda: cnns.mobilenet_v3_small(10), 1_528_106),
    ],
    ids=["resnet18", "mobilenet_v2", "mobilenet_v3_small"],
)
def test_the_layouts_have_torchvisions_parameter_counts(
    build: Callable[[], nn.Module], params: int
) -> None:
    model = build()
    assert sum(p.numel() for p in model.parameters()) == params


def test_teacher_job_and_held_out_digits_are_disjoint() -> None:
    rows = [set(zoo_torch.TEACHER_ROWS), set(zoo_torch.JOB_ROWS), set(zoo_torch.HELD_ROWS)]
    assert not (rows[0] & rows[1]) and not (rows[0] & rows[2]) and not (rows[1] & rows[2])


def test_digit_images_are_normalised_rgb_at_the_rows_size() -> None:
    pytest.importorskip("PIL")
    x, y = zoo_torch.digit_images(range(10), 2, 0)
    side = zoo_torch.DIGITS_SIDE
    assert x.shape == (20, 3, side, side) and x.dtype.name == "float32"
    assert list(y) == list(range(10)) * 2
    assert abs(float(x.mean())) < 1.5 and float(x.std()) > 0.3


def test_verdict_reads_each_criterions_direction() -> None:
    figures = {"macs_ratio": 0.27, "agreement_top1": 0.94, "latency_ratio": 0.6}
    assert zoo_torch.verdict(figures, zoo_torch.CNN_MUST_SHOW) == {
        "macs_ratio": True,
        "agreement_top1": False,
        "latency_ratio": True,
    }


def test_the_minilm_rows_held_out_sentences_are_new_to_the_job() -> None:
    job, held = zoo_torch.minilm_corpus_split()
    assert len(job) == zoo_torch.MINILM_CORPUS_SENTENCES
    assert len(held) == zoo_torch.MINILM_HELD
    assert not set(job) & set(held)
