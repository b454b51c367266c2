"""Issue #16 item 5: artifact download names `<model>-<job-short-id>-<step>-<op>.<ext>`, unique
per artifact, sent as RFC 6266 Content-Disposition (ASCII fallback + filename*=UTF-8'')."""

from __future__ import annotations

import re
from urllib.parse import unquote

import pytest

from app.api.downloads import content_disposition
from app.db.models import Artifact
from app.services.artifact_names import artifact_filename, safe_stem, short_id

JOB = "019ad5f3-7c2e-7a10-9b4e-5f3c9a1e0b7d"
OPS = ["prune", "distill", "weight_share"]


def _artifact(role: str, fmt: str, step: int | None = None) -> Artifact:
    return Artifact(job_id=JOB, role=role, format=fmt, step_index=step)


def test_names_say_model_job_step_and_op() -> None:
    names = [
        artifact_filename(_artifact("checkpoint", "pt2", 0), "digits", OPS),
        artifact_filename(_artifact("checkpoint", "pt2", 1), "digits", OPS),
        artifact_filename(_artifact("final", "onnx"), "digits", OPS),
        artifact_filename(_artifact("final", "cpz"), "digits", OPS),
    ]
    assert names == [
        "digits-9a1e0b7d-step0-prune.pt2",
        "digits-9a1e0b7d-step1-distill.pt2",
        "digits-9a1e0b7d-final-weight_share.onnx",
        "digits-9a1e0b7d-final-weight_share.cpz",
    ]
    assert len(set(names)) == len(names)


def test_short_id_is_the_random_tail_not_the_time_prefix() -> None:
    # two UUIDv7 made in the same minute share their first 8 hex digits
    other = "019ad5f3-7c2e-7a10-9b4e-00000000beef"
    assert short_id(JOB) == "9a1e0b7d" and short_id(other) == "0000beef"
    assert JOB[:8] == other[:8]


@pytest.mark.parametrize(
    ("name", "stem"),
    [
        ("模型 v2", "模型_v2"),
        ("../../etc/passwd", "etc_passwd"),
        ("line\r\nX-Injected: yes", "line_X-Injected_yes"),
        ('a "b" <c>|d?', "a_b_c_d"),
        ("", "model"),
        (None, "model"),
        ("...", "model"),
    ],
)
def test_model_names_become_safe_file_name_parts(name: str | None, stem: str) -> None:
    assert safe_stem(name) == stem
    assert len(safe_stem("x" * 500)) == 80


def test_a_deleted_model_or_unknown_step_still_gets_a_name() -> None:
    assert artifact_filename(_artifact("final", "onnx"), None, OPS).startswith("model-9a1e0b7d-")
    assert (
        artifact_filename(_artifact("final", "onnx"), "m", []) == "m-9a1e0b7d-final-original.onnx"
    )


def test_non_ascii_names_are_encoded_per_rfc_6266() -> None:
    name = artifact_filename(_artifact("final", "onnx"), "Modèle ü 模型", OPS)
    assert name == "Modèle_ü_模型-9a1e0b7d-final-weight_share.onnx"
    header = content_disposition(name)
    assert header.isascii()
    match = re.fullmatch(r'attachment; filename="([^"\\]*)"; filename\*=UTF-8\'\'(\S+)', header)
    assert match, header
    fallback, encoded = match.groups()
    assert fallback == "Modele_u___-9a1e0b7d-final-weight_share.onnx"
    assert unquote(encoded, encoding="utf-8") == name
