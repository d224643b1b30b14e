"""`douane ca`: create, show, export (certificate only) and rotate."""

from __future__ import annotations

from douane.cli import main


def test_ca_lifecycle(tmp_path, capsys):
    ca = tmp_path / "certs"
    assert main(["ca", "--dir", str(ca), "create"]) == 0
    assert "created CA" in capsys.readouterr().out
    first = (ca / "mitmproxy-ca-cert.pem").read_bytes()
    assert main(["ca", "--dir", str(ca), "create"]) == 0
    assert "existing CA" in capsys.readouterr().out
    assert main(["ca", "--dir", str(ca), "show"]) == 0
    assert "sha256:" in capsys.readouterr().out

    out = tmp_path / "douane-ca.pem"
    assert main(["ca", "--dir", str(ca), "export", "-o", str(out)]) == 0
    assert out.read_bytes() == first and b"PRIVATE KEY" not in out.read_bytes()

    assert main(["ca", "--dir", str(ca), "rotate"]) == 0
    assert (ca / "mitmproxy-ca-cert.pem").read_bytes() != first
    (retired,) = ca.glob("retired-*")
    assert (retired / "mitmproxy-ca-cert.pem").read_bytes() == first

    assert main(["ca", "--dir", str(ca), "env"]) == 0
    out = capsys.readouterr().out
    pem = ca / "mitmproxy-ca-cert.pem"
    for line in (f"SSL_CERT_FILE={pem}", f"REQUESTS_CA_BUNDLE={pem}", f"NODE_EXTRA_CA_CERTS={pem}",
                 f"curl --cacert {pem}", "update-ca-certificates", "update-ca-trust",
                 "security add-trusted-cert"):
        assert line in out
