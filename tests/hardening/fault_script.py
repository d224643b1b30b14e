"""The mitmproxy script that installs tests/hardening/faults.py into a gateway (see there)."""

from tests.hardening import faults

faults.install()
