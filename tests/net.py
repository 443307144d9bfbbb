"""Loopback helpers of the tests that start servers (a Ray head, an MLflow server)."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, log: Path, what: str, timeout: float = 120.0) -> bytes:
    """Poll ``url`` until it answers; fail the test (with the log's tail) if ``process`` dies or time runs out."""
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.read()
        except OSError:
            if time.time() > deadline or process.poll() is not None:
                process.kill()
                pytest.fail(f"{what} did not come up: {log.read_text()[-2000:]}")
            time.sleep(0.5)
