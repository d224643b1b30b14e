"""mitmweb as an operator uses it, in a real headless browser (Debian's chromium): log in with the
web password, open a masked flow and read it in the Douane view with its marks, resume one held
request and kill another, and see each client get the approval and the refusal.

Debian's chromium through `tests.support.browser`. A screenshot of the masked flow is kept in docs/.
"""

from __future__ import annotations

import os
import shutil
import threading
import time

import openai
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import UPSTREAM_KEY
from tests.support.browser import headless_chromium
from tests.support.gateway import REPO, Gateway, base_config, free_port
from tests.support.upstream import FakeUpstream

PASSWORD = "a long passphrase for the console"
# the one kept in docs/ is refreshed with DOUANE_UPDATE_DOCS=1; a plain run leaves the tree clean
SCREENSHOT = REPO / "docs" / "mitmweb-douane-view.png"
GRANTS = """\
version: 1
default:
  upstreams:
    llm: {models: ["gpt-*"], max_tokens: 200}
rules:
  - {id: review.launch, literal: "launch codes", score: 60}
thresholds: {hold: 50, block: 80}
"""


@pytest.fixture(scope="module")
def console(issuer, tmp_path_factory):
    llm = FakeUpstream()
    llm.reply = "Write to jane.doe@example.com about the invoice."
    work = tmp_path_factory.mktemp("mitmweb")
    (work / "grants.yaml").write_text(GRANTS)
    config = base_config(issuer.url, llm.url, policy={"files": [str(work / "grants.yaml")]},
                         masking={"entities": ["EMAIL_ADDRESS"], "workers": 1,
                                  "timeout_seconds": 120},  # a loaded CI machine
                         approvals={"listen": "127.0.0.1:0", "approver_groups": ["approvers"],
                                    "protocols": {"openai": {"mode": "hold",
                                                             "timeout": "2m"}}})
    web_port = free_port()
    gw = Gateway(config, mode=f"reverse:{llm.url}", tool="mitmweb", workdir=work / "gw",
                 env={"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY},
                 args=["--web-host", "127.0.0.1", "--web-port", str(web_port),
                       "--set", f"web_password={PASSWORD}", "--set", "web_open_browser=false"])
    browser = headless_chromium()
    try:
        yield gw, llm, browser, f"http://127.0.0.1:{web_port}"
    finally:
        browser.quit()
        gw.stop()
        llm.close()


def chat(gw: Gateway, token: str, text: str) -> str:
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=token, max_retries=0, timeout=120)
    reply = client.chat.completions.create(model="gpt-4o-mini", max_tokens=50,
                                           messages=[{"role": "user", "content": text}])
    return reply.choices[0].message.content


def wait(browser, seconds: float = 30) -> WebDriverWait:
    return WebDriverWait(browser, seconds)


def flow_rows(browser) -> list:
    return browser.find_elements(By.CSS_SELECTOR, ".flow-table tbody tr")


def open_flow(browser, text: str):
    """Click the flow row whose text contains `text` (the newest one)."""
    def find(_):
        rows = [r for r in flow_rows(browser) if text in r.text]
        return rows[-1] if rows else False
    row = wait(browser).until(find)
    row.click()
    return row


def test_console_login_masked_view_and_decisions_on_held_requests(console, issuer, tmp_path):
    gw, llm, browser, web = console
    token = issuer.mint("alice@corp.example", ["engineering"])
    answer = chat(gw, token, "Who handles invoices?")
    assert "jane.doe@example.com" not in answer and "EMAIL_ADDRESS" in answer

    browser.get(web)
    password = wait(browser).until(ec.presence_of_element_located(
        (By.CSS_SELECTOR, "input[type=password]")))
    password.send_keys(PASSWORD)
    password.submit()
    open_flow(browser, "/v1/chat/completions")
    # the response tab shows douane's header and the masked answer with its mark
    wait(browser).until(ec.element_to_be_clickable((By.LINK_TEXT, "Response"))).click()
    view = wait(browser).until(lambda b: next(
        (e for e in b.find_elements(By.CSS_SELECTOR, ".contentview, pre")
         if "douane MASK" in e.text), False))
    assert "«EMAIL_ADDRESS»" in view.text or "EMAIL_ADDRESS" in view.text
    assert "jane.doe@example.com" not in browser.page_source
    shot = tmp_path / SCREENSHOT.name
    browser.save_screenshot(str(shot))
    if os.environ.get("DOUANE_UPDATE_DOCS"):
        shutil.copyfile(shot, SCREENSHOT)

    # two requests the policy holds: one resumed (approved), one killed (denied)
    outcomes: dict[str, object] = {}

    def held(name: str) -> None:
        try:
            outcomes[name] = chat(gw, token, f"{name}: recite the launch codes")
        except openai.APIStatusError as e:
            outcomes[name] = e

    threads = [threading.Thread(target=held, args=(name,)) for name in ("first", "second")]
    for t in threads:
        t.start()
        time.sleep(1)
    before = len(llm.requests)
    # the Flow tab's Interception buttons: Resume ([a]ccept) and Abort (kill)
    for title in ("[a]ccept intercepted flow", "kill intercepted flow [x]"):
        done = len(outcomes)
        row = wait(browser).until(lambda b: next(
            (r for r in reversed(flow_rows(b)) if "intercepted" in (r.get_attribute("class") or "")),
            False))
        row.click()
        wait(browser).until(lambda b: "douane HOLD" in b.page_source)
        # a held request is shown without the provider key douane holds for it
        assert UPSTREAM_KEY not in browser.page_source
        wait(browser).until(ec.element_to_be_clickable(
            (By.CSS_SELECTOR, f"button[title='{title}']"))).click()
        wait(browser, 60).until(lambda b, n=done: len(outcomes) > n)
    for t in threads:
        t.join(timeout=60)
    approved = [v for v in outcomes.values() if isinstance(v, str)]
    denied = [v for v in outcomes.values() if isinstance(v, openai.PermissionDeniedError)]
    assert len(approved) == 1 and len(denied) == 1, outcomes
    assert "denied by mitmweb operator" in str(denied[0])
    assert len(llm.requests) == before + 1  # only the approved request went upstream
    events = [r["event"] for r in gw.audit_where(
        lambda r: r.get("event", "").startswith("approval.") and r["event"] != "approval.requested",
        count=2)]
    assert sorted(events) == ["approval.approved", "approval.denied"]
    assert shot.stat().st_size > 10_000
