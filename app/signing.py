"""The deployment's ed25519 signing key: configured in production, made once in embedded mode."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from app.config import Settings
from app.errors import Unavailable
from engine.provenance import (
    ProvenanceError,
    keyid,
    load_private_key,
    load_public_key,
    private_pem,
    public_pem,
)

SIGNING_KEY_FILE = "signing_key.pem"
MAKE_KEY = "openssl genpkey -algorithm ed25519 -out signing_key.pem"


@dataclass(frozen=True)
class PublicKey:
    """A key GET /v1/keys serves; `current` is the one new statements are signed with."""

    keyid: str
    pem: str
    current: bool
    key: Ed25519PublicKey


def signing_key_path(settings: Settings) -> Path | None:
    """COMPAAS_SIGNING_KEY_FILE, or DATA_DIR/signing_key.pem in embedded mode (None: unset in
    production)."""
    if settings.signing_key_file is not None:
        return settings.signing_key_file.resolve()
    if settings.mode == "embedded":
        return settings.data_dir.resolve() / SIGNING_KEY_FILE
    return None


def signing_key(settings: Settings) -> Ed25519PrivateKey:
    """The key that signs provenance statements; Unavailable when production configured none."""
    path = signing_key_path(settings)
    if path is None:
        raise Unavailable(
            "signing_key_unconfigured",
            "This deployment has no provenance signing key. An operator sets "
            f"COMPAAS_SIGNING_KEY_FILE to an ed25519 private key PEM (`{MAKE_KEY}`, mode 0600).",
        )
    return _load_or_create(path, create=settings.signing_key_file is None)


def _load_or_create(path: Path, create: bool) -> Ed25519PrivateKey:
    if create and not path.exists():
        _create(path)
    try:
        return load_private_key(path.read_bytes())
    except (OSError, ValueError, ProvenanceError) as exc:
        raise RuntimeError(
            f"{path}: not a readable ed25519 private key PEM ({exc}); make one with `{MAKE_KEY}`"
        ) from exc


def _create(path: Path) -> None:
    """Write a new random key (mode 0600); a concurrent first start keeps exactly one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private_pem(Ed25519PrivateKey.generate()))
    try:
        os.link(tmp, path)  # atomic and never replaces an existing key
    except FileExistsError:
        pass
    finally:
        tmp.unlink()


def public_keys(settings: Settings) -> list[PublicKey]:
    """The current key, then each retired one still trusted
    (COMPAAS_SIGNING_PREVIOUS_PUBLIC_KEYS)."""
    current = signing_key(settings).public_key()
    keys = [PublicKey(keyid(current), public_pem(current), True, current)]
    for name in settings.signing_previous_public_keys.split(","):
        if name.strip():
            old = load_public_key(Path(name.strip()).read_bytes())
            keys.append(PublicKey(keyid(old), public_pem(old), False, old))
    return keys
