"""Tokens: verify a JWT into claims, bind claims and the query ``sid`` to a :class:`Principal`.

Keys and the clock are passed in; nothing here reads globals or the environment.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ..protocol.errors import ConfigError, Unauthorized
from ..protocol.models import MAX_ID, Principal, Role

MIN_HS256_SECRET = 32  # bytes, RFC 7518 section 3.2
MAX_NAME = 100  # characters of the display `name` claim


def parse_id(value: Any) -> int | None:
    """A positive 64-bit id given as a JSON integer or a decimal string; else ``None``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        if not value.isascii() or not value.isdigit() or len(value) > 19:
            return None
        value = int(value)
    if isinstance(value, int) and 1 <= value <= MAX_ID:
        return value
    return None


@dataclass(frozen=True, slots=True)
class IdRanges:
    """Participant ids given as ``N`` or ``N-M``, several separated by commas
    (``--api-sender-ids``); empty: none."""

    ranges: tuple[tuple[int, int], ...] = ()

    @classmethod
    def parse(cls, items: Sequence[str], option: str = "--api-sender-ids") -> IdRanges:
        ranges = []
        for item in (part for given in items for part in given.split(",") if part.strip()):
            low, sep, high = item.strip().partition("-")
            first, last = parse_id(low.strip()), parse_id(high.strip() if sep else low.strip())
            if first is None or last is None or first > last:
                raise ConfigError(
                    f"{option} {item!r}: expected an id N or a range N-M of ids from 1 to {MAX_ID}"
                )
            ranges.append((first, last))
        return cls(tuple(sorted(ranges)))

    def __contains__(self, value: object) -> bool:
        return isinstance(value, int) and any(lo <= value <= hi for lo, hi in self.ranges)

    def __bool__(self) -> bool:
        return bool(self.ranges)

    def __str__(self) -> str:
        return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in self.ranges)


NO_IDS = IdRanges()


@dataclass(frozen=True, slots=True)
class Claims:
    role: Role
    subject_id: int  # admin_id or request_id
    participant_id: int | None  # from a numeric ``sid`` or ``sub`` claim
    exp: float
    name: str | None = None  # the optional display ``name`` claim

    @property
    def subject(self) -> str:
        return f"{'admin' if self.role is Role.STAFF else 'request'}:{self.subject_id}"


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """One key a token may be signed with, bound to exactly one algorithm."""

    kid: str | None
    algorithm: str  # "HS256", "RS256" or "ES256"
    key: Any  # bytes for HS256, a public key object for RS256/ES256


def hs256_key(secret: bytes, kid: str | None = None) -> VerificationKey:
    if len(secret) < MIN_HS256_SECRET:
        raise ConfigError(
            f"the JWT secret is {len(secret)} bytes; HS256 needs at least "
            f"{MIN_HS256_SECRET} (RFC 7518)"
        )
    try:
        jwt.encode({}, secret, algorithm="HS256")
    except jwt.InvalidKeyError as exc:
        raise ConfigError(f"the JWT secret cannot be an HS256 key: {exc}") from exc
    return VerificationKey(kid, "HS256", secret)


def public_key(spec: str) -> VerificationKey:
    """``[KID=]PATH`` of a PEM public key: RSA (2048 bits or more) -> RS256, P-256 -> ES256."""
    kid, sep, path = spec.partition("=")
    if not sep:
        kid, path = "", spec
    try:
        loaded = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the public key {path!r}: {exc}") from exc
    if isinstance(loaded, rsa.RSAPublicKey):
        if loaded.key_size < 2048:
            raise ConfigError(f"{path}: RSA keys need at least 2048 bits")
        algorithm = "RS256"
    elif isinstance(loaded, ec.EllipticCurvePublicKey) and loaded.curve.name == "secp256r1":
        algorithm = "ES256"
    else:
        raise ConfigError(f"{path}: expected an RSA or P-256 public key")
    return VerificationKey(kid or None, algorithm, loaded)


class TokenVerifier:
    """Checks signature, algorithm and lifetime of a token and reads its claims.

    Several keys may be configured at once (rotation): a token's ``kid`` header picks
    its key; a token without one (or with a kid no key has) is tried against the keys
    configured without a kid.
    Each key verifies only its own algorithm, so no HS/RS confusion is possible.
    """

    def __init__(
        self,
        secret: bytes | None = None,
        *,
        keys: Sequence[VerificationKey] = (),
        clock: Callable[[], float] = time.time,
        leeway: float = 0.0,
    ) -> None:
        self._keys = list(keys)
        if secret is not None:
            self._keys.insert(0, hs256_key(secret))
        if not self._keys:
            raise ConfigError("no key to verify tokens with")
        self._clock = clock
        self._leeway = leeway

    def _candidates(self, token: str) -> list[VerificationKey]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise Unauthorized("token is malformed") from None
        # A kid picks its keys; an unknown or absent kid falls back to the keys configured
        # without one (issuers often add a kid the server was not told about).
        kid = header.get("kid")
        keys = [k for k in self._keys if kid is not None and k.kid == kid]
        if not keys:
            keys = [k for k in self._keys if k.kid is None]
        if not keys:
            raise Unauthorized("token key id is not known")
        keys = [k for k in keys if k.algorithm == header.get("alg")]
        if not keys:
            raise Unauthorized("token algorithm is not allowed")
        return keys

    def verify(self, token: str) -> Claims:
        for key in self._candidates(token):
            try:
                return self._claims(self._decode(token, key))
            except jwt.InvalidSignatureError:
                continue
        raise Unauthorized("token signature is invalid")

    @staticmethod
    def _decode(token: str, key: VerificationKey) -> dict[str, Any]:
        try:
            payload: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=[key.algorithm],
                # Lifetime is checked below with the injected clock; PyJWT would also
                # refuse the original's ``"iat": null`` and non-string ``sub``.
                options={
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_sub": False,
                    "verify_jti": False,
                    "require": ["exp"],
                },
            )
        except jwt.InvalidSignatureError:
            raise
        except jwt.MissingRequiredClaimError:
            raise Unauthorized("token has no exp claim") from None
        except jwt.InvalidAlgorithmError:
            raise Unauthorized("token algorithm is not allowed") from None
        except jwt.InvalidAudienceError:
            raise Unauthorized("token audience is not accepted") from None
        except jwt.InvalidTokenError:
            raise Unauthorized("token is malformed") from None
        return payload

    def _claims(self, payload: dict[str, Any]) -> Claims:
        aud = payload.get("aud")
        if aud is not None and aud != "":
            # PyJWT lets every falsy audience through (0, false, {}, []); only an absent,
            # null or empty one is accepted (no audience is configured).
            raise Unauthorized("token audience is not accepted")
        now = self._clock()
        exp = payload["exp"]
        if not _is_number(exp):
            raise Unauthorized("token exp must be a number")
        if exp <= now - self._leeway:
            raise Unauthorized("token has expired")
        nbf = payload.get("nbf")
        if nbf is not None:
            if not _is_number(nbf):
                raise Unauthorized("token nbf must be a number")
            if nbf > now + self._leeway:
                raise Unauthorized("token is not valid yet")
        iat = payload.get("iat")
        if iat is not None and not _is_number(iat):
            raise Unauthorized("token iat must be a number or null")

        has_admin = payload.get("admin_id") is not None
        has_request = payload.get("request_id") is not None
        if has_admin and has_request:
            raise Unauthorized("token carries both admin_id and request_id")
        if not has_admin and not has_request:
            raise Unauthorized("token carries neither admin_id nor request_id")
        role = Role.STAFF if has_admin else Role.CUSTOMER
        subject_id = parse_id(payload["admin_id" if has_admin else "request_id"])
        if subject_id is None:
            raise Unauthorized(f"token {'admin_id' if has_admin else 'request_id'} is not an id")

        participant_id = None
        for claim in ("sid", "sub"):
            if payload.get(claim) not in (None, ""):
                participant_id = parse_id(payload[claim])
                if participant_id is not None:
                    break
        return Claims(
            role=role,
            subject_id=subject_id,
            participant_id=participant_id,
            exp=exp,
            name=display_name(payload.get("name")),
        )


def display_name(value: Any) -> str | None:
    """The ``name`` claim when it is a string of 1 to ``MAX_NAME`` characters without
    control characters (it is shown on every page); anything else counts as no name. A
    token is never refused for its name: the original server ignored the claim, and a
    host's tokens may carry a ``name`` (an OpenID Connect claim) of their own."""
    if (
        not isinstance(value, str)
        or not value
        or len(value) > MAX_NAME
        or any(ch < " " or "\x7f" <= ch <= "\x9f" for ch in value)
    ):
        return None
    return value


def _is_number(value: Any) -> bool:
    """A finite JSON number (PyJWT's decoder also lets NaN and Infinity through); an
    integer must fit in 64 bits (``10**400`` is valid JSON but no float, and no reply
    could carry it)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return -MAX_ID - 1 <= value <= MAX_ID
    return isinstance(value, float) and math.isfinite(value)


def named_participant(claims: Claims, *, trust_query_sid: bool = False) -> int | None:
    """The participant the token names: its ``sid``/``sub``, else a staff token's own id
    (unless query sids are trusted); ``None``: the request must name one."""
    named = claims.participant_id
    if named is None and claims.role is Role.STAFF and not trust_query_sid:
        named = claims.subject_id
    return named


def bind(
    claims: Claims,
    query_sid: int,
    *,
    trust_query_sid: bool = False,
    reserved: IdRanges = NO_IDS,
) -> Principal:
    """Decide who a connection is: the token names the participant, the query must agree.
    ``reserved``: ids no customer may be (the server API's senders)."""
    named = named_participant(claims, trust_query_sid=trust_query_sid)
    if named is not None and named != query_sid:
        raise Unauthorized(f"sid {query_sid} does not match the token's participant {named}")
    if claims.role is Role.CUSTOMER and query_sid in reserved:
        raise Unauthorized(
            f"sid {query_sid} is reserved for the server API: no customer may use it"
        )
    return Principal(
        sid=query_sid,
        role=claims.role,
        application_id=claims.subject_id if claims.role is Role.CUSTOMER else None,
        bound=named is not None,
        exp=claims.exp,
        subject=claims.subject,
        name=claims.name,
    )


def mint(
    secret: bytes,
    *,
    admin_id: int | None = None,
    request_id: int | None = None,
    sid: int | None = None,
    ttl: float = 3600,
    now: float | None = None,
    name: str | None = None,
) -> str:
    """Sign a token for trying the server out (and for tests)."""
    if (admin_id is None) == (request_id is None):
        raise ValueError("give exactly one of admin_id and request_id")
    issued = time.time() if now is None else now
    payload: dict[str, Any] = {"iat": int(issued), "exp": int(issued + ttl)}
    if admin_id is not None:
        payload["admin_id"] = admin_id
    else:
        payload["request_id"] = request_id
    if sid is not None:
        payload["sid"] = sid
    if name is not None:
        payload["name"] = name
    return jwt.encode(payload, secret, algorithm="HS256")
