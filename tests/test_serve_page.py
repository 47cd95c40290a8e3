"""The playground page in a real headless Chromium (Selenium + Debian's chromium and chromedriver).

The page is opened from a real uvicorn server on the tiny exported model; the browser types a prompt,
clicks Generate and reads the streamed text back from ``#generated``. With temperature 0 (greedy) the
streamed text must equal what the same server answers to the same request without streaming.
"""

from __future__ import annotations

from urllib.parse import urljoin, urlsplit

import pytest
from conftest import WAIT_S

pytestmark = pytest.mark.slow


def text_of(element) -> str:
    """Exactly what the element holds (``.text`` would collapse whitespace)."""
    return element.get_attribute("textContent")


def set_field(driver, element_id: str, value: str) -> None:
    from selenium.webdriver.common.by import By

    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)
    assert field.get_attribute("value") == value, f"#{element_id} did not take {value!r}"


def generate(driver) -> tuple[str, str]:
    """Click #go and wait until the run ends (status done or error); return (#status, #generated) text."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.find_element(By.ID, "go").click()

    def finished(d):
        status = text_of(d.find_element(By.ID, "status"))
        go_enabled = d.find_element(By.ID, "go").is_enabled()
        return status if go_enabled and (status.startswith("done") or status.startswith("error")) else False

    status = WebDriverWait(driver, WAIT_S).until(
        finished,
        message=f"the page did not finish generating in {WAIT_S} s "
        f"(#status={text_of(driver.find_element(By.ID, 'status'))!r})",
    )
    generated = driver.find_elements(By.ID, "generated")
    return status, (text_of(generated[0]) if generated else "")


def open_page(driver, server) -> None:
    driver.get(server.url + "/")
    assert driver.title.startswith("penwright"), driver.title


def assert_same_origin(driver, base: str) -> None:
    """Nothing on the page points at, or was loaded from, another origin: it must work offline."""
    origin = urlsplit(base)[:2]
    refs = driver.execute_script("""
        const out = [];
        for (const el of document.querySelectorAll('script[src], img[src], iframe[src], audio[src], video[src], source[src], embed[src]'))
            out.push(el.getAttribute('src'));
        for (const el of document.querySelectorAll('link[href]')) out.push(el.getAttribute('href'));
        for (const el of document.querySelectorAll('object[data]')) out.push(el.getAttribute('data'));
        for (const el of document.querySelectorAll('style')) {
            for (const m of el.textContent.matchAll(/(?:url\\(|@import\\s+)['"]?([^'")\\s;]+)/g)) out.push(m[1]);
        }
        return out;
    """)
    loaded = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name);")
    foreign = [
        r for r in refs + loaded if not r.startswith("data:") and urlsplit(urljoin(base + "/", r))[:2] != origin
    ]  # (a data: URL is no request)
    assert not foreign, f"the page refers to other origins (it must work offline): {foreign}"


def completion(server, body: dict, key: str | None = None) -> str:
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = httpx.post(
        f"{server.url}/v1/completions", json={**body, "stream": False}, headers=headers, timeout=WAIT_S
    )
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


PROMPT = "The quick brown fox"
# what the page sends for the fields set below (top_k and top_p keep the page's defaults)
BODY = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "top_k": 40, "top_p": 1}


def fill_form(driver) -> None:
    set_field(driver, "prompt", PROMPT)
    set_field(driver, "length", "12")
    set_field(driver, "temperature", "0")
    set_field(driver, "top_k", "40")
    set_field(driver, "top_p", "1")


def test_page_streams_the_same_text_as_the_api(browser, serve_tiny):
    from selenium.webdriver.common.by import By

    server = serve_tiny()
    open_page(browser, server)
    assert_same_origin(browser, server.url)
    assert not browser.find_element(By.ID, "keybox").is_displayed(), "no API key is set: the key box must be hidden"

    fill_form(browser)
    status, generated = generate(browser)
    assert status.startswith("done"), status
    assert generated, "the page finished but #generated is empty"
    assert generated == completion(server, BODY)
    assert text_of(browser.find_element(By.CSS_SELECTOR, "#output .prompt")) == PROMPT

    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE" and "favicon.ico" not in e["message"]]
    assert not errors, f"the page logged errors: {errors}"


def test_page_with_api_key(browser, serve_tiny):
    from selenium.webdriver.common.by import By

    server = serve_tiny("serve.api_key=sekrit")
    open_page(browser, server)
    assert_same_origin(browser, server.url)
    assert browser.find_element(By.ID, "keybox").is_displayed(), "the server wants a key: #keybox must show"

    fill_form(browser)
    status, generated = generate(browser)
    assert status.startswith("error"), f"generating without the key should fail, #status={status!r}"
    assert "API key" in status, status
    assert generated == ""
    assert browser.find_element(By.CSS_SELECTOR, "#status .error").is_displayed()

    set_field(browser, "key", "sekrit")
    status, generated = generate(browser)
    assert status.startswith("done"), status
    assert generated, "the page finished but #generated is empty"
    assert generated == completion(server, BODY, key="sekrit")
