"""Zip bombs in every .pt2 member are refused from the central directory, before any read."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from engine.errors import EngineError
from engine.io.formats import detect_format
from engine.spec import InspectSpec
from tests.security.model_code_files import rewrite, small_pt2
from worker import sandbox

BOMB_BYTES = 600 * 1024 * 1024
# Below the bomb's size: inflating it in memory would end in memory_limit_exceeded instead.
LIMITS = sandbox.Limits(wall_time_s=120, memory_mb=512)


@pytest.fixture(scope="module")
def real_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_pt2(tmp_path_factory.mktemp("pt2") / "real.pt2")


def _members(path: Path) -> dict[str, str]:
    with zipfile.ZipFile(path) as zf:
        return {n.split("/", 1)[1]: n for n in zf.namelist()}


@pytest.mark.slow
def test_archive_format_bomb_is_refused_at_detection(real_pt2: Path, tmp_path: Path) -> None:
    bomb = rewrite(real_pt2, tmp_path / "bomb.pt2", {"archive_format": ("bomb", BOMB_BYTES)})
    assert bomb.stat().st_size < 4 * 1024 * 1024
    with pytest.raises(EngineError) as err:
        detect_format(bomb)
    assert err.value.code == "archive_too_large" and "archive_format" in err.value.detail


@pytest.mark.slow
@pytest.mark.parametrize("member", ["models/model.json", "data/weights/weight_0"])
def test_member_bombs_are_refused_in_the_sandbox(
    real_pt2: Path, tmp_path: Path, member: str
) -> None:
    assert member in _members(real_pt2)
    job = tmp_path / "job"
    job.mkdir()
    bomb = rewrite(real_pt2, job / "model.pt2", {member: ("bomb", BOMB_BYTES)})
    with pytest.raises(sandbox.SandboxError) as err:
        sandbox.run(InspectSpec(model_path=str(bomb)), LIMITS, workdir=job)
    assert err.value.code == "archive_too_large", err.value.detail
    assert member in err.value.detail
    # Nothing was unpacked: the job directory holds only the upload.
    assert sorted(p.name for p in job.iterdir()) == ["model.pt2"]


def test_a_lying_size_header_stops_at_the_declared_size(real_pt2: Path, tmp_path: Path) -> None:
    """A member whose local data inflates past its declared size fails, it is not unpacked."""
    job = tmp_path / "job"
    job.mkdir()
    bomb = rewrite(real_pt2, tmp_path / "big.pt2", {"data/weights/weight_0": ("bomb", 8 << 20)})
    data = bytearray(bomb.read_bytes())
    with zipfile.ZipFile(bomb) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith("weights/weight_0"))
    # Patch the central directory's uncompressed size to claim 32 bytes (zip64 extra field).
    declared = (8 << 20).to_bytes(8, "little")
    at = data.rfind(declared)
    assert at > info.header_offset
    data[at : at + 8] = (32).to_bytes(8, "little")
    liar = job / "model.pt2"
    liar.write_bytes(bytes(data))
    with pytest.raises(sandbox.SandboxError) as err:
        sandbox.run(InspectSpec(model_path=str(liar)), LIMITS, workdir=job)
    assert err.value.code in {"invalid_model", "archive_too_large"}, err.value.detail
