"""A throwaway S3 server (SeaweedFS ``weed server -s3``) for tests and benchmarks.

``SeaweedServer`` runs master, volume, filer and S3 gateway in one ``weed``
process bound to 127.0.0.1 on free ports, with one access key configured
through ``-s3.config``. ``stop()`` kills it with SIGKILL (a crash, not a
shutdown) and ``start()`` brings it back on the same ports and data directory,
so tests can cut the storage off mid-upload.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

__all__ = ["SeaweedServer", "find_weed"]

ACCESS_KEY = "hpresil-test-key"
SECRET_KEY = "hpresil-test-secret"


def find_weed() -> str | None:
    """The ``weed`` binary: ``$HPRESIL_WEED``, next to this Python (venv), or on PATH."""
    env = os.environ.get("HPRESIL_WEED")
    if env and os.access(env, os.X_OK):
        return env
    beside = os.path.join(os.path.dirname(sys.executable), "weed")
    if os.access(beside, os.X_OK):
        return beside
    return shutil.which("weed")


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SeaweedServer:
    """One SeaweedFS server with an S3 endpoint.

    Args:
        data_dir: where volumes and metadata live (kept across stop/start).
        binary: the ``weed`` executable.
        bucket: a bucket created on first start.
        volume_size_mb: SeaweedFS volume size; capacity is ``volume_max`` volumes of it.
        volume_max: number of volumes.
    """

    def __init__(
        self, data_dir: str, binary: str, *, bucket: str = "hpresil", volume_size_mb: int = 256, volume_max: int = 16
    ) -> None:
        self.data_dir = data_dir
        self.binary = binary
        self.bucket = bucket
        self.volume_size_mb = volume_size_mb
        self.volume_max = volume_max
        (self.master, self.master_grpc, self.volume, self.volume_grpc, self.filer, self.filer_grpc, self.port, self.s3_grpc) = (
            _free_ports(8)
        )
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.access_key = ACCESS_KEY
        self.secret_key = SECRET_KEY
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = os.path.join(data_dir, "weed.log")
        os.makedirs(data_dir, exist_ok=True)
        self.config_path = os.path.join(data_dir, "s3.json")
        with open(self.config_path, "w") as f:
            json.dump(
                {
                    "identities": [
                        {
                            "name": "hpresil",
                            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                },
                f,
            )
        self._bucket_made = False

    @property
    def env(self) -> dict[str, str]:
        """AWS environment variables that point boto3/s3fs at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    @property
    def storage_options(self) -> dict[str, Any]:
        """s3fs options for this server (an alternative to :attr:`env`)."""
        return {"endpoint_url": self.endpoint, "key": self.access_key, "secret": self.secret_key}

    def url(self, prefix: str = "") -> str:
        """``s3://<bucket>/<prefix>``."""
        return f"s3://{self.bucket}/{prefix}".rstrip("/")

    def client(self) -> Any:
        """A boto3 S3 client for this server."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(connect_timeout=2, retries={"max_attempts": 2}),
        )

    def start(self, timeout: float = 60.0) -> None:
        """Starts (or restarts) the server and waits until the bucket answers.

        Raises:
            RuntimeError: it did not become ready within ``timeout`` (log attached).
        """
        if self.proc is not None and self.proc.poll() is None:
            return
        cmd = [
            self.binary, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={self.data_dir}",
            f"-master.port={self.master}", f"-master.port.grpc={self.master_grpc}",
            f"-volume.port={self.volume}", f"-volume.port.grpc={self.volume_grpc}",
            "-filer", f"-filer.port={self.filer}", f"-filer.port.grpc={self.filer_grpc}",
            "-s3", f"-s3.port={self.port}", f"-s3.port.grpc={self.s3_grpc}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={self.config_path}",
            f"-master.volumeSizeLimitMB={self.volume_size_mb}", f"-volume.max={self.volume_max}",
            "-volume.preStopSeconds=0", "-metricsPort=0", "-master.resumeState=false",
            "-master.electionTimeout=1s",
        ]  # fmt: skip
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if self._ready():
                return
            time.sleep(0.1)
        tail = self.log_tail()
        self.stop()
        raise RuntimeError(f"SeaweedFS did not become ready in {timeout:.0f}s:\n{tail}")

    def _ready(self) -> bool:
        try:
            urllib.request.urlopen(self.endpoint + "/", timeout=1)
        except urllib.error.HTTPError:
            pass  # any HTTP answer means the gateway is up (it says 403 to anonymous)
        except OSError:
            return False
        try:
            c = self.client()
            if not self._bucket_made:
                try:
                    c.create_bucket(Bucket=self.bucket)
                except c.exceptions.BucketAlreadyOwnedByYou:
                    pass
                except c.exceptions.BucketAlreadyExists:
                    pass
                self._bucket_made = True
            c.put_object(Bucket=self.bucket, Key=".ready", Body=b"1")
            return True
        except Exception:  # noqa: BLE001 - volume server not registered yet
            return False

    def stop(self) -> None:
        """Kills the server with SIGKILL (as a crash would) and waits for it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None
        # SeaweedFS puts a unix socket per listener in /tmp itself (not $TMPDIR); a killed server leaves them.
        ports = {self.master_grpc, self.volume_grpc, self.filer, self.filer_grpc, self.port, self.s3_grpc}
        for name in os.listdir("/tmp"):
            if name.startswith("seaweedfs-") and name.endswith(".sock") and name[:-5].rsplit("-", 1)[-1].isdigit() \
                    and int(name[:-5].rsplit("-", 1)[-1]) in ports:
                try:
                    os.unlink(os.path.join("/tmp", name))
                except FileNotFoundError:
                    pass

    def log_tail(self, n: int = 4000) -> str:
        """The end of the server log (for failure messages)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - n))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> "SeaweedServer":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
