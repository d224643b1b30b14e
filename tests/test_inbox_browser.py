"""The approver inbox as approvers use it, in a real headless browser (Debian's chromium), logging
in through a real OpenID Provider (npm oidc-provider): a non-approver sees no inbox, the requester
cannot decide their own request, an approver approves one held request (the waiting client gets
its answer), denies another with a reason (the client gets the refusal and the reason) and
approves a third for an hour (the next such request passes on the grant), and the audit records
name the approver. A `<script>` in a prompt shows as text.

`scripts/test` installs chromium, chromium-driver and the provider's npm packages; without them
this test fails in CI and is skipped elsewhere.
"""

from __future__ import annotations

import base64
import json
import threading
import time

import httpx
import openai
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.conftest import UPSTREAM_KEY
from tests.support.browser import headless_chromium
from tests.support.gateway import Gateway, base_config, free_port
from tests.support.oidc_provider import OidcProvider
from tests.support.upstream import FakeUpstream
from tests.test_mitmweb_browser import GRANTS, chat

RESOURCE = "https://approvals.douane.test"
SECRET_ENV = "DOUANE_TEST_INBOX_SECRET"
ATTACK = "<script>document.title='pwned'</script><img src=x onerror=\"document.title='pwned'\">"


@pytest.fixture(scope="module")
def inbox(issuer, tmp_path_factory):
    provider = OidcProvider({"bob": ["approvers"], "alice": ["approvers", "engineering"],
                             "carol": ["engineering"]})
    llm = FakeUpstream()
    work = tmp_path_factory.mktemp("inbox")
    (work / "grants.yaml").write_text(GRANTS)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # a confidential web client, registered as an operator would (dynamic registration)
    client = httpx.post(provider.issuer + "/reg", json={
        "redirect_uris": [base + "/inbox/callback"], "grant_types": ["authorization_code"],
        "response_types": ["code"], "token_endpoint_auth_method": "client_secret_basic",
        "application_type": "web"}).raise_for_status().json()
    config = base_config(issuer.url, llm.url, policy={"files": [str(work / "grants.yaml")]},
                         approvals={"listen": f"127.0.0.1:{port}", "approver_groups": ["approvers"],
                                    "protocols": {"openai": {"mode": "hold", "timeout": "3m"}},
                                    "inbox": {"client_id": client["client_id"],
                                              "client_secret": {"env": SECRET_ENV},
                                              "issuer": provider.issuer}})
    # requesters' tokens come from the test issuer, approvers log in at the provider
    config["identity"]["issuers"].append({"issuer": provider.issuer, "audience": [RESOURCE],
                                          "resource": RESOURCE})
    gw = Gateway(config, mode=f"reverse:{llm.url}", workdir=work / "gw",
                 env={"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY,
                      SECRET_ENV: client["client_secret"]})
    browser = headless_chromium(1200, 900)
    try:
        yield gw, llm, browser, base, client["client_secret"]
    finally:
        browser.quit()
        gw.stop()
        llm.close()
        provider.close()


def wait(browser, seconds: float = 30) -> WebDriverWait:
    return WebDriverWait(browser, seconds)


def log_in(browser, base: str, user: str) -> None:
    """A fresh browser session: the inbox's login link, the provider's login and consent."""
    browser.execute_cdp_cmd("Network.clearBrowserCookies", {})
    browser.get(base + "/inbox")
    wait(browser).until(lambda b: b.find_element(By.ID, "login")).click()
    field = wait(browser).until(lambda b: b.find_element(By.NAME, "login"))
    field.send_keys(user)
    browser.find_element(By.NAME, "password").send_keys("any")
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    # the consent page (first login of this user), then back at the inbox
    wait(browser).until(lambda b: "/inbox" in b.current_url or b.find_elements(
        By.CSS_SELECTOR, "form button[type=submit][autofocus]"))
    if "/inbox" not in browser.current_url:
        browser.find_element(By.CSS_SELECTOR, "form button[type=submit][autofocus]").click()
    wait(browser).until(lambda b: b.find_elements(By.ID, "error") or (
        b.current_url.rstrip("/").endswith("/inbox") and b.find_elements(By.ID, "approver")))


def sections(browser) -> dict[str, object]:
    return {s.get_attribute("id"): s for s in browser.find_elements(By.CSS_SELECTOR,
                                                                     "section.approval")}


def test_inbox_login_approve_deny_and_refusals(inbox, issuer):
    gw, llm, browser, base, secret = inbox
    token = issuer.mint("alice@corp.example", ["engineering"])

    # a non-approver logs in and sees no inbox
    log_in(browser, base, "carol")
    assert "carol@corp.example is not an approver" in browser.find_element(By.ID, "error").text
    assert not sections(browser) and not browser.find_elements(By.ID, "approver")
    assert not [c for c in browser.get_cookies() if c["name"] == "douane_inbox"]
    assert gw.audit_where(lambda r: r.get("event") == "approval.refused"
                          and r.get("approver") == "carol@corp.example")

    outcomes: dict[str, object] = {}

    def held(name: str, text: str) -> None:
        try:
            outcomes[name] = chat(gw, token, text)
        except openai.APIStatusError as e:
            outcomes[name] = e

    before = len(llm.requests)
    threads, ids = [], {}
    for name, text in (("first", f"{ATTACK} recite the launch codes"),
                       ("second", "second: the launch codes, now")):
        threads.append(threading.Thread(target=held, args=(name, text)))
        threads[-1].start()
        requested = gw.audit_where(lambda r: r.get("event") == "approval.requested",
                                   count=len(threads), timeout=120)
        ids[name] = requested[-1]["approval_id"]

    # the requester, an approver too, cannot decide their own request
    log_in(browser, base, "alice")
    assert browser.find_element(By.ID, "approver").text == "alice@corp.example"
    own = sections(browser)[ids["second"]]
    own.find_element(By.CSS_SELECTOR, "button.approve").click()
    error = wait(browser).until(lambda b: b.find_element(By.ID, "error"))
    assert "nobody approves or denies their own request" in error.text
    assert ids["second"] in sections(browser) and "second" not in outcomes

    # an approver: previews as text, approve one, deny the other with a reason
    log_in(browser, base, "bob")
    shown = sections(browser)
    assert set(ids.values()) <= set(shown)
    first = shown[ids["first"]]
    assert "<script>document.title='pwned'</script>" in first.text
    assert "review.launch" in first.text and "alice@corp.example" in first.text
    assert not browser.find_elements(By.TAG_NAME, "script") and browser.title != "pwned"
    assert not browser.find_elements(By.CSS_SELECTOR, "section img")
    session = next(c for c in browser.get_cookies() if c["name"] == "douane_inbox")
    assert session["httpOnly"] and session["secure"] and session["sameSite"] == "Strict"
    encoded = session["value"].split("|")[4].split(":", 1)[1]
    assert set(json.loads(base64.b64decode(encoded))) == {"user", "groups", "issuer",
                                                          "subject", "exp"}  # never a token

    # a form post without the page's XSRF token is refused, whatever the cookie
    forged = httpx.post(f"{base}/inbox/{ids['second']}/deny", data={"reason": "forged"},
                        headers={"cookie": f"douane_inbox={session['value']}"})
    assert forged.status_code == 403 and "second" not in outcomes
    # another port of this host is same-site: it can plant a known _xsrf cookie next to the
    # session cookie, and submit a form carrying it; the form's Origin gives it away
    other = f"http://127.0.0.1:{free_port()}"
    tossed = httpx.post(f"{base}/inbox/{ids['second']}/deny", data={
        "reason": "tossed", "_xsrf": "c0ffee"}, headers={
        "cookie": f"_xsrf=c0ffee; douane_inbox={session['value']}", "origin": other})
    assert tossed.status_code == 403 and "another origin" in tossed.text
    # a login answer this browser did not start (login CSRF) logs nobody in
    stray = httpx.get(f"{base}/inbox/callback", params={"code": "x", "state": "y"})
    assert stray.status_code == 400 and not [
        c for c in stray.headers.get_list("set-cookie") if c.startswith("douane_inbox=")]
    page = httpx.get(base + "/inbox")
    assert page.status_code == 200 and 'id="login"' in page.text and "apr_" not in page.text
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY"

    Select(first.find_element(By.NAME, "for")).select_by_value("")  # this request only
    first.find_element(By.CSS_SELECTOR, "button.approve").click()
    wait(browser, 120).until(lambda b: "first" in outcomes)
    assert isinstance(outcomes["first"], str), outcomes
    second = sections(browser)[ids["second"]]
    assert ids["first"] not in sections(browser)
    deny = second.find_element(By.CSS_SELECTOR, "form[action$='/deny']")
    deny.find_element(By.NAME, "reason").send_keys("not <b>today</b>")
    deny.find_element(By.CSS_SELECTOR, "button.deny").click()
    wait(browser, 120).until(lambda b: "second" in outcomes)
    for t in threads:
        t.join(timeout=60)
    refused = outcomes["second"]
    assert isinstance(refused, openai.PermissionDeniedError), outcomes
    assert "not <b>today</b>" in str(refused) and "bob@corp.example" in str(refused)
    assert len(llm.requests) == before + 1  # only the approved request went upstream
    approved, denied = (gw.audit_where(lambda r, e=e: r.get("event") == e)[0]
                        for e in ("approval.approved", "approval.denied"))
    assert approved["approval_id"] == ids["first"] and approved["approver"] == "bob@corp.example"
    assert denied["approval_id"] == ids["second"] and denied["approver"] == "bob@corp.example"
    assert denied["reason"] == "not <b>today</b>"

    # approved for a duration: a time-boxed grant lets the next such request pass at once (the
    # first, approved for this request only, left none: this one is held)
    threading.Thread(target=held, args=("third", "third: the launch codes again")).start()
    third = gw.audit_where(lambda r: r.get("event") == "approval.requested", count=3,
                           timeout=120)[-1]["approval_id"]
    browser.get(base + "/inbox")
    section = wait(browser).until(lambda b: sections(b).get(third))
    Select(section.find_element(By.NAME, "for")).select_by_value("1h")
    section.find_element(By.CSS_SELECTOR, "button.approve").click()
    wait(browser, 120).until(lambda b: "third" in outcomes)
    assert isinstance(outcomes["third"], str), outcomes
    grant = gw.audit_where(lambda r: r.get("event") == "approval.approved"
                           and r.get("approval_id") == third)[0]
    assert grant["approver"] == "bob@corp.example" and not grant["grant_one_shot"]
    assert 3000 < grant["grant_expires_at"] - time.time() <= 3600
    assert chat(gw, token, "fourth: the launch codes, once more")
    assert gw.audit_where(lambda r: r.get("event") == "approval.grant_used")
    assert len(gw.audit_where(lambda r: r.get("event") == "approval.requested", count=3)) == 3
    # neither the session cookie nor the client secret is written anywhere
    written = gw.audit_file().read_text() + gw.log_text()
    assert session["value"] not in written and secret not in written


def test_a_lone_surrogate_in_a_held_prompt_leaves_the_inbox_up(inbox, issuer):
    """Red team, stop 28: a held prompt holding a lone surrogate (`\\ud800`, valid JSON) made the
    inbox page fail for every approver (its preview, written raw, cannot be UTF-8): no held
    request could be decided there until that one timed out. The preview shows it escaped."""
    gw, llm, browser, base, _ = inbox
    token = issuer.mint("dave@corp.example", ["engineering"])
    outcome: list[httpx.Response] = []
    body = json.dumps({"model": "gpt-4o-mini", "max_tokens": 50, "messages": [  # `\\ud800`
        {"role": "user", "content": "odd \ud800 byte: the launch codes"}]}).encode()
    threading.Thread(target=lambda: outcome.append(httpx.post(
        gw.url + "/v1/chat/completions", content=body, timeout=200, headers={
            "authorization": f"Bearer {token}", "content-type": "application/json"}))).start()
    held = gw.audit_where(lambda r: r.get("event") == "approval.requested"
                          and r.get("user") == "dave@corp.example", timeout=120)
    approval = held[0]["approval_id"]
    log_in(browser, base, "bob")
    section = wait(browser).until(lambda b: sections(b).get(approval))
    assert "\\ud800" in section.text
    Select(section.find_element(By.NAME, "for")).select_by_value("")
    section.find_element(By.CSS_SELECTOR, "button.approve").click()
    wait(browser, 120).until(lambda b: outcome)
    assert outcome[0].status_code == 200, outcome[0].text
