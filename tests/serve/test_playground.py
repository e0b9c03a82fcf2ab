"""The playground page (`/playground`) in a real headless Chromium (Debian's `chromium` + `chromium-driver`, driven
by selenium) against a tiny-model server: the pickers come from the server, both panes stream at the same time
and end with exactly what the API answers for the same greedy requests, the server batches the two requests,
a coefficient of 0 gives the base reply, stop aborts both streams, the copied curl and Python snippets reproduce
the right pane, errors show OpenAI's fields, and an API key is sent as a Bearer token."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

CHROMIUM, DRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
if not CHROMIUM.is_file() or not DRIVER.is_file():
    pytest.skip("the playground is tested in Debian's headless Chromium: apt-get install chromium chromium-driver "
                f"({CHROMIUM if not CHROMIUM.is_file() else DRIVER} is missing)", allow_module_level=True)
pytest.importorskip("selenium", reason="the playground test drives Chromium with selenium (the dev extra)")

import httpx  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from .util import BASE, client, make_app, metric, running, slow_down  # noqa: E402

PROMPT = "Say something."
KEY = "playground-test-key"


@pytest.fixture(scope="module")
def served(assets):
    # a long batching window, so the page's two requests meet in one batch even on a loaded machine
    app = make_app(assets, max_batch_size=8, max_wait_ms=300, max_new_tokens=64)
    with running(app) as url:
        yield app, url


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    with tempfile.TemporaryDirectory(prefix="reftkit-chromium-") as profile:
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--no-first-run", "--window-size=1400,1000", f"--user-data-dir={profile}"):
            options.add_argument(arg)
        driver = webdriver.Chrome(options=options, service=Service(str(DRIVER)))
        try:
            yield driver
        finally:
            driver.quit()


def wait(driver, condition, timeout=20.0, what="the page"):
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition(d), f"waiting for {what}")


def open_page(driver, url):
    driver.get(url + "/playground")
    wait(driver, lambda d: d.execute_script("return document.getElementById('adapter').options.length") > 0 or
         d.execute_script("return document.getElementById('models-error').textContent"), what="the model list")


def set_value(driver, element_id, value):
    """Set an input's value the way typing or dragging does (its `input` and `change` events fire)."""
    driver.execute_script("const e = document.getElementById(arguments[0]); e.value = arguments[1];"
                          "e.dispatchEvent(new Event('input', {bubbles: true}));"
                          "e.dispatchEvent(new Event('change', {bubbles: true}));", element_id, str(value))


def choose(driver, left_model=None, right_model=None, vector="", coefficient=None, max_tokens=8, prompt=PROMPT):
    set_value(driver, "prompt", prompt)
    set_value(driver, "max-tokens", max_tokens)
    set_value(driver, "temperature", 0)
    if right_model is not None:
        Select(driver.find_element("id", "adapter")).select_by_value(right_model)
    Select(driver.find_element("id", "vector")).select_by_value(vector)
    if coefficient is not None:
        set_value(driver, "coef", coefficient)


def pane(driver, side):
    return driver.execute_script(
        "const p = document.getElementById('pane-' + arguments[0]);"
        "return {text: p.querySelector('.out').textContent, error: p.querySelector('.error').textContent,"
        "        stats: p.querySelector('.stats').textContent, state: p.dataset.state || ''};", side)


def finished(driver):
    return all(pane(driver, s)["state"] in ("done", "error", "stopped") for s in ("left", "right")) and \
        driver.find_element("id", "send").is_enabled()


def send_and_wait(driver, timeout=30.0):
    driver.find_element("id", "send").click()
    wait(driver, finished, timeout, "both replies")
    return pane(driver, "left"), pane(driver, "right")


def api_reply(url, model, max_tokens=8, steer=None, prompt=PROMPT, **kw):
    extra = {"extra_body": {"reftkit": {"steer": steer}}} if steer else {}
    r = client(url, **kw).chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                  max_tokens=max_tokens, temperature=0, **extra)
    return r.choices[0].message.content


WATCH = """
window.__seen = [];
const out = (s) => document.querySelector('#pane-' + s + ' .out');
const note = () => window.__seen.push([out('left').textContent.length, out('right').textContent.length]);
window.__watch = new MutationObserver(note);
for (const s of ['left', 'right']) window.__watch.observe(out(s), {childList: true, characterData: true, subtree: true});
"""


def test_pickers_are_filled_from_the_server(served, browser):
    app, url = served
    open_page(browser, url)
    listing = httpx.get(url + "/v1/models").json()
    options = browser.execute_script("return [...document.getElementById(arguments[0]).options].map(o => o.value)",
                                     "adapter")
    assert options == [m["id"] for m in listing["data"]] == [BASE, "caps", "pirate", "brief"]
    vectors = browser.execute_script("return [...document.getElementById('vector').options].map(o => o.value)")
    assert vectors == [""] + [v["name"] for v in listing["reftkit"]["steering_vectors"]] == ["", "happy"]
    assert Select(browser.find_element("id", "base-model")).first_selected_option.get_attribute("value") == BASE
    assert Select(browser.find_element("id", "adapter")).first_selected_option.get_attribute("value") == "caps"
    slider = browser.find_element("id", "coef-slider")
    assert float(slider.get_attribute("min")) < 0 < float(slider.get_attribute("max"))  # 0 and negatives included
    Select(browser.find_element("id", "vector")).select_by_value("happy")
    assert "L2.block_output" in browser.find_element("id", "vector-hint").text
    set_value(browser, "coef-slider", -2.5)
    assert browser.find_element("id", "coef").get_attribute("value") == "-2.5"  # the box follows the slider
    set_value(browser, "coef", 4)
    assert float(slider.get_attribute("value")) == 4  # and the slider the box
    # nothing was loaded from anywhere but this server
    origins = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert origins and all(name.startswith(url + "/") for name in origins), origins


def test_both_panes_stream_together_and_match_the_api(served, browser):
    app, url = served
    open_page(browser, url)
    choose(browser, right_model="caps", vector="happy", coefficient=-1.5, max_tokens=12)
    batches, rows = metric(url, "reftkit_batches_total"), metric(url, "reftkit_batch_size_rows_sum")
    browser.execute_script(WATCH)
    hook = slow_down(app, 0.02)  # steps at least 20 ms apart, so a busy browser still sees them one by one
    try:
        left, right = send_and_wait(browser)
    finally:
        hook.remove()
    assert left["state"] == right["state"] == "done" and not left["error"] and not right["error"]
    # one batch of two rows: the page's two requests were served together
    assert (metric(url, "reftkit_batches_total") - batches, metric(url, "reftkit_batch_size_rows_sum") - rows) == (1, 2)
    assert left["text"] == api_reply(url, BASE, 12)
    assert right["text"] == api_reply(url, "caps", 12, [{"name": "happy", "coefficient": -1.5}])
    assert left["text"] != right["text"]
    seen = browser.execute_script("return window.__seen")
    assert len({a for a, _ in seen}) > 2 and len({b for _, b in seen}) > 2, "each pane grows in several steps"
    assert any(0 < a < len(left["text"]) and 0 < b < len(right["text"]) for a, b in seen), \
        "both panes were part-way through their replies at the same moment"
    for p in (left, right):
        assert "12 tokens" in p["stats"] and "tok/s" in p["stats"] and "finish_reason length" in p["stats"]
    assert browser.find_element("css selector", "#pane-right .title").text == "caps + happy × -1.5"


def test_a_coefficient_of_zero_gives_the_base_reply(served, browser):
    app, url = served
    open_page(browser, url)
    choose(browser, right_model=BASE, vector="happy", max_tokens=10)
    set_value(browser, "coef-slider", 0)
    assert browser.find_element("id", "coef").get_attribute("value") == "0"
    left, right = send_and_wait(browser)
    base = api_reply(url, BASE, 10)
    assert left["text"] == right["text"] == base
    set_value(browser, "coef-slider", 2)
    left, right = send_and_wait(browser)
    assert left["text"] == base and right["text"] == api_reply(url, BASE, 10, [{"name": "happy", "coefficient": 2}])
    assert right["text"] != base  # the control: a non-zero coefficient does change the reply


def test_stop_aborts_both_streams_and_frees_the_rows(served, browser):
    app, url = served
    open_page(browser, url)
    choose(browser, right_model="pirate", max_tokens=64)
    hook = slow_down(app, 0.08)  # 64 steps of >= 80 ms: about 5 s, so there is time to stop
    try:
        browser.find_element("id", "send").click()
        wait(browser, lambda d: pane(d, "left")["text"] and pane(d, "right")["text"], what="the first tokens")
        browser.find_element("id", "stop").click()
        wait(browser, finished, what="both streams to stop")
        left, right = pane(browser, "left"), pane(browser, "right")
        assert left["state"] == right["state"] == "stopped" and "stopped" in left["stats"]
        time.sleep(0.5)
        assert (pane(browser, "left")["text"], pane(browser, "right")["text"]) == (left["text"], right["text"])
        wait(browser, lambda d: metric(url, "reftkit_running_rows") == 0, 10, "the server to drop both rows")
        assert not browser.find_element("id", "stop").is_enabled()
    finally:
        hook.remove()
    assert len(left["text"]) < len(api_reply(url, BASE, 64))  # stopped before the end


def _stream_text(sse: str) -> str:
    out = []
    for line in sse.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            for choice in json.loads(line[6:])["choices"]:
                out.append(choice["delta"].get("content") or "")
    return "".join(out)


def test_copied_curl_and_python_reproduce_the_right_pane(served, browser, tmp_path):
    app, url = served
    open_page(browser, url)
    choose(browser, right_model="brief", vector="happy", coefficient=1.5, max_tokens=8,
           prompt="It's a \"quoted\" test\nwith 'two' lines")
    _, right = send_and_wait(browser)
    browser.find_element("id", "copy-python").click()
    script = wait(browser, lambda d: d.find_element("id", "snippet").get_attribute("value"), what="the snippet")
    assert "extra_body=" in script and '"coefficient": 1.5' in script
    (tmp_path / "snippet.py").write_text(script)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI")}
    done = subprocess.run([sys.executable, str(tmp_path / "snippet.py")], capture_output=True, text=True, timeout=60,
                          env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == right["text"] + "\n"
    browser.find_element("id", "copy-curl").click()
    wait(browser, lambda d: d.find_element("id", "snippet").get_attribute("value").startswith("curl"),
         what="the curl command")
    words = shlex.split(browser.find_element("id", "snippet").get_attribute("value"))  # POSIX shell quoting
    assert words[:3] == ["curl", "-N", url + "/v1/chat/completions"]
    headers = dict(words[i + 1].split(": ", 1) for i, w in enumerate(words) if w == "-H")
    assert headers == {"Content-Type": "application/json"}  # no key on this server, so no Authorization header
    body = json.loads(words[words.index("-d") + 1])
    assert body["reftkit"] == {"steer": [{"name": "happy", "coefficient": 1.5}]} and body["stream"] is True
    answer = httpx.post(words[2], headers=headers, content=words[words.index("-d") + 1], timeout=30)
    assert _stream_text(answer.text) == right["text"]


def test_errors_show_the_openai_fields(served, browser):
    app, url = served
    open_page(browser, url)
    choose(browser, right_model="caps", vector="happy", max_tokens=4)
    set_value(browser, "coef", "")  # an empty box is sent as it is, and the server says what it expected
    left, right = send_and_wait(browser)
    assert left["state"] == "done" and left["text"] == api_reply(url, BASE, 4)
    expected = httpx.post(url + "/v1/chat/completions", json={
        "model": "caps", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4,
        "reftkit": {"steer": [{"name": "happy", "coefficient": ""}]}}).json()["error"]
    assert right["state"] == "error" and right["text"] == ""
    assert right["error"] == (f"400 invalid_request_error ({expected['code']}): {expected['message']}\n"
                              f"param: {expected['param']}")
    assert expected["param"] == "reftkit.steer[0].coefficient"
    set_value(browser, "max-tokens", 100000)
    left, right = send_and_wait(browser)
    for p in (left, right):
        assert p["state"] == "error" and p["error"].startswith("400 invalid_request_error") and \
            "param: max_tokens" in p["error"]


def test_api_key_is_sent_as_a_bearer_token(assets, browser):
    app = make_app(assets, max_wait_ms=300, max_new_tokens=16, api_keys=[KEY])
    with running(app) as url:
        open_page(browser, url)  # the page itself is open; the API is not
        message = browser.find_element("id", "models-error").text
        assert message.startswith("GET /v1/models: 401 authentication_error (missing_api_key)") and "API key" in message
        assert browser.execute_script("return document.getElementById('adapter').options.length") == 0
        set_value(browser, "api-key", KEY)
        wait(browser, lambda d: d.execute_script("return document.getElementById('adapter').options.length") == 4,
             what="the models with the key")
        assert browser.find_element("id", "models-error").text == ""
        choose(browser, right_model="caps", max_tokens=4)
        left, right = send_and_wait(browser)
        assert (left["text"], right["text"]) == (api_reply(url, BASE, 4, api_key=KEY),
                                                 api_reply(url, "caps", 4, api_key=KEY))
        browser.find_element("id", "copy-curl").click()
        curl = wait(browser, lambda d: d.find_element("id", "snippet").get_attribute("value"), what="the snippet")
        assert '"Authorization: Bearer $REFTKIT_API_KEY"' in curl and KEY not in curl  # the key is not copied out
        set_value(browser, "api-key", "wrong-key-123")
        wait(browser, lambda d: "401 authentication_error (invalid_api_key)" in
             d.find_element("id", "models-error").text, what="the wrong key's error")
