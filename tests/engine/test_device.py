"""Where torch training runs: the device rule (with GPU availability as a parameter) and the
CPU path training as before. The CUDA path runs only where torch sees a GPU (the last test's
`cuda` case); the machine these tests were written on has none."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from engine.errors import EngineError
from engine.pipeline import compress
from engine.torchgraph.device import cuda_usable, place, resolve_device

DISTILL = [{"op": "distill", "student": "current", "epochs": 1}]


def _never() -> bool:
    raise AssertionError("the CPU setting must not probe for a GPU")


@pytest.mark.parametrize(
    ("setting", "gpu", "device"),
    [("auto", True, "cuda"), ("auto", False, "cpu"), ("cuda", True, "cuda"), ("cpu", True, "cpu")],
)
def test_the_setting_resolves_against_the_gpu_this_machine_has(
    setting: str, gpu: bool, device: str
) -> None:
    assert resolve_device(setting, lambda: gpu) == device


def test_cpu_never_probes_for_a_gpu() -> None:
    assert resolve_device("cpu", _never) == "cpu"


def test_cuda_without_a_usable_gpu_says_which_setting_and_how_to_fix_it() -> None:
    with pytest.raises(EngineError) as err:
        resolve_device("cuda", lambda: False)
    assert err.value.code == "device_unavailable"
    assert err.value.field == "device"
    assert "COMPAAS_DEVICE=cuda" in err.value.detail
    assert "COMPAAS_DEVICE=auto or cpu" in err.value.detail


def test_an_unknown_setting_is_refused() -> None:
    with pytest.raises(EngineError) as err:
        resolve_device("tpu", lambda: True)
    assert err.value.code == "invalid_device"
    assert "auto, cpu, cuda" in err.value.detail


def test_place_on_the_cpu_moves_nothing() -> None:
    model = nn.Linear(3, 2)
    weight, address = model.weight, model.weight.data_ptr()
    place("cpu", [model])()
    assert model.weight is weight and model.weight.data_ptr() == address


@pytest.mark.parametrize("setting", ["cpu", "auto"])
def test_the_cpu_path_still_trains(
    setting: str, mlp_files: dict[str, Path], tmp_path: Path
) -> None:
    """On a machine without a GPU, cpu and auto both train on the CPU, as before."""
    if setting == "auto" and cuda_usable():
        pytest.skip("this machine has a GPU: auto trains on it")
    result = compress(
        mlp_files["pt2"],
        DISTILL,
        dataset_path=mlp_files["npz"],
        workdir=tmp_path,
        device=setting,  # type: ignore[arg-type]
    )
    step = result["steps"][0]
    assert step["details"]["device"] == "cpu"
    assert [row["epoch"] for row in step["details"]["epochs"]] == [0.0, 1.0]
    assert result["final"]["agreement_top1"] >= 0.9


def test_cuda_without_a_gpu_fails_in_preflight(mlp_files: dict[str, Path], tmp_path: Path) -> None:
    if cuda_usable():
        pytest.skip("this machine has a GPU")
    with pytest.raises(EngineError) as err:
        compress(
            mlp_files["pt2"],
            DISTILL,
            dataset_path=mlp_files["npz"],
            workdir=tmp_path,
            device="cuda",
        )
    assert err.value.code == "device_unavailable"
    assert not list(tmp_path.glob("step*"))  # refused before any step ran


def test_a_pipeline_that_does_not_train_on_torch_ignores_the_device(
    mlp_files: dict[str, Path], tmp_path: Path
) -> None:
    """ONNX steps run on the CPU whatever the worker's setting."""
    result = compress(
        mlp_files["onnx"],
        [{"op": "quantize", "mode": "dynamic", "dtype": "int8"}],
        workdir=tmp_path,
        device="cuda",
    )
    assert "device" not in result["steps"][0]["details"]


@pytest.mark.parametrize(
    "device",
    [
        pytest.param("cpu", marks=pytest.mark.slow),
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
        ),
    ],
)
def test_every_training_op_trains_on_the_device_and_exports_for_the_cpu(
    device: str, mlp_files: dict[str, Path], tmp_path: Path
) -> None:
    """Gradual pruning, distillation, fine-tuning and QAT: every caller of the training loop."""
    pipeline: list[dict[str, Any]] = [
        {"op": "prune", "criterion": "magnitude", "granularity": "unstructured", "sparsity": 0.5,
         "schedule": {"kind": "gradual", "steps": 2, "epochs_per_step": 1}},
        *DISTILL,
        {"op": "fine_tune", "epochs": 1},
        {"op": "quantize", "mode": "qat", "dtype": "int8", "epochs": 1},
    ]  # fmt: skip
    result = compress(
        mlp_files["pt2"],
        pipeline,
        dataset_path=mlp_files["npz"],
        workdir=tmp_path,
        device=device,  # type: ignore[arg-type]
        export=["onnx"],
    )
    assert [s["details"]["device"] for s in result["steps"]] == [device] * 4
    assert result["final"]["accuracy_top1"] >= 0.9  # measured on the CPU, in onnxruntime
