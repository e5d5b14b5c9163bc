"""Open a local HTML page in headless Chromium (Debian's package) over the DevTools protocol and
report what a person would see go wrong: console errors, uncaught exceptions, broken images."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

CHECK_IMAGES = """(() => { const imgs = Array.from(document.images);
  return JSON.stringify({images: imgs.length,
                         broken: imgs.filter(i => !i.complete || i.naturalWidth === 0)
                                     .map(i => i.alt || i.src.slice(0, 40)),
                         title: document.title, text: document.body.innerText.length}); })()"""


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


class Page:
    """One headless browser with one tab, driven over a DevTools websocket."""

    def __init__(self, timeout: float = 60.0):
        import websocket  # websocket-client

        self.profile = tempfile.mkdtemp(prefix="tunesmith-chromium-")
        self.proc = subprocess.Popen([chromium(), "--headless=new", "--no-sandbox", "--disable-gpu",
                                      "--remote-debugging-port=0", f"--user-data-dir={self.profile}",
                                      "--no-first-run", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        port = self._port(timeout)
        targets = json.loads(_http_get(f"http://127.0.0.1:{port}/json/list"))
        page = next(t for t in targets if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=timeout, suppress_origin=True)
        self.next_id, self.events = 0, []
        for method in ("Runtime.enable", "Log.enable", "Page.enable"):
            self.call(method)

    def _port(self, timeout: float) -> int:
        deadline = time.time() + timeout
        while time.time() < deadline:
            line = self.proc.stderr.readline()
            m = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
            if m:
                return int(m.group(1))
        raise RuntimeError("chromium did not start its DevTools server")

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, event: str, timeout: float = 60.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            msg = json.loads(self.ws.recv())
            self.events.append(msg)
            if msg.get("method") == event:
                return
        raise TimeoutError(event)

    def open(self, path: Path) -> dict:
        """Load the page; returns {images, broken, console_errors, exceptions, title, text}."""
        return self.open_url(Path(path).resolve().as_uri())

    def open_url(self, url: str) -> dict:
        """Load `url` (file: or http:); returns {images, broken, console_errors, exceptions, title, text},
        the errors counted since this browser started (or since `events` was last cleared)."""
        self.call("Page.navigate", url=url)
        self.wait_for("Page.loadEventFired")
        return self.state()

    def state(self) -> dict:
        """What the current page shows now: {images, broken, title, text} and the errors seen so far."""
        state = json.loads(self.call("Runtime.evaluate", expression=CHECK_IMAGES)["result"]["value"])
        state["console_errors"] = [e["params"]["args"][0].get("value", "") for e in self.events
                                   if e.get("method") == "Runtime.consoleAPICalled"
                                   and e["params"]["type"] in ("error", "assert")]
        state["console_errors"] += [e["params"]["entry"]["text"] for e in self.events
                                    if e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error"]
        state["exceptions"] = [e["params"]["exceptionDetails"].get("text", "") for e in self.events
                               if e.get("method") == "Runtime.exceptionThrown"]
        return state

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, awaitPromise=True)["result"].get("value")

    def wait_until(self, expression: str, timeout: float = 30.0, poll: float = 0.2):
        """Poll the JS `expression` until it gives a truthy value (returned); TimeoutError naming the last
        value or exception after `timeout` s. A page that is navigating meanwhile just counts as not yet."""
        deadline = time.time() + timeout
        last = None
        while True:
            answer = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
            if "exceptionDetails" in answer:
                last = answer["exceptionDetails"].get("exception", {}).get("description") or answer["exceptionDetails"]
            else:
                last = answer.get("result", {}).get("value")
                if last:
                    return last
            if time.time() > deadline:
                raise TimeoutError(f"{expression} still gives {last!r} after {timeout} s")
            time.sleep(poll)

    def frame_loaded(self, url: str) -> bool:
        """Whether the page's frame loaded `url` with a 200 (a sandboxed frame has an opaque origin the
        page cannot look into, so the parent's resource timing tells)."""
        loaded = self.evaluate("JSON.stringify(performance.getEntriesByType('resource')"
                               ".filter(e => e.initiatorType === 'iframe').map(e => [e.name, e.responseStatus]))")
        return [url, 200] in json.loads(loaded)

    def fill(self, selector: str, value: str) -> None:
        """Type `value` into the field at `selector` as a person would: set it, then fire input and change."""
        self._element(selector, "el.value = " + json.dumps(value) + "; el.dispatchEvent(new Event('input', "
                      "{bubbles: true})); el.dispatchEvent(new Event('change', {bubbles: true}));")

    def click(self, selector: str) -> None:
        self._element(selector, "el.click();")

    def _element(self, selector: str, action: str) -> None:
        found = self.evaluate(f"(() => {{ const el = document.querySelector({json.dumps(selector)}); "
                              f"if (!el) return false; {action} return true; }})()")
        if not found:
            raise LookupError(f"no element {selector} on the page")

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.proc.kill()
            self.proc.wait()
            shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Page:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def rate_form(form: Path, downloads: Path, rater: str, choice: str) -> Path | None:
    """Open a human-evaluation form.html in headless Chromium, rate every pair `choice` as `rater`
    and press save; the ratings CSV the page downloaded into `downloads` (None if none came in 20 s)."""
    with Page() as browser:
        state = browser.open(form)
        assert state["console_errors"] == [] and state["exceptions"] == []
        browser.call("Page.setDownloadBehavior", behavior="allow", downloadPath=str(downloads))
        browser.evaluate(f"document.getElementById('rater').value = {json.dumps(rater)};"
                         "document.querySelectorAll('fieldset').forEach("
                         f"  f => f.querySelector(\"input[value='{choice}']\").checked = true); save();")
        deadline = time.time() + 20
        while time.time() < deadline and not list(downloads.glob("ratings-*.csv")):
            time.sleep(0.1)
    return next(downloads.glob("ratings-*.csv"), None)


def _http_get(url: str) -> str:
    from urllib.request import urlopen

    with urlopen(url, timeout=10) as r:
        return r.read().decode()
