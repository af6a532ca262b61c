"""A real S3-protocol server on 127.0.0.1 (moto's server mode) for the quickstart, the tests and the benchmarks.

It runs as a separate process so that serving shards never competes with the driver for the GIL, and every client
reaches it through the same code path as AWS: an endpoint URL plus credentials from the environment. ``free_port``
gives it, and any other local server (a landmark service, a test's Ray head), a port of its own.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

# moto accepts any keys; these make signed requests work without touching the user's real credentials.
TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now: for this server, and the other local servers of the quickstart, the tests
    and the benchmarks (a landmark service, a Ray head), which must not collide with another."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LocalS3Server:
    """``with LocalS3Server() as s3: s3.create_bucket("gldv2")``; ``s3.endpoint_url`` goes into the data config."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 30.0) -> "LocalS3Server":
        try:
            import moto.server  # noqa: F401
        except ImportError:
            raise RuntimeError("the local S3 server needs moto: pip install 'ray-landmark[local]'") from None
        self._process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"the local S3 server on port {self.port} exited with code {self._process.returncode}")
            try:
                urllib.request.urlopen(self.endpoint_url + "/moto-api/", timeout=1)
                return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the local S3 server did not answer on {self.endpoint_url} within {timeout_s:.0f} s")

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
            self._process = None

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id=TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        )

    def create_bucket(self, name: str, public: bool = False) -> str:
        self.client().create_bucket(Bucket=name, **({"ACL": "public-read"} if public else {}))
        return f"s3://{name}"

    def __enter__(self) -> "LocalS3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def use_test_credentials() -> None:
    """Export the local server's keys (before ray.init, so that local workers inherit them), keeping real ones."""
    for key, value in TEST_CREDENTIALS.items():
        os.environ.setdefault(key, value)
