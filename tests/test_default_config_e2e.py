"""The embedded default (`policies/default.yaml`, what `scripts/run` starts with) masks answers:
a real mitmdump with its `masking:` section as shipped."""

from __future__ import annotations

import openai
import yaml

from douane import config as configmod
from douane import devissuer
from tests.conftest import UPSTREAM_KEY
from tests.support.gateway import REPO, Gateway

AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
ANSWER = ("Hi Natália, the account owner is Maria Garcia (maria.garcia@example.com, "
          "+55 11 98765-4321).\nCity: Lyon\nHer SSN: 536804172. The deploy key is "
          f"aws_secret_access_key = {AWS_SECRET} and the card 4111 1111 1111 1111.")
VALUES = ("Natália", "Maria Garcia", "maria.garcia", "98765-4321", "Lyon", "536804172",
          AWS_SECRET, "4111 1111 1111 1111")


def test_the_embedded_default_masks_answers(upstream, tmp_path):
    shipped = yaml.safe_load((REPO / "policies" / "default.yaml").read_text())
    assert shipped["masking"]["responses"] is True
    doc = {**shipped, "gateway": {**shipped["gateway"], "state_dir": str(tmp_path / "state")},
           # only the paths move (into tmp_path) and the upstream (a local fake)
           "policy": {**shipped["policy"], "files": [str(REPO / "policies" / "grants.yaml")]},
           "recording": {**shipped["recording"], "dir": str(tmp_path / "recordings")},
           "audit": {**shipped["audit"], "path": str(tmp_path / "state" / "audit" / "audit.jsonl")},
           "upstreams": {**shipped["upstreams"], "openai": {
               **shipped["upstreams"]["openai"], "url": upstream.url + "/v1"}},
           # and the analysis timeout: workers still loading spaCy on a loaded 2-core machine
           "masking": {**shipped["masking"], "timeout_seconds": 120}}
    upstream.reply = ANSWER
    with Gateway(doc, env={"OPENAI_API_KEY": UPSTREAM_KEY}, workdir=tmp_path / "gw") as gw:
        dev = configmod.load(gw.config_file, gateway=False).identity.dev_issuer
        assert dev is not None
        token = devissuer.mint(dev, "alice@example.com", ["engineering"], 600)
        client = openai.OpenAI(base_url=upstream.url + "/v1", api_key="unused", max_retries=0,
                               http_client=openai.DefaultHttpxClient(
                                   proxy=gw.proxy_url("alice", token)))
        answer = client.chat.completions.create(
            model="gpt-4o-mini", max_tokens=100,
            messages=[{"role": "user", "content": "who owns it?"}]).choices[0].message.content
        records = gw.audit_records(wait_for=1, timeout=10)
        # an address split across two streamed parts, through the shipped policy and masking
        upstream.document, upstream.chunk_size = {
            "id": "r", "object": "response", "created_at": 0, "status": "completed",
            "model": "gpt-4o-mini", "output": [
                {"type": "message", "id": "m", "role": "assistant", "status": "completed",
                 "content": [{"type": "output_text", "text": t, "annotations": []}
                             for t in ("Write to maria.garcia", "@example.com today.")]}]}, 3
        try:
            with client.responses.stream(model="gpt-4o-mini", max_output_tokens=100,
                                         input="who owns it?") as stream:
                parts = [p.text for p in stream.get_final_response().output[0].content]
        finally:
            upstream.document, upstream.chunk_size = None, 4
    assert parts == ["Write to <EMAIL_ADDRESS>", "<EMAIL_ADDRESS> today."], parts
    assert [v for v in VALUES if v in answer] == [], answer
    for tag in ("<PERSON>", "<EMAIL_ADDRESS>", "<PHONE_NUMBER>", "<LOCATION>", "<US_SSN>",
                "<AWS_SECRET_KEY>", "<CREDIT_CARD>"):
        assert tag in answer, answer
    assert records[-1]["action"] == "mask" and records[-1]["masked"]["PERSON"] >= 2
