"""Where a shard group's own sockets listen: rank 0's rendezvous store and gloo/NCCL.

Neither the torch.distributed TCPStore nor gloo/NCCL authenticate anything, so they must listen
only where the group's ranks are. `--group-interface IFACE` names that interface: gloo uses it
(GLOO_SOCKET_IFNAME), NCCL too unless NCCL_SOCKET_IFNAME is set already (it may hold a list), and
rank 0's store listens on the interface's IPv4 address instead of every interface. `shardline
launch` passes the loopback interface; split deployments name the pod's or host's interface,
and a NetworkPolicy (Kubernetes) or an internal network (compose) keeps other hosts away.
Without the flag the store listens on every interface, and the shard says so in a warning.
"""

from __future__ import annotations

import fcntl
import socket
import struct
from collections.abc import MutableMapping
from datetime import timedelta
from typing import TYPE_CHECKING

from shardline.common.ports import bound_socket
from shardline.shard.config import GroupConfig

if TYPE_CHECKING:
    import torch.distributed as dist

SIOCGIFADDR = 0x8915


class InterfaceError(ValueError):
    """--group-interface names no interface with an IPv4 address."""


def interface_address(name: str) -> str:
    """The IPv4 address of network interface `name` (Linux)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            packed = fcntl.ioctl(probe.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
        except OSError as exc:
            names = ", ".join(n for _, n in socket.if_nameindex())
            raise InterfaceError(f"--group-interface {name}: no such interface with an IPv4 address "
                                 f"({exc.strerror}); this host has: {names}") from None
    return socket.inet_ntoa(packed[20:24])


def loopback_interface() -> str:
    """The name of the interface that holds 127.0.0.1 (`lo` on Linux)."""
    for _, name in socket.if_nameindex():
        try:
            if interface_address(name) == "127.0.0.1":
                return name
        except InterfaceError:
            continue
    return "lo"


def apply_interface(name: str, env: MutableMapping[str, str]) -> str:
    """Points gloo (and NCCL, unless it has its own setting) at `name`; returns its address."""
    address = interface_address(name)
    env["GLOO_SOCKET_IFNAME"] = name
    env.setdefault("NCCL_SOCKET_IFNAME", name)
    return address


def rendezvous_store(group: GroupConfig) -> "dist.TCPStore":
    """The group's TCPStore: rank 0 serves it on `group.bind_address` (all interfaces when empty),
    the others connect to master_addr:master_port."""
    import torch.distributed as dist  # torch only where a group forms: the router imports this file too

    timeout = timedelta(seconds=group.collective_timeout_s)
    if group.rank != 0 or not group.bind_address:
        return dist.TCPStore(group.master_addr, group.master_port, group.world_size, group.rank == 0,
                             timeout=timeout)
    try:
        sock = bound_socket(group.bind_address, group.master_port)
    except OSError as exc:
        raise RuntimeError(f"--master-port {group.master_port} cannot be bound on {group.bind_address} "
                           f"(--group-interface): {exc.strerror}") from None
    sock.listen(max(64, 2 * group.world_size))
    return dist.TCPStore(group.master_addr, group.master_port, group.world_size, True, timeout=timeout,
                         master_listen_fd=sock.detach())
