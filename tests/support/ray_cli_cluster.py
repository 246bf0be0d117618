"""Ray clusters started the way users start them (`ray start`), on this machine, for tests.

Several clusters live on this machine during a test session (the session's own, these), so
every node gets its own ports, including the dashboard agent's and the metrics port (a second
agent on a taken port never starts, and `ray job submit` then answers "No available agent").
Each cluster keeps its own temp dir, so no `ray_current_cluster` file is left for a later
`ray.init()` to find. Stopping kills only this cluster's processes: every process it started
carries a marker in its environment, inherited by the workers its raylets spawn.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil

from tests.support.fixtures import free_port, wait_http

MARKER = "PIPELINE_TEST_CLUSTER"
VENV_BIN = str(Path(sys.executable).parent)


def _node_ports() -> list[str]:
    return [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
            "--min-worker-port=0", "--max-worker-port=0"]


class LocalRayCluster:
    """A head and worker nodes started with `ray start`, stopped by pid."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.id = uuid.uuid4().hex[:12]
        # Short: Ray puts unix sockets below it, and their paths are limited to 107 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix="rt-", dir="/tmp")
        self.env = {k: v for k, v in {**os.environ, **(env or {})}.items()
                    if k not in ("RAY_ADDRESS",)}
        # The job's `python` is whatever PATH the nodes were started with: this venv's.
        self.env["PATH"] = VENV_BIN + os.pathsep + self.env.get("PATH", "")
        self.env.setdefault("RAY_AUTH_MODE", "disabled")
        self.env[MARKER] = self.id
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.nodes = 0

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _ray_start(self, args: list[str], env: dict[str, str] | None) -> None:
        cmd = [os.path.join(VENV_BIN, "ray"), "start", "--node-ip-address=127.0.0.1",
               "--disable-usage-stats", *_node_ports(), *args]
        proc = subprocess.run(cmd, env={**self.env, **(env or {})}, capture_output=True,
                              text=True, timeout=180)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        self.nodes += 1

    def start_head(self, num_cpus: int, env: dict[str, str] | None = None,
                   extra_args: tuple[str, ...] = ()) -> LocalRayCluster:
        self._ray_start(["--head", f"--port={self.gcs_port}", f"--num-cpus={num_cpus}",
                         "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                         f"--dashboard-port={self.dashboard_port}",
                         f"--ray-client-server-port={free_port()}",
                         f"--temp-dir={self.temp_dir}", *extra_args], env)
        wait_http(self.dashboard_url + "/api/version", timeout_s=60)
        return self

    def start_autoscaling_head(self, worker_cpus: int, max_workers: int) -> LocalRayCluster:
        """A head of 0 CPUs whose autoscaler adds nodes on this machine (Ray's fake multi-node
        provider, the one behind ray.cluster_utils.AutoscalingCluster, which would run
        `ray stop --force` and so kill every other Ray on the machine)."""
        config = {
            "cluster_name": f"fake-{self.id}", "max_workers": max_workers,
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                         "disable_node_updaters": True, "disable_launch_config_check": True,
                         "gcs_address": self.gcs_address},
            "available_node_types": {
                "ray.head.default": {"resources": {"CPU": 0}, "node_config": {},
                                     "max_workers": 0},
                "cpu_node": {"resources": {"CPU": worker_cpus}, "node_config": {},
                             "min_workers": 0, "max_workers": max_workers},
            },
            "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": 1.0,
            "idle_timeout_minutes": 5, "docker": {}, "initialization_commands": [],
            "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
            "head_start_ray_commands": [], "worker_start_ray_commands": [], "file_mounts": {},
            "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "rsync_exclude": [], "rsync_filter": [],
        }
        path = Path(self.temp_dir) / "autoscaling.json"
        path.write_text(json.dumps(config))
        return self.start_head(0, env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"},
                               extra_args=(f"--autoscaling-config={path}",))

    def add_node(self, num_cpus: int, env: dict[str, str] | None = None) -> LocalRayCluster:
        self._ray_start([f"--address={self.gcs_address}", f"--num-cpus={num_cpus}"], env)
        return self

    def alive_nodes(self) -> dict[str, bool]:
        """Node id -> whether it is the head, for the nodes alive now."""
        import urllib.request

        with urllib.request.urlopen(self.dashboard_url + "/api/v0/nodes", timeout=5) as response:
            nodes = json.loads(response.read())["data"]["result"]["result"]
        return {n["node_id"]: n["is_head_node"] for n in nodes if n["state"] == "ALIVE"}

    def wait_for_nodes(self, count: int, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if len(self.alive_nodes()) >= count:
                    return
            except (OSError, KeyError, ValueError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the cluster did not reach {count} nodes in {timeout_s}s")

    def processes(self) -> list[psutil.Process]:
        mine = []
        for proc in psutil.process_iter():
            try:
                if proc.environ().get(MARKER) == self.id:
                    mine.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return mine

    def stop(self) -> None:
        # A few passes: a raylet can spawn a worker after the first look, which would outlive it.
        for _ in range(3):
            procs = self.processes()
            if not procs:
                break
            for proc in procs:
                try:
                    proc.send_signal(signal.SIGTERM)
                except psutil.NoSuchProcess:
                    continue
            _, alive = psutil.wait_procs(procs, timeout=5)
            for proc in alive:
                try:
                    proc.kill()
                except psutil.NoSuchProcess:
                    continue
            psutil.wait_procs(alive, timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
