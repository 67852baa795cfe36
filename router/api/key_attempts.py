"""Failed API key attempts by peer: one address guessing keys is slowed, nobody else is.

Every gate (gRPC, HTTP, metrics) shares one `FailedAttempts`. A peer is a client address without
its port (`ipv4:10.0.0.7`, `10.0.0.7`; on a unix socket everybody is one peer). A peer with
--max-failed-key-attempts failures within the last --failed-key-window seconds is refused with
RESOURCE_EXHAUSTED / 429 (and how long to wait) before its key is even looked at, right key or
not, until its oldest failure leaves the window. Other peers are not affected. At most
`max_peers` peers are remembered (the one seen least recently is forgotten first), so a flood of
addresses costs bounded memory.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable


def peer_of(address: str | None) -> str:
    """The peer of a gRPC peer string (`ipv4:1.2.3.4:567`, `ipv6:[::1]:567`, `unix:...`) or an
    HTTP client host: the address without its port."""
    if not address:
        return "unknown"
    if address.startswith(("ipv4:", "ipv6:")):
        return address.rsplit(":", 1)[0]
    return address


class FailedAttempts:
    """Sliding-window count of failed key attempts per peer."""

    def __init__(self, limit: int = 10, window_s: float = 60.0, max_peers: int = 4096,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.window_s, self.max_peers, self.clock = limit, window_s, max_peers, clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, peer: str) -> deque[float] | None:
        times = self._failures.get(peer)
        if times is None:
            return None
        horizon = self.clock() - self.window_s
        while times and times[0] <= horizon:
            times.popleft()
        if not times:
            del self._failures[peer]
            return None
        return times

    def retry_after(self, peer: str) -> int:
        """0 when `peer` may try a key now, else the whole seconds until it may."""
        if self.limit <= 0:
            return 0
        times = self._recent(peer)
        if times is None or len(times) < self.limit:
            return 0
        return max(1, math.ceil(times[0] + self.window_s - self.clock()))

    def failed(self, peer: str) -> None:
        """Records one failed attempt of `peer`."""
        if self.limit <= 0:
            return
        times = self._recent(peer)
        if times is None:
            times = self._failures[peer] = deque(maxlen=self.limit)
            while len(self._failures) > self.max_peers:
                self._failures.popitem(last=False)
        self._failures.move_to_end(peer)
        times.append(self.clock())

    def message(self, retry_after: int) -> str:
        return (f"too many failed API key attempts from this address ({self.limit} within "
                f"--failed-key-window={self.window_s:g}s); retry in {retry_after} s")
