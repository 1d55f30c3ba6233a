"""The secrets a node needs, from an option, the file another option names, or (``--dev``)
a file generated beside the SQLite database: the JWT secret and the webhook signing secret.
A secret on the command line shows in ``ps``: the file is the way to give one."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from ..protocol.errors import ConfigError
from ..store import redact_url, sqlite_path
from .config import Settings, env_name

DEV_SECRET_NAME = "appchat-dev.secret"
MIN_WEBHOOK_SECRET = 32  # bytes, as for the HS256 secret


def secret_or_file(settings: Settings, name: str, what: str) -> bytes | None:
    """The secret option ``name`` (flag or environment), else the file that option
    ``name``_file names (stripped); ``None`` when neither is given, an error when both are.
    A secret on the command line shows in ``ps``: the file is the way to give one."""
    value: str | None = getattr(settings, name)
    path: str | None = getattr(settings, name + "_file")
    flag = "--" + name.replace("_", "-")
    if value and path:
        raise ConfigError(
            f"{what} is given twice: use {flag} ({env_name(name)}) "
            f"or {flag}-file ({env_name(name + '_file')}), not both"
        )
    if value:
        return value.encode()
    if path:
        try:
            return Path(path).read_text().strip().encode()
        except OSError as exc:
            raise ConfigError(f"cannot read {flag}-file: {exc}") from exc
    return None


def resolve_webhook_secret(settings: Settings) -> bytes | None:
    """The webhook signing secret (flag/env, else the file); ``None`` without webhook URLs."""
    if not settings.webhook_url:
        return None
    secret = secret_or_file(settings, "webhook_secret", "the webhook secret")
    if not secret:
        raise ConfigError(
            "--webhook-url needs a signing secret: --webhook-secret-file (or "
            "APPCHAT_WEBHOOK_SECRET, at least 32 bytes)"
        )
    if len(secret) < MIN_WEBHOOK_SECRET:
        raise ConfigError(
            f"the webhook secret has {len(secret)} bytes: use at least {MIN_WEBHOOK_SECRET}"
        )
    return secret


def dev_secret_path(database: str) -> Path | None:
    if not database.startswith("sqlite://"):
        return None
    db = Path(sqlite_path(database))
    return db.parent / DEV_SECRET_NAME


def resolve_secret(
    settings: Settings, *, use_dev_file: bool, create_dev_file: bool = False
) -> bytes:
    """The HS256 secret: flag/env, else the secret file, else the dev secret beside the database."""
    secret = secret_or_file(settings, "jwt_secret", "the JWT secret")
    if secret is not None:
        return secret
    path = dev_secret_path(settings.database)
    if use_dev_file and path is not None:
        if create_dev_file and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(48) + "\n")
        if path.exists():
            return path.read_text().strip().encode()
    if path is None and create_dev_file:
        raise ConfigError(
            f"no JWT secret: --dev keeps the secret it generates beside a SQLite database, "
            f"and {redact_url(settings.database)} is not one: set APPCHAT_JWT_SECRET "
            "(at least 32 bytes) or pass --jwt-secret-file"
        )
    if path is None:  # no dev secret can exist: --dev would not help
        raise ConfigError(
            "no JWT secret: set APPCHAT_JWT_SECRET (at least 32 bytes) or pass --jwt-secret-file"
        )
    raise ConfigError(
        "no JWT secret: set APPCHAT_JWT_SECRET (at least 32 bytes), pass --jwt-secret-file, "
        "or try it out with `appchat serve --dev`"
    )
