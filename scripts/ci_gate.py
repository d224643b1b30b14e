"""Run an application's test command behind douane and fail the job on any policy violation.

    scripts/ci-gate [--config FILE] [--user ci@example.com] [--groups ci] -- pytest -q
    scripts/ci-gate --replay tests/llm.mitm -- pytest -q        # answers from a recording

Starts `mitmdump -s addons/gateway.py` on a free loopback port, runs COMMAND with the proxy set
(HTTPS_PROXY/HTTP_PROXY with a token as the proxy password, the CA in SSL_CERT_FILE,
REQUESTS_CA_BUNDLE, NODE_EXTRA_CA_CERTS, CURL_CA_BUNDLE), stops the gateway, then reads the audit
records of this run: any block, hold, refuse or error fails the job and is listed by decision id.
The command never holds an upstream key: the credential variables the config names are replaced
by a placeholder in its environment (douane strips client keys and injects its own).

With --replay, mitmproxy's server replay answers from the recorded flows (reused as often as
asked) and kills any request without a recorded answer: the tests run with no model call and no
upstream key. douane still authenticates, inspects, decides and audits every request.

Exit status: the command's own if it failed, else 3 when douane refused anything, else 0.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from douane import config as configmod
from douane import devissuer
from douane.audit import log_files

ROOT = Path(__file__).resolve().parents[1]
MITMDUMP = Path(sys.executable).parent / "mitmdump"
VIOLATIONS = ("block", "hold", "refuse", "error")
PLACEHOLDER = "douane-ci-no-key"
LISTENING = re.compile(r"listening at \S*?:(\d+)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ci-gate", description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=Path(os.environ.get(
        "DOUANE_CONFIG", ROOT / "policies" / "default.yaml")))
    p.add_argument("--user", default="ci@douane.local", help="identity of the test run "
                   "(dev issuer; or give a token in $DOUANE_CI_TOKEN)")
    p.add_argument("--groups", default="ci", help="comma-separated groups of that identity")
    p.add_argument("--replay", type=Path, action="append", default=[],
                   help="answer from these recorded flows (.mitm); repeatable")
    p.add_argument("--certs", type=Path, default=ROOT / "certs", help="the CA folder")
    p.add_argument("--log", type=Path, help="the gateway's log (default: a temporary file)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("give the test command after --")

    config = configmod.load(args.config, gateway=False)
    token = os.environ.get("DOUANE_CI_TOKEN")
    if not token:
        if config.identity.dev_issuer is None:
            print(f"ci-gate: {args.config} has no dev issuer: give a token in $DOUANE_CI_TOKEN",
                  file=sys.stderr)
            return 2
        token = devissuer.mint(config.identity.dev_issuer, args.user,
                               [g for g in args.groups.split(",") if g], 3600)
    key_vars = sorted({u.credential.source.removeprefix("env ") for u in config.upstreams
                       if u.credential and u.credential.source.startswith("env ")})
    gateway_env = dict(os.environ)
    if args.replay:  # nothing is forwarded: the gateway needs no real key
        gateway_env.update({v: PLACEHOLDER for v in key_vars if v not in os.environ})

    first_seq = last_seq(config.audit.path)
    log = args.log or Path(tempfile.mkstemp(prefix="douane-ci-", suffix=".log")[1])
    gateway, port = start(args, log, gateway_env)
    try:
        proxy = f"http://ci:{token}@127.0.0.1:{port}"
        ca = str(args.certs / "mitmproxy-ca-cert.pem")
        env = {**os.environ, **{v: PLACEHOLDER for v in key_vars},
               "HTTPS_PROXY": proxy, "HTTP_PROXY": proxy, "https_proxy": proxy,
               "http_proxy": proxy, "SSL_CERT_FILE": ca, "REQUESTS_CA_BUNDLE": ca,
               "NODE_EXTRA_CA_CERTS": ca, "CURL_CA_BUNDLE": ca, "DOUANE_TOKEN": token}
        print(f"ci-gate: douane on 127.0.0.1:{port} ({'replay of ' + ', '.join(map(str, args.replay)) if args.replay else 'live'}); "
              f"running: {' '.join(command)}", file=sys.stderr, flush=True)
        status = subprocess.call(command, env=env)
    finally:
        stop(gateway)
    return verdict(config.audit.path, first_seq, status)


def start(args: argparse.Namespace, log: Path, env: dict[str, str]) -> tuple[subprocess.Popen, int]:
    cmd = [str(MITMDUMP), "-s", str(ROOT / "addons" / "gateway.py"),
           "--set", f"douane_config={args.config}", "--set", f"confdir={args.certs}",
           "--listen-host", "127.0.0.1", "--listen-port", "0"]
    for recording in args.replay:
        cmd += ["--server-replay", str(recording)]
    if args.replay:
        cmd += ["--set", "server_replay_extra=kill", "--set", "server_replay_reuse=true"]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        m = LISTENING.search(log.read_text(errors="replace"))
        if m:
            return proc, int(m.group(1))
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    stop(proc)
    sys.exit(f"ci-gate: douane did not start:\n{log.read_text(errors='replace')}")


def stop(proc: subprocess.Popen) -> None:
    """SIGINT lets the audit writer flush and close before the records are read."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def records(path: Path) -> list[dict]:
    return [json.loads(line) for file in log_files(path)
            for line in file.read_text().splitlines() if line.strip()]


def last_seq(path: Path) -> int:
    return max((r["seq"] for r in records(path)), default=0)


def verdict(audit: Path, after_seq: int, status: int) -> int:
    decisions = [r for r in records(audit) if r["seq"] > after_seq and r.get("event") == "decision"]
    bad = [r for r in decisions if r.get("action") in VIOLATIONS]
    counts: dict[str, int] = {}
    for r in decisions:
        counts[r["action"]] = counts.get(r["action"], 0) + 1
    print(f"ci-gate: {len(decisions)} decision(s) in this run: "
          + (", ".join(f"{n} {a}" for a, n in sorted(counts.items())) or "none"), file=sys.stderr)
    for r in bad:
        why = "; ".join(f"{x['rule']}: {x['message']}" for x in r.get("reasons", []))
        print(f"ci-gate: {r['action'].upper()} {r['decision_id']} {r.get('status', '-')} "
              f"{r.get('method')} {r.get('host')}{r.get('path')} user {r.get('user', '-')}: {why}",
              file=sys.stderr)
    if status:
        print(f"ci-gate: FAIL: the command exited with {status}", file=sys.stderr)
        return status
    if bad:
        print(f"ci-gate: FAIL: {len(bad)} request(s) refused by douane", file=sys.stderr)
        return 3
    print("ci-gate: ok", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
