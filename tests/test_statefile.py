"""Keys created once in the state dir: processes creating one at the same moment all start, and
all use the same key."""

from __future__ import annotations

import subprocess
import sys
import time

from tests.support.gateway import REPO

# waits for the start signal, then creates (or loads) the dev issuer's key and prints its modulus
CREATE = """
import sys, time
from pathlib import Path
sys.path.insert(0, {addons!r})
from douane import devissuer
from douane.config import DevIssuer
go = Path({go!r})
while not go.exists():
    time.sleep(0.001)
dev = DevIssuer(enabled=True, issuer="x", audience="y", key_file=Path({key!r}))
print(devissuer.public_jwk(dev)["n"])
"""


def test_two_processes_create_the_dev_issuer_key_at_once(tmp_path):
    for attempt in range(3):
        key, go = tmp_path / f"s{attempt}" / "dev-issuer.pem", tmp_path / f"go{attempt}"
        code = CREATE.format(addons=str(REPO / "addons"), go=str(go), key=str(key))
        procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        time.sleep(1.5)  # both imported and waiting
        go.touch()
        results = [p.communicate(timeout=120) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], [err for _, err in results]
        moduli = {out.strip() for out, _ in results}
        assert len(moduli) == 1 and moduli != {""}  # one key, used by both
        assert oct(key.stat().st_mode & 0o777) == "0o600"
        assert [p.name for p in key.parent.iterdir()] == [key.name]  # no temporary file left
