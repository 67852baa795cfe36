"""NCCL and host settings for the shard group: options -> environment, and the /dev/shm check.

Settings reach every shard as environment variables. The user's own NCCL_* environment is kept
unless a flag overrides it. Before spawning, /dev/shm is checked against what the group needs
(NCCL's SHM transport maps its buffers there; Docker's default 64 MB makes NCCL die with SIGBUS),
while P2P is decided by the shards themselves, per pair of GPUs (shard/devices.py).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from shardline.common.flags import at_least

MIB = 1024 * 1024
SHM_PER_RANK = 128 * MIB
SHM_FIXES = ("give the container more shared memory: `docker run --shm-size=1g`, compose `shm_size: 1gb`, "
             "or in Kubernetes mount an emptyDir with `medium: Memory` (and a sizeLimit) at /dev/shm; "
             "or turn NCCL's shared-memory transport off with `--nccl-shm off` (slower)")


def on_off(value: str) -> bool:
    if value not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off, got {value!r}")
    return value == "on"


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("NCCL and host settings (passed to every shard as environment)")
    g.add_argument("--nccl-shm", type=on_off, default=None, metavar="on|off",
                   help="NCCL shared-memory transport (NCCL_SHM_DISABLE); default: NCCL's / your environment's")
    g.add_argument("--nccl-p2p", type=on_off, default=None, metavar="on|off",
                   help="NCCL peer-to-peer transport (NCCL_P2P_DISABLE); off fixes hangs with TP>2 over broken PCIe P2P")
    g.add_argument("--nccl-p2p-level", default=None,
                   help="NCCL_P2P_LEVEL, e.g. LOC, NVL, PIX, PXB, PHB, SYS")
    g.add_argument("--nccl-ib", type=on_off, default=None, metavar="on|off", help="InfiniBand (NCCL_IB_DISABLE)")
    g.add_argument("--nccl-socket-ifname", default=None, help="NCCL_SOCKET_IFNAME (and GLOO_SOCKET_IFNAME), e.g. eth0")
    g.add_argument("--nccl-debug", default=None, help="NCCL_DEBUG: WARN, INFO or TRACE")
    g.add_argument("--shm-check-path", type=Path, default=Path("/dev/shm"),
                   help="shared-memory mount checked before the shards start")
    g.add_argument("--shm-required-bytes", type=at_least(0), default=None,
                   help="bytes of free shared memory required; default: 128 MiB per rank for CUDA groups "
                        "with the SHM transport on, else no check")


@dataclass(frozen=True)
class NcclSettings:
    shm: bool | None = None
    p2p: bool | None = None
    p2p_level: str | None = None
    ib: bool | None = None
    socket_ifname: str | None = None
    debug: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "NcclSettings":
        return cls(args.nccl_shm, args.nccl_p2p, args.nccl_p2p_level, args.nccl_ib,
                   args.nccl_socket_ifname, args.nccl_debug)

    def environment(self, base: Mapping[str, str]) -> dict[str, str]:
        """The shards' NCCL environment: the user's NCCL_* variables, overridden by the flags."""
        env = {k: v for k, v in base.items() if k.startswith(("NCCL_", "GLOO_SOCKET_IFNAME"))}
        disable = {"NCCL_SHM_DISABLE": self.shm, "NCCL_P2P_DISABLE": self.p2p, "NCCL_IB_DISABLE": self.ib}
        for name, enabled in disable.items():
            if enabled is not None:
                env[name] = "0" if enabled else "1"
        for name, value in (("NCCL_P2P_LEVEL", self.p2p_level), ("NCCL_DEBUG", self.debug),
                            ("NCCL_SOCKET_IFNAME", self.socket_ifname), ("GLOO_SOCKET_IFNAME", self.socket_ifname)):
            if value:
                env[name] = value
        return env


def required_shm_bytes(explicit: int | None, device: str, world_size: int, env: Mapping[str, str]) -> int:
    if explicit is not None:
        return explicit
    shm_on = env.get("NCCL_SHM_DISABLE", "0") != "1"
    return SHM_PER_RANK * world_size if device.startswith("cuda") and world_size > 1 and shm_on else 0


def check_shm(path: Path, required: int) -> None:
    """Raises with the fixes when the shared-memory mount has less free space than required."""
    if required <= 0:
        return
    try:
        st = os.statvfs(path)
    except OSError as exc:
        raise RuntimeError(f"cannot check shared memory at {path}: {exc}; {SHM_FIXES}") from None
    free = st.f_bavail * st.f_frsize
    if free < required:
        raise RuntimeError(
            f"{path} has {free // MIB} MiB free but the shard group needs {required // MIB} MiB "
            f"(NCCL maps its shared-memory buffers there and crashes with SIGBUS when it runs out). "
            f"Fix: {SHM_FIXES}")
