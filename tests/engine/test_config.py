"""Op configs are typed, versioned and round-trip through JSON; settings refuse unsafe defaults."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from app.config import Settings
from engine.config import (
    OPS,
    PRESETS,
    PipelineError,
    QuantizeConfig,
    op_schemas,
    parse_op,
    parse_pipeline,
    parse_steps,
    preset_pipeline,
    validate_request,
)
from engine.io.datasets import DatasetMismatch, arrays_for_inputs
from engine.io.formats import TensorSpec


@pytest.mark.parametrize(
    "data",
    [
        {"op": "quantize", "mode": "static", "dtype": "int8"},
        {"op": "quantize", "mode": "dynamic", "dtype": "uint8", "per_channel": False},
        {"op": "quantize", "dtype": "fp16"},
        {
            "op": "quantize",
            "mode": "static",
            "calibration": {"method": "percentile", "percentile": 99.9},
        },
    ],
)
def test_configs_round_trip_through_json(data: dict[str, object]) -> None:
    config = parse_op(data)
    again = parse_op(json.loads(json.dumps(config.to_dict())))
    assert again == config
    assert config.to_dict()["version"] == 1
    assert config.to_dict()["op"] == "quantize"


@pytest.mark.parametrize(
    "data",
    [{"op": op} for op in ("prune", "fine_tune", "distill", "low_rank", "weight_share")]
    + [
        {
            "op": "prune",
            "criterion": "entropy",
            "granularity": "channels",
            "sparsity": 0.4,
            "schedule": {"kind": "gradual", "steps": 3, "epochs_per_step": 2},
            "round_to": None,
        },
        {"op": "distill", "student": "width", "width": 0.25, "feature_layers": [["a", "b"]]},
        {"op": "low_rank", "rank_ratio": 0.3},
        {"op": "weight_share", "bits": 4, "init": "density"},
    ],
)
def test_every_op_round_trips_through_json(data: dict[str, object]) -> None:
    config = parse_op(data)
    again = parse_op(json.loads(json.dumps(config.to_dict())))
    assert again == config
    assert again.to_dict() == config.to_dict()
    assert config.to_dict()["version"] == 1


def test_preset_overrides_merge_and_name_the_steps() -> None:
    steps = preset_pipeline("tiny", {"prune": {"schedule": {"steps": 5}}, "2": {"dtype": "uint8"}})
    assert steps[0]["schedule"] == {"kind": "gradual", "steps": 5, "epochs_per_step": 3}
    assert steps[2]["dtype"] == "uint8"
    assert PRESETS["tiny"]["pipeline"][0]["schedule"]["steps"] == 3  # the preset is unchanged
    with pytest.raises(PipelineError, match="0 \\(prune\\), 1 \\(distill\\)"):
        preset_pipeline("tiny", {"9": {"bits": 1}})
    with pytest.raises(PipelineError, match="cannot change a step's op") as err:
        preset_pipeline("tiny", {"prune": {"op": "distill"}})
    assert (err.value.code, err.value.field) == ("invalid_overrides", "overrides.prune.op")
    with pytest.raises(PipelineError) as err:
        preset_pipeline("huge")
    assert (err.value.code, err.value.field) == ("unknown_preset", "preset")


def test_request_steps_name_the_field_at_fault() -> None:
    with pytest.raises(PipelineError) as err:
        parse_steps([{"op": "fp16"}, {"op": "shrink"}])
    assert (err.value.code, err.value.field) == ("invalid_pipeline", "pipeline[0].op")
    assert "quantize" in err.value.extra["valid_ops"]
    with pytest.raises(PipelineError) as err:
        parse_steps([{"op": "prune"}, {"op": "quantize", "dtype": "int3"}])
    assert (err.value.code, err.value.field) == ("invalid_pipeline", "pipeline[1].dtype")


@pytest.mark.parametrize(
    ("steps", "fmt", "given", "code", "field"),
    [
        (
            [{"op": "prune", "granularity": "channels"}],
            "onnx",
            {},
            "unsupported_op",
            "pipeline[0].granularity",
        ),
        ([{"op": "quantize"}, {"op": "distill"}], "pt2", {}, "invalid_pipeline", "pipeline[1]"),
        ([{"op": "fine_tune"}], "pt2", {"has_dataset": False}, "invalid_pipeline", "pipeline[0]"),
        ([{"op": "fine_tune"}], "pt2", {"has_labels": False}, "invalid_pipeline", "pipeline[0]"),
        ([{"op": "quantize"}], "pt2", {"export": ["pt2"]}, "export_unsupported", "export"),
        ([], "onnx", {"export": ["pt2"]}, "export_unsupported", "export"),
        ([], "pt2", {"export": ["torchscript"]}, "export_unsupported", "export"),
        ([], "pt2", {"export": ["tflite"]}, "export_unsupported", "export"),
        ([], "pt2", {"task": "detection"}, "invalid_evaluation_task", "evaluation.task"),
    ],
)
def test_requests_that_cannot_run_are_refused_with_a_code_and_field(
    steps: list[dict[str, object]], fmt: str, given: dict[str, object], code: str, field: str
) -> None:
    args = {"export": ["onnx"], "task": "classification", "has_dataset": True, **given}
    with pytest.raises(PipelineError) as err:
        validate_request(parse_pipeline(steps), fmt, **args)  # type: ignore[arg-type]
    assert (err.value.code, err.value.field) == (code, field)


def test_a_pt2_pipeline_that_keeps_torch_can_export_pt2() -> None:
    configs = parse_pipeline([{"op": "prune", "granularity": "channels"}, {"op": "fine_tune"}])
    plan = validate_request(
        configs, "pt2", export=["onnx", "pt2"], task="classification", has_dataset=True
    )
    assert plan == ["torch", "torch"]


def test_dataset_arrays_match_inputs_by_name_or_single_input_alias() -> None:
    image = TensorSpec("input", ("batch", 1, 8, 8), "float32")
    assert arrays_for_inputs([image], {"x": [5, 1, 8, 8], "labels": [5]}) == {"input": "x"}
    assert arrays_for_inputs([image], {"input": [5, 1, 8, 8], "x": [5]}) == {"input": "input"}
    with pytest.raises(DatasetMismatch) as err:
        arrays_for_inputs([image], {"images": [5, 1, 8, 8]})  # no third alias: only inputs/x
    assert (err.value.code, err.value.field, err.value.input) == (
        "dataset_mismatch",
        "dataset_id",
        "input",
    )
    with pytest.raises(DatasetMismatch, match=r"\[5, 64\]"):
        arrays_for_inputs([image], {"x": [5, 64]})
    pair = [TensorSpec("a", ("batch", 4), "float32"), TensorSpec("b", ("batch", 2), "int64")]
    with pytest.raises(DatasetMismatch, match="'b'"):
        arrays_for_inputs(pair, {"a": [5, 4], "x": [5, 2]})


def test_int8_defaults_to_static_and_fp16_takes_no_mode() -> None:
    assert QuantizeConfig(dtype="int8").mode == "static"
    with pytest.raises(ValidationError, match="fp16"):
        QuantizeConfig(dtype="fp16", mode="static")
    with pytest.raises(ValidationError):
        parse_op({"op": "quantize", "dtype": "int8", "bogus": 1})


def test_unknown_op_names_valid_ops() -> None:
    with pytest.raises(
        ValueError, match="valid ops: auto, distill, fine_tune, low_rank, prune, quant"
    ):
        parse_op({"op": "shrink"})


def test_every_op_publishes_a_schema_and_every_preset_parses() -> None:
    schemas = op_schemas()
    assert set(schemas) == set(OPS)
    assert schemas["quantize"]["properties"]["dtype"]["enum"] == [
        "int8",
        "uint8",
        "int4",
        "fp16",
        "bf16",
        "binary",
        "ternary",
    ]
    for preset in PRESETS.values():
        assert parse_pipeline(preset["pipeline"])


def test_production_settings_refuse_missing_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMPAAS_MODE", "production")
    monkeypatch.setenv("COMPAAS_DATABASE_URL", "postgresql+psycopg://db/compaas")
    monkeypatch.setenv("COMPAAS_BROKER_URL", "redis://redis:6379/0")
    with pytest.raises(ValidationError, match="API_KEY_PEPPER"):
        Settings()
    monkeypatch.setenv("COMPAAS_API_KEY_PEPPER", "change-me-please-change-me-please-123")
    with pytest.raises(ValidationError, match="API_KEY_PEPPER"):
        Settings()
    monkeypatch.setenv("COMPAAS_API_KEY_PEPPER", "x" * 40)
    assert Settings().mode == "production"
    monkeypatch.delenv("COMPAAS_DATABASE_URL")
    with pytest.raises(ValidationError, match="DATABASE_URL"):
        Settings()


def test_embedded_defaults_need_no_servers(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    for name in ("COMPAAS_MODE", "COMPAAS_DATABASE_URL", "COMPAAS_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("COMPAAS_DATA_DIR", str(tmp_path))
    settings = Settings()
    assert settings.database_url == f"sqlite:///{tmp_path.resolve() / 'compaas.db'}"
    assert settings.broker_url == "filesystem://"
    assert settings.blob_dir == tmp_path.resolve() / "blobs"
