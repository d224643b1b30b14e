"""TokenVerifier against a real JWKS endpoint: key cache, refresh limits, claim handling."""

from __future__ import annotations

import asyncio
import time

import pytest

from douane.config import IdentityConfig, Issuer, TrustedHeaders
from douane.tokens import TokenError, TokenVerifier
from tests.support.issuer import SigningKey, TestIssuer


def verifier(issuer: TestIssuer, refresh: int = 30, **issuer_args) -> TokenVerifier:
    args = {"user_claim": "email", "groups_claim": "groups", **issuer_args}
    config = IdentityConfig(
        issuers=(Issuer(issuer.url, (issuer.audience,), None, ("RS256",), **args),),
        dev_issuer=None, trusted_headers=TrustedHeaders((), "u", "g", "e"), leeway_seconds=5,
        jwks_refresh_seconds=refresh, jwks_timeout_seconds=2)
    return TokenVerifier(config)


def verify(v: TokenVerifier, token: str):
    return asyncio.run(v.verify(token, "bearer"))


@pytest.fixture
def fresh_issuer():
    issuer = TestIssuer()
    yield issuer
    issuer.close()


def test_access_token_with_at_jwt_typ_and_no_nbf(fresh_issuer):
    token = fresh_issuer.mint("alice@x", ["eng"], nbf=None, headers={"typ": "at+jwt"})
    identity = verify(verifier(fresh_issuer), token)
    assert (identity.user, identity.groups, identity.source) == ("alice@x", ("eng",), "bearer")


def test_groups_from_a_nested_claim_path(fresh_issuer):
    token = fresh_issuer.mint("alice@x", realm_access={"roles": ["admin", "dev"]},
                              preferred_username="alice")
    identity = verify(verifier(fresh_issuer, user_claim="preferred_username",
                               groups_claim="realm_access.roles"), token)
    assert (identity.user, identity.groups) == ("alice", ("admin", "dev"))


def test_a_flood_of_unknown_kids_fetches_the_jwks_once(fresh_issuer):
    v = verifier(fresh_issuer, refresh=60)

    async def flood() -> list[BaseException | object]:
        await v.verify(fresh_issuer.mint("a@x"), "bearer")  # first fetch
        forged = [fresh_issuer.mint("a@x", key=SigningKey()) for _ in range(3)] * 10
        return await asyncio.gather(*(v.verify(t, "bearer") for t in forged),
                                    return_exceptions=True)

    results = asyncio.run(flood())
    assert all(isinstance(r, TokenError) and r.code == "unknown_key" for r in results)
    assert fresh_issuer.jwks_fetches <= 2


def test_last_good_keys_are_kept_when_the_idp_is_down(fresh_issuer):
    v = verifier(fresh_issuer, refresh=0)

    async def scenario() -> None:
        await v.verify(fresh_issuer.mint("a@x"), "bearer")
        fresh_issuer.down = True
        unknown = fresh_issuer.mint("a@x", key=SigningKey())
        with pytest.raises(TokenError):
            await v.verify(unknown, "bearer")  # triggers a failed refresh
        assert (await v.verify(fresh_issuer.mint("b@x"), "bearer")).user == "b@x"

    asyncio.run(scenario())


def test_no_cached_keys_and_idp_down_is_a_clear_refusal(fresh_issuer):
    fresh_issuer.down = True
    with pytest.raises(TokenError) as err:
        verify(verifier(fresh_issuer), fresh_issuer.mint("a@x"))
    assert err.value.code == "jwks_unavailable"


@pytest.mark.parametrize(("claims", "code"), [
    ({"email": None}, "no_user"),
    ({"exp": "tomorrow"}, "malformed"),
    ({"iat": 4102444800}, "issued_in_future"),
    ({"nbf": 4102444800}, "not_yet_valid"),
    ({"nbf": "later"}, "malformed"),
    ({"aud": ["other", "more"]}, "wrong_audience"),
])
def test_claim_checks(fresh_issuer, claims, code):
    with pytest.raises(TokenError) as err:
        verify(verifier(fresh_issuer), fresh_issuer.mint("a@x", **claims))
    assert err.value.code == code


def test_oversized_token(fresh_issuer):
    with pytest.raises(TokenError) as err:
        verify(verifier(fresh_issuer), fresh_issuer.mint("a@x", pad="x" * 20000))
    assert err.value.code == "oversized"


def test_a_verified_token_is_remembered_but_its_expiry_still_counts(fresh_issuer, monkeypatch):
    v = verifier(fresh_issuer)
    token = fresh_issuer.mint("alice@x", ["eng"])
    assert verify(v, token).user == "alice@x"
    fresh_issuer.close()  # the JWKS endpoint is gone: a second verification could not fetch keys
    v.keysets[fresh_issuer.url].keys = {}
    assert verify(v, token).source == "bearer"  # served from the cache of verified tokens
    tampered = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    with pytest.raises(TokenError):
        verify(v, tampered)  # only the exact string that verified is remembered
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 3600)
    with pytest.raises(TokenError) as e:
        verify(v, token)
    assert e.value.code == "expired"
