"""The `compaas` command in this process: admin against a named database, team names, decode
without onnx, the saved profile and the team commands' usage errors and exit codes."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from app.cli import main as cli_main
from compaas import config
from compaas.cli import ExitCode


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in [k for k in os.environ if k.startswith("COMPAAS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    from app.security import data_dir_pepper

    data_dir_pepper.cache_clear()


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli_main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_admin_uses_the_data_dir_it_is_given_and_names_the_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    served, elsewhere = tmp_path / "srv" / "var", tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, out, err = run(
        capsys, "admin", "create-team", "alpha", "--data-dir", str(served), "--json"
    )
    assert code == 0, err
    issued = json.loads(out)  # stdout is the JSON alone
    assert issued["api_key"].startswith("cmp_")
    database = served.resolve() / "compaas.db"
    assert f"database: sqlite:///{database}" in err
    assert "no database" in err  # it was made now, and the command says so
    assert database.exists() and not (elsewhere / "var").exists()

    # the second command finds that database, says which, and has nothing new to report
    code, out, err = run(capsys, "admin", "list-keys", "alpha", "--data-dir", str(served), "--json")
    assert code == 0 and [k["prefix"] for k in json.loads(out)] == [issued["prefix"]]
    assert f"database: sqlite:///{database}" in err and "no database" not in err

    # without --data-dir, from another directory: a different, new database, said loudly
    code, out, err = run(capsys, "admin", "list-keys", "--json")
    assert code == 0 and json.loads(out) == []
    assert f"{elsewhere.resolve() / 'var' / 'compaas.db'}" in err
    assert "no database" in err and "--data-dir" in err

    # --database-url names the database outright
    url = f"sqlite:///{database}"
    code, out, err = run(capsys, "admin", "list-keys", "--database-url", url, "--json")
    assert code == 0 and len(json.loads(out)) == 1 and f"database: {url}" in err


@pytest.mark.parametrize("name", ["", "   ", "bad\nname", "x" * 201])
def test_an_empty_or_unprintable_team_name_is_refused(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "var"
    code, out, err = run(capsys, "admin", "create-team", name, "--data-dir", str(data_dir))
    assert code == 2 and out == ""
    assert "team name" in err
    assert not data_dir.exists()  # refused before any database is touched


def test_a_duplicate_team_name_is_refused_ignoring_case(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = str(tmp_path / "var")
    code, out, _ = run(capsys, "admin", "create-team", " Alpha ", "--data-dir", data_dir, "--json")
    assert code == 0
    team_id = json.loads(out)["team_id"]
    code, out, err = run(capsys, "admin", "create-team", "alpha", "--data-dir", data_dir)
    assert code == 2 and out == ""
    assert "already exists" in err and team_id in err and "create-key" in err
    code, out, _ = run(capsys, "admin", "list-keys", "--data-dir", data_dir, "--json")
    assert [k["team"] for k in json.loads(out)] == ["Alpha"]  # stored stripped, and once


def test_decode_without_onnx_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delitem(sys.modules, "engine.io.cpz", raising=False)
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` fails as if not installed
    code, out, err = run(capsys, "decode", str(tmp_path / "model.cpz"))
    assert code == 2 and out == ""
    assert "'onnx'" in err and "pip install 'compaas[decode]'" in err
    assert "Traceback" not in err and "ModuleNotFoundError" not in err


def test_options_have_help_and_show_their_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "up", "--help")
    assert code == 0
    text = " ".join(out.split())
    for option, default in (("--host", "127.0.0.1"), ("--port", "8000"), ("--concurrency", "1")):
        assert option in text and f"[default: {default}]" in text
    assert "Address to listen on" in text and "var" in text


def test_the_profile_is_private_and_the_environment_overrides_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = config.save_profile("http://api.example:8000/", "cmp_saved")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert config.resolve() == config.Profile(
        "http://api.example:8000", "cmp_saved", f"url from {path}, key from {path}"
    )
    monkeypatch.setenv("COMPAAS_API_KEY", "cmp_env")
    monkeypatch.setenv("COMPAAS_URL", "http://other:1")
    resolved = config.resolve()
    assert (resolved.url, resolved.api_key) == ("http://other:1", "cmp_env")
    assert config.resolve("http://arg:2", "cmp_arg").api_key == "cmp_arg"


def test_team_commands_refuse_bad_usage_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "jobs", "list", "--json")
    assert code == ExitCode.USAGE and "compaas login" in err
    assert json.loads(out)["error"]["exit_code"] == 2  # --json: the error as JSON on stdout
    pipeline = tmp_path / "p.json"
    pipeline.write_text("[]")
    code, _, err = run(
        capsys,
        "jobs",
        "create",
        "--model",
        "m",
        "--preset",
        "fp16",
        "--pipeline",
        str(pipeline),
        "--key",
        "cmp_x",
    )
    assert code == ExitCode.USAGE and "exactly one of --preset" in err
    for bad in ("max_accuracy_drop", "max_accuracy_drop=one", "=0.1"):
        code, _, err = run(
            capsys,
            *("jobs", "create", "--model", "m", "--preset", "auto", "--budget", bad),
            *("--key", "cmp_x", "--url", "http://127.0.0.1:9"),
        )
        assert code == ExitCode.USAGE and "is not KEY=NUMBER" in err, err
    code, _, err = run(capsys, "models", "upload", str(tmp_path / "missing.onnx"), "--key", "k")
    assert code == ExitCode.USAGE and "no such file" in err
