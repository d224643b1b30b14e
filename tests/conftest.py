"""Shared fixtures: a real token issuer, a real upstream, and real mitmdump gateways."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.gateway import REPO, Gateway
from tests.support.issuer import TestIssuer
from tests.support.postgres import PostgresCluster
from tests.support.upstream import FakeUpstream

UPSTREAM_KEY = "sk-upstream-test-0123456789abcdefghijklmnopqrstuv"
# modules that start `scripts/run`, which makes the repository's certs/ CA on its first start
SCRIPTS_RUN = {"test_fleet_e2e.py", "test_operator_e2e.py", "test_workers_e2e.py"}
# the two longest hardening modules write nowhere test_z_leaks scans (its HARDENING_DIRS)
LEAK_SCAN_FREE = {"test_bounds.py", "test_mcp_side_doors.py"}


def xdist_group(nodeid: str) -> str:
    """The unit a pytest-xdist worker takes whole, in order: a module (its module-scoped gateways
    start once); the hardening suite but for LEAK_SCAN_FREE (test_z_leaks scans what the other
    hardening modules wrote under this process's basetemp, after them); the modules that run
    `scripts/run` (two first starts at once would race to make certs/)."""
    path = Path(nodeid.split("::")[0]).relative_to("tests")
    if path.parts[0] == "hardening" and path.name not in LEAK_SCAN_FREE:
        return "hardening"
    return "scripts-run" if path.name in SCRIPTS_RUN else str(path)


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`scripts/test`'s workers take whole groups (xdist_group); xdist's own loadgroup cannot say
    them with pytest 9 (it renames item._nodeid, which pytest 9 no longer reads)."""
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_group(nodeid)

    return GroupScheduling(config, log)


@pytest.fixture(scope="session")
def issuer() -> Iterator[TestIssuer]:
    issuer = TestIssuer()
    yield issuer
    issuer.close()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """A real PostgreSQL 15 cluster for the session (tests/support/postgres.py): each test module
    takes a database of its own with `postgres.new_database()`; `postgres.outage()` stops it for
    a block and starts it again."""
    cluster = PostgresCluster()
    yield cluster
    cluster.close()


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    upstream = FakeUpstream()
    yield upstream
    upstream.close()


@pytest.fixture(scope="module")
def llm() -> Iterator[FakeUpstream]:
    """A fake OpenAI/Anthropic upstream shared by the tests of one module."""
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


@contextlib.contextmanager
def mcp_server_of() -> Iterator[str]:
    """A real MCP server (tests/support/mcp_server.py) over Streamable HTTP; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = subprocess.Popen([sys.executable, "-m", "tests.support.mcp_server", str(port)],
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120  # a Python start and its imports, on a loaded host
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError(f"the MCP server did not start (exit {server.poll()})") \
                    from None
            time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.kill()
        server.wait()


@pytest.fixture(scope="session")
def mcp_server() -> Iterator[str]:
    """The MCP server the tests share (one that no test changes)."""
    with mcp_server_of() as url:
        yield url
