"""`douane ca create|show|export|rotate|env`: douane's interception CA under certs/.

The CA's private key never leaves certs/ (git-ignored); `export` writes only the certificate.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from mitmproxy.certs import CertStore

CERTS = Path(__file__).resolve().parents[3] / "certs"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ca", help="create and show douane's CA, and how to trust it")
    p.add_argument("--dir", type=Path, default=CERTS, help="CA folder (default: certs/)")
    verbs = p.add_subparsers(dest="verb", required=True)
    verbs.add_parser("create", help="generate the CA if it does not exist").set_defaults(func=create)
    verbs.add_parser("show", help="print the CA's subject, fingerprint and expiry"
                     ).set_defaults(func=show)
    verbs.add_parser("env", help="print the commands that make clients trust the CA"
                     ).set_defaults(func=env)
    exp = verbs.add_parser("export", help="write the CA certificate (PEM, no key) to a file")
    exp.add_argument("-o", "--output", type=Path, required=True)
    exp.set_defaults(func=export)
    verbs.add_parser("rotate", help="move the current CA aside and generate a new one"
                     ).set_defaults(func=rotate)


def _store(folder: Path) -> CertStore:
    folder.mkdir(parents=True, exist_ok=True)
    return CertStore.from_store(folder, "mitmproxy", 2048)  # creates the CA on first use


def create(args: argparse.Namespace) -> int:
    existed = (args.dir / "mitmproxy-ca.pem").exists()
    cert = _store(args.dir).default_ca
    print(f"{'existing' if existed else 'created'} CA {cert.cn} in {args.dir} "
          f"(sha256 {cert.fingerprint().hex()[:16]}..., expires {cert.notafter:%Y-%m-%d})")
    return 0


def show(args: argparse.Namespace) -> int:
    if not (args.dir / "mitmproxy-ca.pem").exists():
        print(f"no CA in {args.dir}: run `douane ca create`")
        return 1
    cert = _store(args.dir).default_ca
    print(f"subject:     {cert.cn}\nsha256:      {cert.fingerprint().hex()}\n"
          f"not before:  {cert.notbefore:%Y-%m-%d}\nnot after:   {cert.notafter:%Y-%m-%d}\n"
          f"certificate: {args.dir / 'mitmproxy-ca-cert.pem'}")
    return 0


def env(args: argparse.Namespace) -> int:
    pem = args.dir / "mitmproxy-ca-cert.pem"
    print(f"export SSL_CERT_FILE={pem}\nexport REQUESTS_CA_BUNDLE={pem}\n"
          f"export NODE_EXTRA_CA_CERTS={pem}\n# curl: curl --cacert {pem} ...\n"
          f"# system store (Debian/Ubuntu): cp {pem} /usr/local/share/ca-certificates/douane.crt"
          f" && update-ca-certificates\n"
          f"# system store (Fedora/RHEL): cp {pem} /etc/pki/ca-trust/source/anchors/douane.pem"
          f" && update-ca-trust\n"
          f"# system store (macOS): sudo security add-trusted-cert -d -r trustRoot"
          f" -k /Library/Keychains/System.keychain {pem}")
    return 0


def export(args: argparse.Namespace) -> int:
    pem = args.dir / "mitmproxy-ca-cert.pem"
    if not pem.exists():
        print(f"no CA in {args.dir}: run `douane ca create`")
        return 1
    shutil.copyfile(pem, args.output)
    print(f"wrote {args.output} (certificate only)")
    return 0


def rotate(args: argparse.Namespace) -> int:
    """Keep the old CA in certs/retired-<time>/ so recordings made under it stay explainable."""
    old = sorted(args.dir.glob("mitmproxy-ca*")) + sorted(args.dir.glob("mitmproxy-dhparam.pem"))
    if old:
        retired = args.dir / f"retired-{time.strftime('%Y%m%dT%H%M%S')}"
        retired.mkdir()
        for path in old:
            path.rename(retired / path.name)
        print(f"retired the old CA to {retired}")
    create(args)
    print("restart douane and re-distribute the new certificate to clients (`douane ca env`)")
    return 0
