"""``SensAIClient``: the seed's raw client over a transport endpoint."""

from __future__ import annotations

import time
from typing import Any

__all__ = ["SensAIClient"]


class SensAIClient:
    """Send tensors through a client endpoint and wait for the answer."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport

    def send_tensor(
        self, tensor: Any, interval: float = 0.001, timeout: float | None = None
    ) -> Any:
        """Send ``tensor`` (an array or a list) and return the server's answer.

        Built-in transports block efficiently (``interval`` is ignored); a user transport
        without ``request`` is polled every ``interval`` seconds as in the seed.
        """
        request = getattr(self.transport, "request", None)
        if request is not None:
            return request(tensor, timeout=timeout)
        self.transport.write_tensor(tensor)
        while not self.transport.is_ready():
            time.sleep(interval)
        return self.transport.read_tensor()
