"""No code from a model runs: TorchScript is refused, .pt2 graphs pass an op allow-list first."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from app.api.problems import problem_for
from app.errors import Invalid
from app.services.sniff import sniff_model
from engine.errors import EngineError
from engine.inspect import inspect_model
from engine.io.formats import detect_format
from engine.spec import InspectSpec
from tests.security.model_code_files import CANARY_TEXT, edit_program, evil_torchscript, small_pt2
from worker import sandbox

LIMITS = sandbox.Limits(wall_time_s=120, memory_mb=4096)


@pytest.fixture
def canary(tmp_path: Path) -> tuple[Path, Path]:
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"SECRET-PEPPER")
    target = tmp_path / "canary.txt"
    target.write_bytes(CANARY_TEXT)
    return secret, target


def _inspect_in_sandbox(model: Path, workdir: Path) -> sandbox.SandboxError:
    workdir.mkdir(exist_ok=True)
    with pytest.raises(sandbox.SandboxError) as err:
        sandbox.run(InspectSpec(model_path=str(model)), LIMITS, workdir=workdir)
    return err.value


def test_torchscript_with_setstate_is_refused_everywhere(
    tmp_path: Path, canary: tuple[Path, Path]
) -> None:
    secret, target = canary
    job = tmp_path / "job"
    job.mkdir()
    model = evil_torchscript(job / "model.pt", secret, target)
    target.write_bytes(CANARY_TEXT)  # scripting ran __setstate__ once in this process
    with pytest.raises(Invalid) as problem:
        sniff_model(model)
    assert problem_for(problem.value).status == 422 and problem.value.code == "torchscript_refused"
    assert ".pt2" in problem.value.detail and "onnx" in problem.value.detail.lower()
    with pytest.raises(EngineError) as err:
        inspect_model(model)
    assert err.value.code == "torchscript_refused" and err.value.field == "file"
    refused = _inspect_in_sandbox(model, job)
    assert refused.code == "torchscript_refused"
    assert target.read_bytes() == CANARY_TEXT


def _first_node_becomes_from_file(program: dict[str, Any]) -> None:
    node = program["graph_module"]["graph"]["nodes"][0]
    node["target"] = "torch.ops.aten.from_file.default"


def test_pt2_calling_from_file_is_refused_naming_the_node(
    tmp_path: Path, canary: tuple[Path, Path]
) -> None:
    _, target = canary
    real = small_pt2(tmp_path / "real.pt2")
    assert detect_format(real) == "pt2" and inspect_model(real)["format"] == "pt2"
    job = tmp_path / "job"
    job.mkdir()
    hostile = edit_program(real, job / "model.pt2", _first_node_becomes_from_file)
    assert detect_format(hostile) == "pt2"  # the API accepts it; the worker refuses it
    refused = _inspect_in_sandbox(hostile, job)
    assert refused.code == "unsupported_op" and refused.field == "file"
    assert "aten.from_file" in refused.detail and "'linear'" in refused.detail
    assert target.read_bytes() == CANARY_TEXT


def test_from_file_hidden_in_a_cond_branch_is_refused(tmp_path: Path) -> None:
    real = small_pt2(tmp_path / "cond.pt2", with_cond=True)
    inspect_model(real)

    def hide(program: dict[str, Any]) -> None:
        for node in program["graph_module"]["graph"]["nodes"]:
            for arg in node["inputs"]:
                if "as_graph" in arg["arg"]:
                    sub = arg["arg"]["as_graph"]["graph"]["nodes"][0]
                    sub["target"] = "torch.ops.aten.from_file.default"
                    return

    hostile = edit_program(real, tmp_path / "hidden.pt2", hide)
    with pytest.raises(EngineError) as err:
        inspect_model(hostile)
    assert err.value.code == "unsupported_op" and "aten.from_file" in err.value.detail


@pytest.mark.parametrize(
    "target",
    [
        "torch.ops.aten.set_.source_Storage",
        "torch.ops.aten._print.default",
        "torch.ops.mylib.evil.default",
        "torch.ops.higher_order.call_torchbind",
        "builtins.eval",
        "os.system",
    ],
)
def test_non_compute_targets_are_refused(tmp_path: Path, target: str) -> None:
    real = small_pt2(tmp_path / "real.pt2")

    def swap(program: dict[str, Any]) -> None:
        program["graph_module"]["graph"]["nodes"][0]["target"] = target

    with pytest.raises(EngineError) as err:
        inspect_model(edit_program(real, tmp_path / "bad.pt2", swap))
    assert err.value.code == "unsupported_op" and target in err.value.detail
    json.dumps(err.value.detail)


def _expressions(value: Any) -> list[dict[str, Any]]:
    """The dicts holding an `expr_str` anywhere in a serialized program."""
    if isinstance(value, dict):
        found = [value] if isinstance(value.get("expr_str"), str) else []
        return found + [d for item in value.values() for d in _expressions(item)]
    if isinstance(value, list):
        return [d for item in value for d in _expressions(item)]
    return []


def test_a_symbolic_shape_that_runs_python_is_refused(
    tmp_path: Path, canary: tuple[Path, Path]
) -> None:
    """torch.export.load hands every `expr_str` to sympy.sympify, which evaluates Python."""
    _, target = canary
    real = small_pt2(tmp_path / "dynamic.pt2", dynamic=True)
    assert inspect_model(real)["inputs"][0]["shape"][0] == "batch"

    def payload(file: Path) -> str:
        return f"__import__('pathlib').Path({str(file)!r}).write_bytes(b'pwned')"

    def poison_with(file: Path) -> Any:
        def poison(program: dict[str, Any]) -> None:
            holders = _expressions(program)
            assert holders, "a dynamic export stores symbolic shapes"
            holders[0]["expr_str"] = payload(file)

        return poison

    # The attack is real: torch's own loader runs it.
    proof = tmp_path / "proof.txt"
    unguarded = edit_program(real, tmp_path / "unguarded.pt2", poison_with(proof))
    import torch

    with pytest.raises(Exception):  # noqa: B017 - whatever it raises, the code already ran
        torch.export.load(str(unguarded))
    assert proof.read_bytes() == b"pwned"

    job = tmp_path / "job"
    job.mkdir()
    hostile = edit_program(real, job / "model.pt2", poison_with(target))
    refused = _inspect_in_sandbox(hostile, job)
    assert refused.code == "unsupported_op" and refused.field == "file"
    assert "symbolic shape expression" in refused.detail and "__import__" in refused.detail
    with pytest.raises(EngineError) as err:  # refused before torch, outside the sandbox too
        inspect_model(hostile)
    assert err.value.code == "unsupported_op"
    assert target.read_bytes() == CANARY_TEXT
