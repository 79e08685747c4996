"""A tiny Chrome DevTools Protocol client over ``--remote-debugging-pipe``: headless Chromium, no extra packages.

``chromium --screenshot`` can only wait a fixed virtual-time budget, which either wastes time or catches a
single-page app mid-spinner. Driving the browser over DevTools lets the screenshot script wait for what the page
must show (run names, loaded images), close panels and scroll, then capture. The pipe transport (file
descriptors 3 and 4, NUL-terminated JSON) needs neither a websocket library nor a debugging port.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Quiet, reproducible headless flags: no GPU, no sandbox (containers run as root), nothing phoning home.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
)


def find_chromium(explicit: str | None = None) -> str | None:
    """The Chromium executable: ``explicit``, else ``$CHROMIUM``, else the first candidate on PATH; or None."""
    for name in (explicit, os.environ.get("CHROMIUM"), *CHROMIUM_CANDIDATES):
        if name and (found := shutil.which(name)):
            return found
    return None


class Browser:
    """One headless Chromium with a single page, driven over the DevTools pipe. Use as a context manager.

    Args:
        executable: the Chromium binary.
        width, height: the viewport in CSS pixels.
        timeout: default seconds to wait for any single DevTools answer.
    """

    def __init__(self, executable: str, width: int = 1600, height: int = 1000, timeout: float = 60.0) -> None:
        self.timeout, self.size = timeout, (width, height)
        self._profile = tempfile.mkdtemp(prefix="chromium-profile-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # Chromium reads commands from fd 3 and writes answers to fd 4. close_fds=False keeps them open across
        # exec; every other descriptor Python opens is non-inheritable (PEP 446), so nothing else leaks.
        self._proc = subprocess.Popen(
            [
                executable,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={self._profile}",
                f"--window-size={width},{height}",
                "--remote-debugging-pipe",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=False,
            preexec_fn=_move_fds(to_browser_r, from_browser_w),
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer, self._next_id, self.session = b"", 0, None
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )
        self.send("Page.enable")

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop Chromium (by its own PID) and delete the throw-away profile."""
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        for fd in (self._to_browser, self._from_browser):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self._profile, ignore_errors=True)

    def send(self, method: str, params: dict[str, Any] | None = None, session: bool = True) -> dict[str, Any]:
        """Send one DevTools command (to the page session once attached) and return its ``result``.

        Raises:
            RuntimeError: Chromium answered with an error or exited.
            TimeoutError: no answer within ``self.timeout`` seconds.
        """
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session and self.session:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            answer = self._read_message(deadline)
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise RuntimeError(f"Chromium refused {method}: {answer['error']}")
                return answer.get("result", {})

    def _read_message(self, deadline: float) -> dict[str, Any]:
        import select

        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"Chromium did not answer within {self.timeout:.0f} s")
            ready, _, _ = select.select([self._from_browser], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium exited (code {self._proc.poll()}) while talking over DevTools")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def evaluate(self, expression: str) -> Any:
        """Evaluate JavaScript in the page (promises awaited) and return its JSON value."""
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails'].get('text')}: {expression[:200]}")
        return result["result"].get("value")

    def goto(self, url: str) -> None:
        """Navigate; single-page apps keep loading after this, so follow with :meth:`wait_for`."""
        self.send("Page.navigate", {"url": url})

    def wait_for(self, expression: str, timeout: float, what: str) -> None:
        """Poll a JavaScript condition until it is truthy.

        Raises:
            TimeoutError: naming ``what`` and the page's visible text, to show what was on screen instead.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.evaluate(expression):
                return
            time.sleep(0.5)
        text = self.evaluate("document.body ? document.body.innerText.slice(0, 500) : ''")
        raise TimeoutError(f"page did not show {what} within {timeout:.0f} s; it showed: {text!r}")

    def resize(self, width: int, height: int) -> None:
        """Set the viewport (what :meth:`screenshot` captures) to ``width`` x ``height`` CSS pixels."""
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )
        self.size = (width, height)

    def click(self, point_expression: str, what: str) -> None:
        """A real mouse click (pointer events included) at the ``[x, y]`` that ``point_expression`` returns.

        Raises:
            RuntimeError: the expression found nothing to click (it returned ``null``), naming ``what``.
        """
        point = self.evaluate(point_expression)
        if not point:
            raise RuntimeError(f"nothing to click: {what} is not on the page")
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.send(
                "Input.dispatchMouseEvent",
                {"type": kind, "x": point[0], "y": point[1], "button": "left", "clickCount": 1},
            )

    def type_text(self, text: str) -> None:
        """Type ``text`` into the focused element, then press Enter."""
        self.send("Input.insertText", {"text": text})
        for kind in ("keyDown", "keyUp"):
            self.send(
                "Input.dispatchKeyEvent", {"type": kind, "key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13}
            )

    def screenshot(self, path: Path, height: int | None = None) -> Path:
        """Capture the viewport (its top ``height`` pixels when given) as PNG into ``path`` (written beside it, then
        renamed)."""
        params: dict[str, Any] = {"format": "png"}
        if height:
            params["clip"] = {"x": 0, "y": 0, "width": self.size[0], "height": height, "scale": 1}
        data = base64.b64decode(self.send("Page.captureScreenshot", params)["data"])
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        partial.write_bytes(data)
        partial.replace(path)
        return path


def _move_fds(read_end: int, write_end: int):
    """A ``preexec_fn`` placing the pipe ends on fds 3 and 4 in the child, where Chromium expects them."""

    def move() -> None:
        # Duplicate to high numbers first so that dup2 onto 3/4 never clobbers the other end.
        high_read, high_write = os.dup(read_end), os.dup(write_end)
        os.dup2(high_read, 3)
        os.dup2(high_write, 4)

    return move
