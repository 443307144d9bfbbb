"""Loopback helpers of the tests that start servers (a Ray head, an MLflow server, an S3-compatible server)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
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


S3_KEY = "testing"
"""The access key and secret of :class:`S3Server` (moto accepts any)."""


@dataclass(frozen=True)
class S3Server:
    """A local S3-compatible server (moto's server mode) on a loopback port.

    Its URIs carry the endpoint and the (dummy) credentials in pyarrow's own URI form,
    ``s3://KEY:SECRET@bucket/prefix?endpoint_override=127.0.0.1:PORT&scheme=http``, so that every process that reads
    them (Ray workers started before the test included) reaches the server without any AWS_* environment variable.
    """

    host: str
    port: int

    def uri(self, path: str) -> str:
        """The URI of ``bucket/prefix`` on this server."""
        return f"s3://{S3_KEY}:{S3_KEY}@{path}?endpoint_override={self.host}:{self.port}&scheme=http"

    def upload(self, folder: Path, path: str) -> str:
        """Copy a local folder (recursively) to ``bucket/prefix``, creating the bucket; returns the URI of the copy."""
        import pyarrow.fs as pafs

        bucket = path.split("/", 1)[0]
        fs, _ = pafs.FileSystem.from_uri(f"{self.uri(bucket)}&allow_bucket_creation=true")
        fs.create_dir(bucket)
        pafs.copy_files(str(folder), path, destination_filesystem=fs)
        return self.uri(path)


RAY = str(Path(sys.executable).parent / "ray")
"""The ``ray`` command of the interpreter running the tests."""


def ray_node_command(temp_dir: str, *options: str, head: str | None = None, num_cpus: int = 2,
                     resources: dict[str, float] | None = None) -> list[str]:  # fmt: skip
    """``ray start --block`` of a head on loopback (``head`` None) or of a node joining the head at ``head``.

    Every agent port is a fresh one: the session's Ray instance (and another node on this machine) already holds
    the default ones, and a node whose agents cannot bind never runs a job or a runtime environment. The temp dir
    is its own and short (Ray's unix socket paths are length-capped). ``options`` are further ``ray start`` options.
    """
    ports = ["--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
             "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port())]  # fmt: skip
    common = ["--block", "--node-ip-address", "127.0.0.1", "--num-cpus", str(num_cpus), "--disable-usage-stats",
              "--temp-dir", temp_dir, *ports, *options]  # fmt: skip
    if resources:
        common += ["--resources", json.dumps(resources)]
    if head is None:
        return [RAY, "start", "--head", *common]
    return [RAY, "start", "--address", head, *common]


def start_process(command: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A server process in its own session (so :func:`stop_process` can end all it started), its output in ``log``."""
    return subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def stop_process(*processes: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM to each process's whole group (a Ray node's raylet, GCS and workers at once, rather than one after
    another through ``ray start --block``), then SIGKILL to a group still running after ``timeout``.

    ``ray stop`` is never used: it would end every Ray process of the machine, the test session's own included.
    """
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
    deadline = time.time() + timeout
    for process in processes:
        try:
            process.wait(timeout=max(deadline - time.time(), 0.1))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
