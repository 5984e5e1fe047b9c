"""Starting `calm serve` processes for tests (and benchmarks): a real server on 127.0.0.1."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

SRC = str(Path(__file__).resolve().parents[1] / "src")


class ServerProcess:
    """``python -m calm serve CKPT --port 0 ...`` with its log in a file (never a pipe that
    could fill up and block it); `wait_ready` reads the port from the log and polls /health."""

    def __init__(self, checkpoint, log_path, *args: str, threads: int = 1):
        env = dict(os.environ)
        env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
        env.setdefault("OMP_NUM_THREADS", "1")
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "w")
        cmd = [
            sys.executable,
            "-m",
            "calm",
            "serve",
            str(checkpoint),
            "--port",
            "0",
            "--threads",
            str(threads),
        ]
        self.proc = subprocess.Popen(
            [*cmd, "--log-level", "warning", *args], stdout=self._log, stderr=subprocess.STDOUT, env=env
        )
        self.url: str | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 600.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"calm serve exited with {self.proc.returncode}:\n{self.log()}")
            if self.url is None:
                m = re.search(r"listening on (http://[\d.]+:\d+)", self.log())
                if m:
                    self.url = m.group(1)
            if self.url is not None:
                try:
                    if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                        return self.url
                except httpx.HTTPError:
                    pass
            time.sleep(0.2)
        raise TimeoutError(f"calm serve not ready after {timeout} s:\n{self.log()}")

    def rss_bytes(self) -> int:
        """The server process's resident memory (Linux /proc)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the server process has used (Linux /proc)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self, timeout: float = 300.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
