"""Tokens, pure: TokenVerifier (signature, algorithm, lifetime, claims), bind and mint."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from appchat.auth.tokens import (
    MIN_HS256_SECRET,
    Claims,
    IdRanges,
    TokenVerifier,
    bind,
    mint,
    parse_id,
)
from appchat.protocol.errors import ConfigError, Unauthorized
from appchat.protocol.models import MAX_ID, Principal, Role

SECRET = b"auth-tests-secret-0123456789abcdef"  # 34 bytes
NOW = 1_700_000_000.0
HS256_HEADER = b'{"typ":"JWT","alg":"HS256"}'


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_signed(
    payload: bytes,
    *,
    header: bytes = HS256_HEADER,
    key: bytes = SECRET,
    digest: Any = hashlib.sha256,
) -> str:
    """A JWS built byte for byte, so the claims are exactly what the test wrote."""
    signing_input = f"{b64url(header)}.{b64url(payload)}"
    signature = hmac.new(key, signing_input.encode(), digest).digest()
    return f"{signing_input}.{b64url(signature)}"


def token(claims: dict[str, Any], **kw: Any) -> str:
    return hand_signed(json.dumps(claims).encode(), **kw)


@pytest.fixture
def verifier() -> TokenVerifier:
    return TokenVerifier(SECRET, clock=lambda: NOW)


def rejected(verifier: TokenVerifier, tok: str) -> Unauthorized:
    with pytest.raises(Unauthorized) as info:
        verifier.verify(tok)
    assert info.value.code == "unauthorized"
    return info.value


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


# --- the original's token -------------------------------------------------------------------


def test_token_of_exactly_the_originals_shape_is_accepted(verifier: TokenVerifier) -> None:
    exp = int(NOW) + 3600
    payload = f'{{"iss":"","iat":null,"exp":{exp},"aud":"","sub":"","admin_id":"1"}}'.encode()
    claims = verifier.verify(hand_signed(payload))
    assert claims == Claims(role=Role.STAFF, subject_id=1, participant_id=None, exp=exp)
    assert claims.subject == "admin:1"
    # the participant comes from admin_id: sid 1 binds, as staff
    principal = bind(claims, 1)
    assert principal == Principal(
        sid=1, role=Role.STAFF, application_id=None, bound=True, exp=exp, subject="admin:1"
    )
    assert principal.is_staff


def test_the_display_name_claim(verifier: TokenVerifier) -> None:
    base = {"exp": NOW + 60, "request_id": 100, "sid": 7}

    def signed(**extra: object) -> str:
        return jwt.encode({**base, **extra}, SECRET, algorithm="HS256")

    assert verifier.verify(signed()).name is None
    for empty in (None, ""):
        assert verifier.verify(signed(name=empty)).name is None
    for name in ("Anna (support)", "Анна", "x" * 100):
        claims = verifier.verify(signed(name=name))
        assert claims.name == name and bind(claims, 7).name == name
    # A name that is no short line of text counts as none; the token stays good (the
    # original ignored the claim, and a host's tokens may carry one of their own).
    for bad in ("x" * 101, "line\nbreak", "nul\x00", "\x85", 5, ["Anna"], {"n": 1}, True):
        claims = verifier.verify(signed(name=bad))
        assert claims.name is None and claims.participant_id == 7, bad


def test_the_originals_shape_via_pyjwt_encode(verifier: TokenVerifier) -> None:
    claims = {"iss": "", "iat": None, "exp": NOW + 60, "aud": "", "sub": "", "admin_id": "1"}
    assert verifier.verify(jwt.encode(claims, SECRET, algorithm="HS256")).subject_id == 1


def test_customer_token_with_string_request_id(verifier: TokenVerifier) -> None:
    claims = verifier.verify(token({"exp": NOW + 60, "request_id": "100"}))
    assert claims == Claims(Role.CUSTOMER, 100, None, NOW + 60)
    assert claims.subject == "request:100"


# --- lifetime -------------------------------------------------------------------------------


def test_expiry_follows_the_injected_clock() -> None:
    now = [NOW]
    verifier = TokenVerifier(SECRET, clock=lambda: now[0])
    tok = token({"exp": NOW + 10, "admin_id": 1})
    assert verifier.verify(tok).exp == NOW + 10
    now[0] = NOW + 9.999
    assert verifier.verify(tok).exp == NOW + 10
    now[0] = NOW + 10  # exp is the first instant the token is no longer valid
    assert "expired" in rejected(verifier, tok).message
    now[0] = NOW + 10_000
    rejected(verifier, tok)


def test_expired_token(verifier: TokenVerifier) -> None:
    assert "expired" in rejected(verifier, token({"exp": NOW - 1, "admin_id": 1})).message
    rejected(verifier, token({"exp": 0, "request_id": 1}))


def test_leeway_tolerates_a_little_clock_skew() -> None:
    lenient = TokenVerifier(SECRET, clock=lambda: NOW, leeway=30)
    assert lenient.verify(token({"exp": NOW - 10, "admin_id": 1})).exp == NOW - 10
    rejected(lenient, token({"exp": NOW - 31, "admin_id": 1}))
    assert lenient.verify(token({"exp": NOW + 60, "nbf": NOW + 10, "admin_id": 1}))
    rejected(lenient, token({"exp": NOW + 60, "nbf": NOW + 31, "admin_id": 1}))


def test_missing_exp(verifier: TokenVerifier) -> None:
    assert "exp" in rejected(verifier, token({"admin_id": 1})).message
    rejected(verifier, token({"admin_id": 1, "exp": None}))


@pytest.mark.parametrize("exp", [str(int(NOW) + 60), "tomorrow", True, [NOW + 60], {"t": 1}])
def test_exp_must_be_a_number(verifier: TokenVerifier, exp: Any) -> None:
    rejected(verifier, token({"exp": exp, "admin_id": 1}))


def test_float_exp_is_a_number(verifier: TokenVerifier) -> None:
    assert verifier.verify(token({"exp": NOW + 0.5, "admin_id": 1})).exp == NOW + 0.5


@pytest.mark.parametrize("iat", [str(int(NOW)), "now", True, [1]])
def test_iat_must_be_a_number_or_null(verifier: TokenVerifier, iat: Any) -> None:
    assert "iat" in rejected(verifier, token({"exp": NOW + 60, "iat": iat, "admin_id": 1})).message


@pytest.mark.parametrize("iat", [None, int(NOW), NOW - 0.5])
def test_iat_number_or_null_is_fine(verifier: TokenVerifier, iat: Any) -> None:
    assert verifier.verify(token({"exp": NOW + 60, "iat": iat, "admin_id": 1})).subject_id == 1


def test_nbf_in_the_future(verifier: TokenVerifier) -> None:
    tok = token({"exp": NOW + 60, "nbf": NOW + 1, "admin_id": 1})
    assert "not valid yet" in rejected(verifier, tok).message
    assert verifier.verify(token({"exp": NOW + 60, "nbf": NOW, "admin_id": 1}))
    assert verifier.verify(token({"exp": NOW + 60, "nbf": NOW - 100, "admin_id": 1}))
    rejected(verifier, token({"exp": NOW + 60, "nbf": "soon", "admin_id": 1}))


# --- signature and algorithm ----------------------------------------------------------------


def test_alg_none_is_rejected(verifier: TokenVerifier) -> None:
    payload = json.dumps({"exp": NOW + 60, "admin_id": 1}).encode()
    for header in (b'{"alg":"none"}', b'{"alg":"none","typ":"JWT"}', b'{"alg":"None"}'):
        unsigned = f"{b64url(header)}.{b64url(payload)}."
        rejected(verifier, unsigned)
    # and the same with a (meaningless) signature attached
    none_header = b64url(b'{"alg":"none"}')
    rejected(verifier, f"{none_header}.{b64url(payload)}.{b64url(b'sig')}")


@pytest.mark.parametrize("alg", ["HS384", "HS512"])
def test_other_hmac_algorithms_with_the_same_secret_are_rejected(alg: str) -> None:
    secret = b"h" * 64  # long enough for HS512, so PyJWT signs without a warning
    verifier = TokenVerifier(secret, clock=lambda: NOW)
    tok = jwt.encode({"exp": NOW + 60, "admin_id": 1}, secret, algorithm=alg)
    assert jwt.decode(tok, secret, algorithms=[alg], options={"verify_exp": False})  # valid
    assert "algorithm" in rejected(verifier, tok).message
    # the same, signed by hand with the 34-byte secret of the other tests
    digest = {"HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    header = json.dumps({"alg": alg, "typ": "JWT"}).encode()
    by_hand = token({"exp": NOW + 60, "admin_id": 1}, header=header, digest=digest)
    rejected(TokenVerifier(SECRET, clock=lambda: NOW), by_hand)


def test_rs256_token_is_rejected(verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey) -> None:
    tok = jwt.encode({"exp": NOW + 60, "admin_id": 1}, rsa_key, algorithm="RS256")
    assert jwt.decode(
        tok, rsa_key.public_key(), algorithms=["RS256"], options={"verify_exp": False}
    )
    rejected(verifier, tok)


def test_hs_rs_key_confusion_is_rejected(
    verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey
) -> None:
    # The classic attack: sign HS256 with the server's *public* RSA key as the HMAC secret.
    pem = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    tok = token({"exp": NOW + 60, "admin_id": 1}, key=pem)
    assert "signature" in rejected(verifier, tok).message


def test_bad_signature(verifier: TokenVerifier) -> None:
    good = token({"exp": NOW + 60, "admin_id": 1})
    assert verifier.verify(good).subject_id == 1
    other_secret = token({"exp": NOW + 60, "admin_id": 1}, key=b"x" * 32)
    assert "signature" in rejected(verifier, other_secret).message
    head, payload, sig = good.split(".")
    flipped = sig[:-2] + ("AA" if sig[-2:] != "AA" else "BA")
    rejected(verifier, f"{head}.{payload}.{flipped}")
    # a payload swapped under the original signature
    forged = b64url(json.dumps({"exp": NOW + 60, "admin_id": 2}).encode())
    rejected(verifier, f"{head}.{forged}.{sig}")
    rejected(verifier, f"{head}.{payload}.")


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "abc",
        "a.b",
        "a.b.c",
        "...",
        "a.b.c.d",
        "eyJ.eyJ.sig",
        "ü.ö.ä",
        "x" * 10_000,
        "Bearer " + "x" * 20,
        b64url(b"[]") + "." + b64url(b"{}") + ".",
    ],
)
def test_garbage_tokens(verifier: TokenVerifier, garbage: str) -> None:
    rejected(verifier, garbage)


def test_payload_that_is_not_an_object(verifier: TokenVerifier) -> None:
    rejected(verifier, hand_signed(b"[1, 2]"))
    rejected(verifier, hand_signed(b'"admin"'))
    rejected(verifier, hand_signed(b"not json"))


# --- role claims ----------------------------------------------------------------------------


def test_both_admin_id_and_request_id(verifier: TokenVerifier) -> None:
    tok = token({"exp": NOW + 60, "admin_id": 1, "request_id": 100})
    assert "both" in rejected(verifier, tok).message


def test_neither_admin_id_nor_request_id(verifier: TokenVerifier) -> None:
    assert "neither" in rejected(verifier, token({"exp": NOW + 60})).message
    rejected(verifier, token({"exp": NOW + 60, "admin_id": None, "request_id": None}))
    rejected(verifier, token({"exp": NOW + 60, "sid": 1, "sub": "1"}))


NOT_IDS = ["abc", 0, -1, True, False, 2**63, "0", "-1", "", " 1", "1.5", 1.5, "0x1", "٣", [1]]


@pytest.mark.parametrize("value", NOT_IDS, ids=repr)
@pytest.mark.parametrize("claim", ["admin_id", "request_id"])
def test_role_claim_must_be_an_id(verifier: TokenVerifier, claim: str, value: Any) -> None:
    rejected(verifier, token({"exp": NOW + 60, claim: value}))


@pytest.mark.parametrize(
    ("value", "expected"), [(1, 1), ("1", 1), (MAX_ID, MAX_ID), (str(MAX_ID), MAX_ID)]
)
def test_role_claim_ids(verifier: TokenVerifier, value: Any, expected: int) -> None:
    assert verifier.verify(token({"exp": NOW + 60, "admin_id": value})).subject_id == expected


def test_parse_id() -> None:
    assert parse_id(5) == 5
    assert parse_id("5") == 5
    assert parse_id(MAX_ID) == MAX_ID
    for value in [*NOT_IDS, None, str(2**63), "9" * 25, 5.0]:
        assert parse_id(value) is None, value


# --- participant claims ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "participant"),
    [
        ({"sid": 7}, 7),
        ({"sid": "7"}, 7),
        ({"sub": "5"}, 5),
        ({"sub": 5}, 5),
        ({"sid": 7, "sub": "5"}, 7),  # sid wins over sub
        ({"sid": "7", "sub": 5}, 7),
        ({"sid": "abc", "sub": "5"}, 5),  # a non-numeric sid falls back to sub
        ({"sub": "user@example.com"}, None),
        ({"sub": ""}, None),
        ({"sid": ""}, None),
        ({"sid": 0}, None),
        ({"sid": True}, None),
        ({"sid": 7.5}, None),
        ({}, None),
    ],
)
def test_participant_claim(
    verifier: TokenVerifier, extra: dict[str, Any], participant: Any
) -> None:
    for role_claim in ({"admin_id": 1}, {"request_id": 100}):
        claims = verifier.verify(token({"exp": NOW + 60, **role_claim, **extra}))
        assert claims.participant_id == participant


# --- secrets --------------------------------------------------------------------------------


@pytest.mark.parametrize("secret", [b"", b"short", b"x" * 31])
def test_short_secret_is_a_config_error(secret: bytes) -> None:
    with pytest.raises(ConfigError) as info:
        TokenVerifier(secret)
    assert "32" in str(info.value)


def test_32_byte_secret_is_enough() -> None:
    assert MIN_HS256_SECRET == 32
    secret = b"y" * 32
    tok = mint(secret, admin_id=3, now=NOW, ttl=60)
    assert TokenVerifier(secret, clock=lambda: NOW).verify(tok).subject_id == 3


# --- bind -----------------------------------------------------------------------------------


def claims_of(verifier: TokenVerifier, **claims: Any) -> Claims:
    return verifier.verify(token({"exp": NOW + 60, **claims}))


def test_staff_token_names_admin_id_as_participant(verifier: TokenVerifier) -> None:
    staff = claims_of(verifier, admin_id="1")
    with pytest.raises(Unauthorized):
        bind(staff, 2)
    principal = bind(staff, 1)
    assert (principal.sid, principal.bound, principal.role) == (1, True, Role.STAFF)


def test_trust_query_sid_takes_the_query_for_staff(verifier: TokenVerifier) -> None:
    staff = claims_of(verifier, admin_id="1")
    principal = bind(staff, 2, trust_query_sid=True)
    assert principal == Principal(
        sid=2, role=Role.STAFF, application_id=None, bound=False, exp=NOW + 60, subject="admin:1"
    )


def test_staff_with_participant_claim(verifier: TokenVerifier) -> None:
    staff = claims_of(verifier, admin_id=1, sid=5)
    assert bind(staff, 5).sid == 5
    assert bind(staff, 5).bound is True
    for trust in (False, True):
        with pytest.raises(Unauthorized):
            bind(staff, 1, trust_query_sid=trust)


def test_customer_without_participant_claim_takes_the_query_sid(verifier: TokenVerifier) -> None:
    customer = claims_of(verifier, request_id=100)
    principal = bind(customer, 2)
    assert principal == Principal(
        sid=2,
        role=Role.CUSTOMER,
        application_id=100,
        bound=False,
        exp=NOW + 60,
        subject="request:100",
    )
    assert principal.may_read_application(100)
    assert not principal.may_read_application(101)
    assert bind(customer, 99).sid == 99


def test_customer_with_participant_claim_must_match(verifier: TokenVerifier) -> None:
    customer = claims_of(verifier, request_id=100, sid=7)
    principal = bind(customer, 7)
    assert (principal.sid, principal.bound, principal.application_id) == (7, True, 100)
    for trust in (False, True):
        with pytest.raises(Unauthorized) as info:
            bind(customer, 8, trust_query_sid=trust)
        assert info.value.code == "unauthorized"
    via_sub = claims_of(verifier, request_id=100, sub="9")
    assert bind(via_sub, 9).bound is True
    with pytest.raises(Unauthorized):
        bind(via_sub, 7)


def test_staff_may_read_every_application(verifier: TokenVerifier) -> None:
    principal = bind(claims_of(verifier, admin_id=1), 1)
    assert principal.may_read_application(1)
    assert principal.may_read_application(MAX_ID)


# --- mint -----------------------------------------------------------------------------------


def test_mint_round_trips(verifier: TokenVerifier) -> None:
    staff = verifier.verify(mint(SECRET, admin_id=4, now=NOW, ttl=90))
    assert staff == Claims(Role.STAFF, 4, None, int(NOW + 90))
    customer = verifier.verify(mint(SECRET, request_id=100, sid=2, now=NOW))
    assert customer == Claims(Role.CUSTOMER, 100, 2, int(NOW + 3600))
    payload = jwt.decode(
        mint(SECRET, admin_id=4, now=NOW),
        SECRET,
        algorithms=["HS256"],
        options={"verify_exp": False},
    )
    assert payload == {"iat": int(NOW), "exp": int(NOW + 3600), "admin_id": 4}
    header = jwt.get_unverified_header(mint(SECRET, admin_id=4, now=NOW))
    assert header["alg"] == "HS256"


def test_mint_ttl_can_produce_an_expired_token(verifier: TokenVerifier) -> None:
    rejected(verifier, mint(SECRET, admin_id=1, now=NOW - 7200, ttl=3600))


def test_mint_needs_exactly_one_role() -> None:
    with pytest.raises(ValueError):
        mint(SECRET)
    with pytest.raises(ValueError):
        mint(SECRET, admin_id=1, request_id=2)


def test_mint_with_another_secret_is_rejected(verifier: TokenVerifier) -> None:
    assert "signature" in rejected(verifier, mint(b"z" * 32, admin_id=1, now=NOW)).message


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_exp_is_refused(literal: str) -> None:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    secret = b"k" * 40
    header = b64(b'{"alg":"HS256","typ":"JWT"}')
    body = b64(('{"admin_id":1,"exp":' + literal + "}").encode())
    sig = b64(hmac.new(secret, f"{header}.{body}".encode(), hashlib.sha256).digest())
    with pytest.raises(Unauthorized):
        TokenVerifier(secret).verify(f"{header}.{body}.{sig}")


def test_a_pem_secret_is_refused_at_start() -> None:
    pem = b"-----BEGIN PUBLIC KEY-----\n" + b"A" * 64 + b"\n-----END PUBLIC KEY-----\n"
    with pytest.raises(ConfigError):
        TokenVerifier(pem)


def test_id_ranges_parse_single_ids_ranges_and_lists() -> None:
    ids = IdRanges.parse(["9000-9009,1", " 42 "])
    assert str(ids) == "1,42,9000-9009"
    assert all(i in ids for i in (1, 42, 9000, 9005, 9009))
    assert not any(i in ids for i in (2, 41, 8999, 9010, "9000"))
    assert not IdRanges.parse([]) and 5 not in IdRanges.parse([])
    for bad in ("0", "5-3", "x", "1-", "-4", str(2**63), "1-2-3"):
        with pytest.raises(ConfigError, match="--api-sender-ids"):
            IdRanges.parse([bad])
