"""Shared fixtures: a real token issuer, a real upstream, and real mitmdump gateways."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.gateway import Gateway
from tests.support.issuer import TestIssuer
from tests.support.upstream import FakeUpstream

UPSTREAM_KEY = "sk-upstream-test-0123456789abcdefghijklmnopqrstuv"


@pytest.fixture(scope="session")
def issuer() -> Iterator[TestIssuer]:
    issuer = TestIssuer()
    yield issuer
    issuer.close()


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    upstream = FakeUpstream()
    yield upstream
    upstream.close()


@pytest.fixture
def make_gateway(tmp_path) -> Iterator[Callable[..., Gateway]]:
    """make_gateway(config, mode=..., env=..., args=...) -> a started Gateway, stopped after the test.

    The upstream credential env var of `tests.support.gateway.base_config` is set to UPSTREAM_KEY.
    """
    started: list[Gateway] = []

    def make(config: str | dict[str, Any], **kwargs: Any) -> Gateway:
        env = {"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY, **kwargs.pop("env", {})}
        gw = Gateway(config, env=env, workdir=tmp_path / f"gw{len(started)}", **kwargs)
        started.append(gw)
        return gw

    yield make
    for gw in started:
        gw.stop()
