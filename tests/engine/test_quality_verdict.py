"""The quality verdict (engine/quality.py): the floors per task on metric blocks, and a real
quantized model whose small output slice collapses while the whole output looks fine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from engine import quality
from engine.errors import EngineError
from engine.measured_on import cpu
from engine.pipeline import compress
from tests.conftest import export_onnx

ORIGINAL = {"accuracy_top1": 0.95}


def test_classification_ok_degraded_rejected() -> None:
    good = {"accuracy_top1": 0.94, "agreement_top1": 0.985, "sqnr_db": 25.0}
    got = quality.verdict(good, ORIGINAL, "classification")
    assert got["verdict"] == "ok"
    assert got["floor"] == {"agreement_top1": 0.97, "accuracy_drop": 0.02}
    assert got["measured"] == {"agreement_top1": 0.985, "accuracy_drop": 0.01}
    assert got["below_floor"] == []

    wrecked = {"accuracy_top1": 0.40, "agreement_top1": 0.41, "sqnr_db": 2.0}
    got = quality.verdict(wrecked, ORIGINAL, "classification")
    assert got["verdict"] == "rejected"
    assert got["below_floor"] == ["agreement_top1", "accuracy_drop"]
    assert got["measured"]["accuracy_drop"] == pytest.approx(0.55)
    text = quality.rejected_detail(got)
    assert "agreement_top1" in text and "0.41" in text and "0.97" in text
    assert "allow_below_floor" in text and "distill" in text

    accepted = quality.verdict(wrecked, ORIGINAL, "classification", allow_below_floor=True)
    assert accepted["verdict"] == "degraded"
    assert "0.41" in quality.degraded_warning(accepted)


def test_accuracy_drop_alone_fails_and_needs_labels() -> None:
    # agreement above its floor, but 3 points of accuracy lost
    dropped = {"accuracy_top1": 0.92, "agreement_top1": 0.975}
    assert quality.verdict(dropped, ORIGINAL, "classification")["below_floor"] == ["accuracy_drop"]
    # no labels: the drop is not judged (not measured), agreement is
    unlabeled = quality.verdict({"agreement_top1": 0.975}, {}, "classification")
    assert unlabeled["verdict"] == "ok"
    assert "accuracy_drop" not in unlabeled["measured"]


def test_embedding_and_generic_floors() -> None:
    assert quality.verdict({"cosine_similarity": 0.99}, {}, "embedding")["verdict"] == "ok"
    low = quality.verdict({"cosine_similarity": 0.41}, {}, "embedding")
    assert (low["verdict"], low["below_floor"]) == ("rejected", ["cosine_similarity"])

    # the whole output is fine, one channel slice is not: the worst slice decides
    sliced = {"sqnr_db": 41.0, "sqnr_db_min": 0.3, "sqnr_db_min_slice": "output 0[:, 5]"}
    got = quality.verdict(sliced, {}, "generic")
    assert got["below_floor"] == ["sqnr_db_min"]
    assert got["measured"]["sqnr_db_min_slice"] == "output 0[:, 5]"
    assert "output 0[:, 5]" in quality.shortfall(got)
    # exact outputs (SQNR null, infinite) meet any SQNR floor
    exact = quality.verdict({"sqnr_db": None, "sqnr_db_min": None}, {}, "generic")
    assert exact["verdict"] == "ok"
    # a classification model whose output is not class scores is held to the generic floor
    assert quality.verdict(sliced, {}, "classification")["floor"] == {
        "sqnr_db": 20.0,
        "sqnr_db_min": 20.0,
    }


def test_floor_overrides_and_validation() -> None:
    sliced = {"sqnr_db": 41.0, "sqnr_db_min": 12.0}
    assert quality.verdict(sliced, {}, "generic", {"sqnr_db_min": 10.0})["verdict"] == "ok"
    off = quality.verdict(sliced, {}, "generic", {"sqnr_db_min": None})
    assert off["floor"] == {"sqnr_db": 20.0} and off["verdict"] == "ok"
    # a key of another task's floor is added to this task's
    added = quality.verdict(
        {"agreement_top1": 0.99, "cosine_similarity": 0.9},
        {},
        "classification",
        {"cosine_similarity": 0.95},
    )
    assert added["below_floor"] == ["cosine_similarity"]

    assert quality.check_floor({"agreement_top1": 0.9, "sqnr_db": None}) == {
        "agreement_top1": 0.9,
        "sqnr_db": None,
    }
    with pytest.raises(ValueError, match="Unknown floor key 'top1'.*agreement_top1"):
        quality.check_floor({"top1": 0.9})
    with pytest.raises(ValueError, match=r"fraction in \[0, 1\]"):
        quality.check_floor({"agreement_top1": 97})
    with pytest.raises(ValueError, match="finite number"):
        quality.check_floor({"sqnr_db": "high"})


def test_cpu_flags_read_from_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse2 avx2 avx512f "
        "avx512_vnni ht\n\nprocessor\t: 1\nmodel name\t: Test CPU 9000\n"
    )
    assert cpu(str(info)) == {"model": "Test CPU 9000", "flags": ["avx2", "avx512_vnni", "avx512f"]}


# ----------------------------------------------------------------------------- a real case


class MixedRange(nn.Module):
    """[N, 4 + 3, L]: a 0..300 slice (pixel coordinates) concatenated with a 0..1 slice."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(8, 16, 3, padding=1), nn.ReLU())
        self.big = nn.Conv1d(16, 4, 1)
        self.small = nn.Conv1d(16, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.body(x)
        return torch.cat([torch.sigmoid(self.big(f)) * 300.0, torch.sigmoid(self.small(f))], 1)


def test_collapsed_small_slice_is_rejected_by_the_worst_slice(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = export_onnx(MixedRange(), torch.randn(1, 8, 16), tmp_path / "mixed.onnx")
    x = np.random.default_rng(0).normal(size=(64, 8, 16)).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=x)
    # one int8 scale for the concatenated output (the range repair that keeps it float off)
    step = {"op": "quantize", "range_repairs": False, "per_channel": True}
    result = compress(
        src,
        [step],
        dataset_path=tmp_path / "data.npz",
        dataset_id="ds_mixed",
        evaluation_task="generic",
        workdir=tmp_path / "job",
    )
    final = result["final"]
    assert final["sqnr_db"] > 20.0  # the 0..300 slice dominates the whole output
    assert final["sqnr_db_min"] < 10.0
    assert final["sqnr_db_min_slice"] in {f"output 0[:, {c}]" for c in range(4, 7)}
    verdict = result["quality"]
    assert verdict["verdict"] == "rejected"
    assert verdict["below_floor"] == ["sqnr_db_min"]
    assert verdict["measured"]["sqnr_db"] == final["sqnr_db"]
    assert result["steps"][0]["quality"] == verdict  # the one step is the final result
    # every metrics block says what it was measured on, the same for all
    on = final["measured_on"]
    assert result["original"]["measured_on"] == on == result["steps"][0]["metrics"]["measured_on"]
    assert on["dataset_id"] == "ds_mixed"
    assert len(on["dataset_sha256"]) == 64
    assert (on["samples"], on["split"], on["data_source"]) == (64, "all", "dataset")
    assert on["runtime"] == "onnxruntime" and on["runtime_version"]
    assert (on["threads"], on["batch"]) == (1, 1)
    assert isinstance(on["cpu_flags"], list)


def test_unknown_floor_key_is_refused_by_the_engine(tmp_path: Path) -> None:
    src = export_onnx(MixedRange(), torch.randn(1, 8, 16), tmp_path / "mixed.onnx")
    with pytest.raises(EngineError) as err:
        compress(
            src,
            [{"op": "quantize"}],
            evaluation_task="generic",
            floor={"sqnr": 20.0},
            workdir=tmp_path / "job",
        )
    assert err.value.code == "invalid_floor" and "sqnr_db_min" in err.value.detail
