"""Format detection from content, pickle refusal, and inspection of every accepted format."""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.errors import EngineError
from engine.inspect import inspect_model
from engine.io.formats import detect_format


def _write(tmp_path: Path, data: bytes, name: str = "upload.bin") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _code(path: Path) -> str:
    with pytest.raises(EngineError) as err:
        inspect_model(path)
    return err.value.code


def test_formats_come_from_content_not_names(tmp_path: Path, digits_files: dict[str, Path]) -> None:
    assert detect_format(digits_files["pt2"]) == "pt2"
    assert detect_format(digits_files["onnx"]) == "onnx"
    assert detect_format(_write(tmp_path, digits_files["pt2"].read_bytes(), "m.onnx")) == "pt2"
    assert detect_format(_write(tmp_path, digits_files["onnx"].read_bytes(), "m.pt2")) == "onnx"


def test_torch_save_of_a_module_and_of_a_state_dict_are_refused(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    torch.save(model, tmp_path / "model.pt")
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    torch.save(model.state_dict(), tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    for name in ("model.pt", "weights.pt", "old.pt"):
        with pytest.raises(EngineError) as err:
            detect_format(tmp_path / name)
        assert err.value.code == "pickle_refused", name
        detail = err.value.detail
        assert "arbitrary code" in detail
        assert "torch.export.save(torch.export.export(model.eval(), (example_input,))" in detail
        assert "torch.onnx.export(" in detail and "dynamo=True" in detail


@pytest.mark.parametrize("protocol", range(6))
def test_raw_pickles_of_every_protocol_are_refused(tmp_path: Path, protocol: int) -> None:
    path = _write(tmp_path, pickle.dumps({"w": [1.0, 2.0]}, protocol=protocol))
    assert _code(path) == "pickle_refused"


@pytest.mark.parametrize(
    "data",
    [
        np.random.default_rng(0).bytes(4096),
        b"hello, this is a text file and not a model\n" * 20,
        b'{"layers": [1, 2, 3]}',
        b"",
    ],
    ids=["random", "text", "json", "empty"],
)
def test_unknown_content_is_unrecognized(tmp_path: Path, data: bytes) -> None:
    with pytest.raises(EngineError) as err:
        detect_format(_write(tmp_path, data))
    assert err.value.code == "unrecognized_format"
    assert "ONNX" in err.value.detail and ".pt2" in err.value.detail


def test_random_bytes_are_never_mistaken_for_onnx(tmp_path: Path) -> None:
    for seed in range(40):
        path = _write(tmp_path, np.random.default_rng(seed).bytes(2048))
        with pytest.raises(EngineError) as err:
            detect_format(path)
        assert err.value.code == "unrecognized_format"


def test_a_dataset_uploaded_as_a_model_is_named(tmp_path: Path) -> None:
    buf = io.BytesIO()
    np.savez(buf, x=np.zeros((3, 4), np.float32))
    with pytest.raises(EngineError) as err:
        detect_format(_write(tmp_path, buf.getvalue()))
    assert err.value.code == "unrecognized_format" and "dataset" in err.value.detail


def test_truncated_onnx_is_invalid(tmp_path: Path, digits_files: dict[str, Path]) -> None:
    data = digits_files["onnx"].read_bytes()
    for cut in (8, len(data) // 3, len(data) - 10):
        path = _write(tmp_path, data[:cut])
        with pytest.raises(EngineError) as err:
            inspect_model(path)
        assert err.value.code == "invalid_model", cut
        assert "truncated" in err.value.detail


def test_onnx_with_external_data_is_refused(tmp_path: Path) -> None:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((64, 300), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 300])],
        [weight],
    )
    path = tmp_path / "ext.onnx"
    onnx.save(helper.make_model(graph), str(path), save_as_external_data=True, size_threshold=0)
    with pytest.raises(EngineError) as err:
        inspect_model(path)
    assert err.value.code == "invalid_model"
    assert "external data" in err.value.detail


def test_pt2_with_pickled_weights_is_refused(tmp_path: Path, digits_files: dict[str, Path]) -> None:
    evil = tmp_path / "evil.pt2"
    with zipfile.ZipFile(digits_files["pt2"]) as src, zipfile.ZipFile(evil, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("model_weights_config.json"):
                config = json.loads(data)
                first = next(iter(config["config"]))
                config["config"][first]["use_pickle"] = True
                data = json.dumps(config).encode()
            dst.writestr(info.filename, data)
    assert detect_format(evil) == "pt2"
    assert _code(evil) == "pickle_refused"


def test_inspect_pt2_and_onnx(digits_files: dict[str, Path]) -> None:
    pt2 = inspect_model(digits_files["pt2"])
    onnx_info = inspect_model(digits_files["onnx"])
    for info in (pt2, onnx_info):
        assert info["inputs"] == [
            {"name": "input", "shape": ["batch", 1, 8, 8], "dtype": "float32"}
        ]
        assert info["outputs"][0]["shape"] == ["batch", 10]
        assert info["params"] > 100_000
    assert pt2["format"] == "pt2" and pt2["opset"] is None
    assert onnx_info["format"] == "onnx" and onnx_info["opset"] >= 13
    assert pt2["params"] == onnx_info["params"]
    json.dumps(pt2)


def test_torchscript_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(3, 2)), path)
    with pytest.raises(EngineError) as err:
        inspect_model(path)
    assert err.value.code == "torchscript_refused" and err.value.field == "file"


def test_onnx_that_onnxruntime_cannot_load_is_invalid(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    )
    path = tmp_path / "custom.onnx"
    onnx.save(model, str(path))
    assert _code(path) == "invalid_model"
