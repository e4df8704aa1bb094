"""The chat page of `tinylm serve` in a real browser: headless Chromium (Debian's chromium and
chromium-driver, driven by selenium) loads /, sends a message, watches the reply stream in,
and stops a second one halfway. Skips with a reason where Chromium or selenium is absent."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tinylm.chat import encode_chat
from tinylm.generate import SamplingConfig, generate, load_for_generation
from tinylm.tokenizer import Tokenizer

CHROMIUM, DRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1100,760"]

pytestmark = pytest.mark.slow

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is a test extra")
pytest.importorskip("uvicorn", reason="tinylm serve needs the serve extra (uvicorn)")
pytest.importorskip("openai", reason="test_serve's helpers need the openai client")
if not (CHROMIUM.exists() and DRIVER.exists()):
    pytest.skip(f"needs {CHROMIUM} and {DRIVER} (Debian: apt-get install chromium "
                "chromium-driver; make test does it as root)", allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402
from test_serve import Slowed, tiny_run  # noqa: E402

from tinylm.serve import ServerThread, bind, make_server  # noqa: E402


@pytest.fixture
def browser(tmp_path: Path):
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options,
                              service=webdriver.ChromeService(executable_path=str(DRIVER)))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait_until(condition, what: str, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def settings(browser, **values: float) -> None:
    """Set fields of the settings panel as a user would (the page hears input and change)."""
    for name, value in values.items():
        browser.execute_script(
            "const f = document.getElementById(arguments[0]); f.value = arguments[1];"
            "f.dispatchEvent(new Event('input')); f.dispatchEvent(new Event('change'));",
            name.replace("_", "-"), str(value))


def text_of(message) -> str:
    """The exact text of a message box (selenium's .text folds white space)."""
    return message.find_element(By.CLASS_NAME, "text").get_property("textContent")


def test_chat_page_streams_a_reply_and_stops_one(browser, tmp_path: Path) -> None:
    run_dir = tiny_run(tmp_path / "run")
    engine, app = make_server(run_dir, "cpu", max_batch=4)
    message, max_tokens = "Hello, who are you?", 24
    tok = Tokenizer.bytes_only()
    ids = encode_chat(tok, [{"role": "user", "content": message}], True)
    model = load_for_generation(run_dir, "cpu").model
    (expected,) = generate(model, tok, [ids], SamplingConfig(max_tokens, temperature=0))
    assert len(expected.text) > 4
    engine.model = Slowed(engine.model, 0.04)  # a token every 40 ms: the stream can be seen
    try:
        with ServerThread(app, bind("127.0.0.1", 0)) as server:
            browser.get(server.url + "/")
            model_label = browser.find_element(By.ID, "model")
            wait_until(lambda: run_dir.name in model_label.text, "the page shows the model")
            settings(browser, temperature=0, max_tokens=max_tokens)  # greedy, short
            browser.find_element(By.ID, "prompt").send_keys(message)
            browser.find_element(By.ID, "send").click()
            reply = wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, ".msg.assistant"),
                               "a reply box")[0]
            seen = set()
            while "streaming" in reply.get_attribute("class"):
                seen.add(text_of(reply))
                if len(seen) == 3:  # the reply half-way, its cursor blinking
                    browser.save_screenshot(str(tmp_path / "chat-streaming.png"))
                time.sleep(0.01)
            final = text_of(reply)
            partial = {t for t in seen if t and t != final}
            assert partial, "the text appeared only at the end, not streamed"
            assert all(final.startswith(t) for t in partial)
            assert final == expected.text
            assert "tokens in" in reply.find_element(By.CLASS_NAME, "meta").text
            user = browser.find_element(By.CSS_SELECTOR, ".msg.user .text").text
            assert user == message
            browser.save_screenshot(str(tmp_path / "chat.png"))

            # the conversation and 60 more tokens overflow the context of 96: an error shown
            settings(browser, max_tokens=60)
            browser.find_element(By.ID, "prompt").send_keys("Tell me more")
            browser.find_element(By.ID, "send").click()
            error = wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, ".msg.error"),
                               "an error box")[0]
            assert "maximum context length is 96" in error.text

            # a new chat with a long answer, stopped by the Stop button
            browser.find_element(By.ID, "new-chat").click()
            assert not browser.find_elements(By.CSS_SELECTOR, ".msg")
            browser.find_element(By.ID, "prompt").send_keys("Tell me more")
            browser.find_element(By.ID, "send").click()
            second = wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, ".msg.assistant"),
                                "reply 2")[0]
            wait_until(lambda: text_of(second), "first tokens")
            browser.find_element(By.ID, "stop").click()
            wait_until(lambda: "stopped" in second.text, "the reply is marked stopped")
            wait_until(lambda: not engine.active, "the stopped request left the batch")
            assert engine.stats.requests_cancelled >= 1
            assert browser.find_element(By.ID, "send").is_enabled()
            browser.save_screenshot(str(tmp_path / "chat-stopped.png"))
    finally:
        engine.stop()
    assert (tmp_path / "chat.png").stat().st_size > 0
