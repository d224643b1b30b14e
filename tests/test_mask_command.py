"""`douane mask`: a config tried on samples (its equality with a real gateway's answer is in
test_masking_e2e.py)."""

from __future__ import annotations

import io
import json
import sys

import pytest
import yaml

from douane.cli import main

AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


def config(tmp_path, **sections) -> str:
    path = tmp_path / "douane.yaml"
    path.write_text(yaml.safe_dump({
        "version": 1, "gateway": {"state_dir": str(tmp_path / "state"), "body_size_limit": "1k"},
        "identity": {"dev_issuer": {"enabled": True}}, **sections}))
    return str(path)


def test_jsonl_masked_and_spans(tmp_path, capsys):
    cfg = config(tmp_path, masking={"entities": ["EMAIL_ADDRESS", "US_SSN", "AWS_SECRET_KEY"]})
    lines = [{"id": 1, "text": "write to ana@example.com"},
             {"id": 2, "text": f"ssn: 536-80-4172\naws_secret_access_key={AWS_SECRET}"}]
    sample = tmp_path / "s.jsonl"
    sample.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert main(["mask", "--config", cfg, "--jsonl", str(sample)]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert out == [{"id": 1, "text": "write to <EMAIL_ADDRESS>"},
                   {"id": 2, "text": "ssn: <US_SSN>\naws_secret_access_key=<AWS_SECRET_KEY>"}]
    assert main(["mask", "--config", cfg, "--jsonl", "--spans", str(sample)]) == 0
    spans = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [[(s["start"], s["end"], s["type"]) for s in line] for line in spans] == [
        [(9, 24, "EMAIL_ADDRESS")], [(5, 16, "US_SSN"), (39, 79, "AWS_SECRET_KEY")]]
    assert all(0 < s["score"] <= 1 for line in spans for s in line)


def test_stdin_and_refusals(tmp_path, capsys, monkeypatch):
    cfg = config(tmp_path, masking={"entities": ["EMAIL_ADDRESS"]})
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"mail ana@example.com\n")))
    assert main(["mask", "--config", cfg]) == 0
    assert capsys.readouterr().out == "mail <EMAIL_ADDRESS>\n"
    big = tmp_path / "big.txt"
    big.write_text("x" * 2048)  # over the gateway's body size limit: it would refuse it
    assert main(["mask", "--config", cfg, str(big)]) == 2
    assert "larger than the gateway's body size limit" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"no_text": 1}\n')
    assert main(["mask", "--config", cfg, "--jsonl", str(bad)]) == 2
    assert main(["mask", "--config", config(tmp_path), str(big)]) == 2
    assert "has no masking section: the gateway masks nothing" in capsys.readouterr().err


@pytest.mark.parametrize("flag", [[], ["--spans"]])
def test_a_missing_file_is_an_error_not_a_traceback(tmp_path, capsys, flag):
    cfg = config(tmp_path, masking={"entities": ["EMAIL_ADDRESS"]})
    assert main(["mask", "--config", cfg, *flag, str(tmp_path / "nope.txt")]) == 2
    assert "douane mask:" in capsys.readouterr().err
