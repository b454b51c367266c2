"""Where the client finds the API: arguments, then COMPAAS_URL / COMPAAS_API_KEY, then the
profile `compaas login` saved ($XDG_CONFIG_HOME/compaas/config.json, else ~/.config/...)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:8000"
URL_ENV = "COMPAAS_URL"
KEY_ENV = "COMPAAS_API_KEY"


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "compaas"


def profile_path() -> Path:
    return config_dir() / "config.json"


@dataclass(frozen=True)
class Profile:
    url: str
    api_key: str | None
    source: str  # where the values came from, for messages


def save_profile(url: str, api_key: str) -> Path:
    """Write the profile, readable by its owner only (0600, directory 0700)."""
    path = profile_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    body = json.dumps({"url": url.rstrip("/"), "api_key": api_key}, indent=2) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an older file keeps its mode on open; tighten it
        os.write(fd, body.encode())
    finally:
        os.close(fd)
    return path


def load_saved() -> dict[str, str]:
    path = profile_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the compaas profile {path}: {exc}") from exc
    return {k: str(v) for k, v in data.items() if k in ("url", "api_key") and v}


def _first(*candidates: tuple[str | None, str]) -> tuple[str | None, str]:
    for value, source in candidates:
        if value:
            return value, source
    return None, "nowhere"


def resolve(url: str | None = None, api_key: str | None = None) -> Profile:
    """Arguments win, then the environment, then the saved profile, then the local default."""
    saved = load_saved()
    saved_from = str(profile_path())
    chosen_url, url_from = _first(
        (url, "argument"),
        (os.environ.get(URL_ENV), URL_ENV),
        (saved.get("url"), saved_from),
        (DEFAULT_URL, "default"),
    )
    chosen_key, key_from = _first(
        (api_key, "argument"),
        (os.environ.get(KEY_ENV), KEY_ENV),
        (saved.get("api_key"), saved_from),
    )
    return Profile(
        url=(chosen_url or DEFAULT_URL).rstrip("/"),
        api_key=chosen_key,
        source=f"url from {url_from}, key from {key_from}",
    )
