"""Runs the services of a compose file as processes on this host, standing in for Docker.

Each service becomes one process running the image's ENTRYPOINT + the service's `command`, with
the service's `environment` on top of the image's ENV, exactly as the compose file gives them,
translated for a single host: service hostnames -> 127.0.0.1, every port the file declares
(`expose`, the container side of `ports`) -> a free local port (the same one wherever it
appears), bind-mount targets -> their host sources, and scripts the image installs (the health
check) -> their source files. The restart policy is honoured the way the Docker daemon does it:
a service whose process exits is started again after a delay that starts at 100 ms and doubles.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import deploy_files as d

LOOPBACK = "127.0.0.1"
# Addresses a container uses for itself (or to bind everywhere): on one host, its ports stand out.
SELF = ("0.0.0.0", "127.0.0.1", "localhost")
ENTRYPOINTS = {"shardline": [sys.executable, "-m", "shardline.client.cli"]}
IMAGE_ENV_SKIPPED = ("PATH", "NVIDIA_")  # the host's PATH; inert without the NVIDIA runtime


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


@dataclass
class Translation:
    """How names in a compose project map onto one host."""

    hosts: set[str]
    ports: dict[str, str]  # compose port -> local port
    mounts: dict[str, str]  # container path -> host path

    @classmethod
    def of(cls, services: dict[str, Any]) -> Translation:
        declared = set()
        for svc in services.values():
            declared |= {str(p) for p in svc.get("expose", [])}
            declared |= {str(p).rpartition(":")[2] for p in svc.get("ports", [])}
        mounts = {}
        for svc in services.values():
            for volume in svc.get("volumes", []):
                source, target = volume.split(":")[:2]
                mounts[target] = source
        return cls(set(services), {p: str(free_port()) for p in sorted(declared)}, mounts)

    def host(self, name: str) -> str:
        return LOOPBACK if name in self.hosts or name in SELF else name

    def text(self, value: str) -> str:
        """host:port pairs and mount paths inside one argument or value."""
        def pair(m: re.Match) -> str:
            host, port = m.groups()
            if host in self.hosts or host in SELF:
                assert port in self.ports, f"port {port} of {host} is not declared (expose/ports)"
                return f"{LOOPBACK}:{self.ports[port]}"
            return m.group(0)
        value = re.sub(r"([A-Za-z0-9_.-]+):(\d+)", pair, value)
        for target, source in self.mounts.items():
            if value == target or value.startswith(target + "/"):
                return source + value[len(target):]
        return value

    def argv(self, argv: list[str]) -> list[str]:
        """Values of --*-port options are ports, of --*-addr/--*-host options host names (a flag
        followed by another flag, like --insecure-shard-port, has no value)."""
        out = []
        for i, arg in enumerate(argv):
            flag = argv[i - 1] if i > 0 and argv[i - 1].startswith("--") and not arg.startswith("--") else ""
            out.append(self.port(arg) if flag.endswith("-port") else
                       self.host(arg) if flag.endswith(("-addr", "-host")) else self.text(arg))
        return out

    def env(self, env: dict[str, str]) -> dict[str, str]:
        """*_PORT variables are ports, *_ADDR/*_HOST variables host names."""
        return {k: self.port(v) if k.endswith("_PORT") else
                self.host(v) if k.endswith(("_ADDR", "_HOST")) else self.text(v) for k, v in env.items()}

    def port(self, value: str) -> str:
        assert value in self.ports, f"port {value} is not declared (expose/ports)"
        return self.ports[value]


@dataclass
class Service:
    name: str
    argv: list[str]
    env: dict[str, str]
    healthcheck: list[str]
    restart: str
    proc: subprocess.Popen | None = None
    exits: list[int] = field(default_factory=list)  # exit codes, in order
    starts: int = 0


def services_of(path: Path, variables: dict[str, str]) -> tuple[dict[str, Service], Translation]:
    """The processes a compose file describes, translated for this host."""
    image = d.dockerfile_image()
    project = d.load_compose(path, variables)["services"]
    tr = Translation.of(project)
    image_env = {k: v for k, v in image.env.items() if not k.startswith(IMAGE_ENV_SKIPPED)}
    out = {}
    for name, svc in project.items():
        argv = svc.get("entrypoint", image.entrypoint) + svc.get("command", image.cmd)
        argv = ENTRYPOINTS[argv[0]] + tr.argv(argv[1:])
        check = svc["healthcheck"]["test"]
        assert check[0] == "CMD", f"{name}: healthcheck must be CMD [...]"
        script = image.script(check[1])
        assert script, f"{name}: the image does not install {check[1]}"
        healthcheck = [sys.executable, str(d.REPO / script)] + tr.argv(check[2:])
        env = {**d.clean_environment(), **image_env, **tr.env(svc.get("environment", {}))}
        out[name] = Service(name, argv, env, healthcheck, svc.get("restart", "no"))
    return out, tr


class Loopback:
    """The services as processes; a daemon thread restarts them per their restart policy."""

    def __init__(self, services: dict[str, Service], log_dir: Path):
        self.services, self.log_dir = services, log_dir
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.daemon = threading.Thread(target=self._supervise, daemon=True)

    def __enter__(self) -> Loopback:
        for svc in self.services.values():
            self._start(svc)
        self.daemon.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.daemon.join(timeout=5)
        with self.lock:
            procs = [s.proc for s in self.services.values() if s.proc and s.proc.poll() is None]
        for p in procs:
            p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def _start(self, svc: Service) -> None:
        log = open(self.log_dir / f"{svc.name}.{svc.starts}.log", "wb")
        svc.proc = subprocess.Popen(svc.argv, env=svc.env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        svc.starts += 1

    def _supervise(self) -> None:
        delays: dict[str, float] = {}
        while not self.stopping.wait(0.05):
            for svc in self.services.values():
                with self.lock:
                    code = svc.proc.poll() if svc.proc else None
                    if code is None or self.stopping.is_set():
                        continue
                    svc.exits.append(code)
                    svc.proc = None
                if svc.restart == "always" or (svc.restart == "on-failure" and code != 0) or \
                        (svc.restart == "unless-stopped"):
                    delay = delays.get(svc.name, 0.1)
                    delays[svc.name] = min(delay * 2, 2.0)
                    time.sleep(delay)
                    with self.lock:
                        if not self.stopping.is_set():
                            self._start(svc)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        with self.lock:
            self.services[name].proc.send_signal(sig)

    def healthy(self, name: str) -> bool:
        """Runs the service's compose healthcheck command once: exit code 0?"""
        svc = self.services[name]
        out = subprocess.run(svc.healthcheck, env=svc.env, capture_output=True, timeout=30)
        return out.returncode == 0

    def wait_healthy(self, name: str, timeout: float, healthy: bool = True) -> float:
        """Seconds until the healthcheck says `healthy` (True or False); raises after `timeout`."""
        start = time.monotonic()
        while self.healthy(name) != healthy:
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"{name} not {'healthy' if healthy else 'unhealthy'} after {timeout:.0f}s; "
                                   f"logs in {self.log_dir}:\n{self.tails()}")
            time.sleep(0.5)
        return time.monotonic() - start

    def tails(self, lines: int = 15) -> str:
        out = []
        for log in sorted(self.log_dir.glob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(out)


def environment_leaks(services: dict[str, Service], tr: Translation) -> list[str]:
    """Compose names or ports left untranslated in any argv or environment value (should be none)."""
    bad = []
    skip = len(next(iter(ENTRYPOINTS.values())))  # the subcommand may share a service's name
    for svc in services.values():
        own = {k: v for k, v in svc.env.items() if k not in os.environ or os.environ[k] != v}
        for value in svc.argv[skip + 1:] + svc.healthcheck[2:] + list(own.values()):
            for host in tr.hosts:
                if re.search(rf"(^|[^A-Za-z0-9_-]){re.escape(host)}([^A-Za-z0-9_-]|$)", value):
                    bad.append(f"{svc.name}: {value!r} names service {host}")
            for port in tr.ports:
                if re.search(rf"(^|\D){port}(\D|$)", value):
                    bad.append(f"{svc.name}: {value!r} has compose port {port}")
    return bad
