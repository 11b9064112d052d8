"""Open a local HTML file in headless Chromium (Debian's /usr/bin/chromium) and report what a reader sees.

Talks the DevTools protocol over a pipe (``--remote-debugging-pipe``: commands on fd 3, replies on fd 4),
so no port is opened and no extra package is needed. Reports the console errors and uncaught exceptions,
the ids of the ``<section>`` elements with their rendered size, the page's width and height, and a
full-page PNG screenshot at the given width.

    python tests/chromium.py RUN/report.html docs/report.png [--width 1280]
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--remote-debugging-pipe"]

_SECTIONS_JS = """JSON.stringify({
  sections: [...document.querySelectorAll('section')].map(s => ({id: s.id, h: s.offsetHeight, w: s.offsetWidth,
    visible: s.offsetHeight > 0 && getComputedStyle(s).display !== 'none' && getComputedStyle(s).visibility !== 'hidden'})),
  images: [...document.images].map(i => ({ok: i.complete && i.naturalWidth > 0, w: i.naturalWidth})),
  width: document.documentElement.scrollWidth, height: document.documentElement.scrollHeight,
  external: [...document.querySelectorAll('[src],[href]')].map(e => e.getAttribute('src') || e.getAttribute('href'))
    .filter(u => !u.startsWith('data:') && !u.startsWith('#'))})"""


class _Pipe:
    def __init__(self, proc: subprocess.Popen, write_fd: int, read_fd: int):
        self.proc, self.write_fd, self.read_fd, self.buf, self.next_id = proc, write_fd, read_fd, b"", 0
        self.events: list[dict] = []

    def _read(self, timeout: float) -> dict:
        deadline = time.time() + timeout
        while b"\0" not in self.buf:
            if time.time() > deadline or self.proc.poll() is not None:
                raise TimeoutError("no answer from chromium")
            chunk = os.read(self.read_fd, 1 << 20)
            if not chunk:
                raise EOFError("chromium closed the pipe")
            self.buf += chunk
        msg, self.buf = self.buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.write_fd, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._read(timeout)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, name: str, timeout: float = 60) -> dict:
        for e in self.events:
            if e.get("method") == name:
                return e
        deadline = time.time() + timeout
        while time.time() < deadline:
            e = self._read(deadline - time.time())
            self.events.append(e)
            if e.get("method") == name:
                return e
        raise TimeoutError(name)


def inspect_page(html: str | Path, width: int = 1280, chromium: str = CHROMIUM) -> dict:
    """Load ``html``; return ``{"errors": [...], "sections": [...], "images": [...], "width", "height", "png"}``."""
    html = Path(html).resolve()
    profile = tempfile.mkdtemp(prefix="petmix-chromium-")
    to_child_r, to_child_w = os.pipe()
    from_child_r, from_child_w = os.pipe()

    def child_fds() -> None:  # chromium reads commands on fd 3 and writes replies on fd 4
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_child_r, from_child_w)]  # never clobber one
        os.dup2(high[0], 3)
        os.dup2(high[1], 4)

    proc = subprocess.Popen([chromium, *FLAGS, f"--user-data-dir={profile}", "about:blank"], preexec_fn=child_fds,
                            pass_fds=(3, 4), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(to_child_r)
    os.close(from_child_w)
    pipe = _Pipe(proc, to_child_w, from_child_r)
    try:
        target = pipe.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = pipe.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            pipe.call(f"{domain}.enable", session=session)
        pipe.call("Emulation.setDeviceMetricsOverride", {"width": width, "height": 900, "deviceScaleFactor": 1,
                                                         "mobile": False}, session=session)
        pipe.call("Page.navigate", {"url": html.as_uri()}, session=session)
        pipe.wait_event("Page.loadEventFired")
        info = json.loads(pipe.call("Runtime.evaluate", {"expression": _SECTIONS_JS, "returnByValue": True},
                                    session=session)["result"]["value"])
        shot = pipe.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": {
            "x": 0, "y": 0, "width": width, "height": info["height"], "scale": 1}}, session=session)
        errors = []
        for e in pipe.events:
            p = e.get("params", {})
            if e.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                errors.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in p.get("args", [])))
            elif e.get("method") == "Runtime.exceptionThrown":
                errors.append("exception: " + p.get("exceptionDetails", {}).get("text", ""))
            elif e.get("method") == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                errors.append("log: " + p["entry"].get("text", ""))
        return {**info, "errors": errors, "png": base64.b64decode(shot["data"])}
    finally:
        try:
            pipe.call("Browser.close", timeout=10)
        except Exception:  # noqa: BLE001 - closing anyway
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        os.close(to_child_w)
        os.close(from_child_r)
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("html")
    ap.add_argument("png")
    ap.add_argument("--width", type=int, default=1280)
    a = ap.parse_args()
    result = inspect_page(a.html, a.width)
    Path(a.png).write_bytes(result.pop("png"))
    print(json.dumps(result, indent=1))
    sys.exit(1 if result["errors"] else 0)
