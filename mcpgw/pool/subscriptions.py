"""Resource subscriptions shared by a pool's listeners (subscriptions/listen, pooled sessions):
every ready child is subscribed once to each URI some listener watches."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from mcpgw import jsonrpc


class Subscriptions:
    """A ChildPool's notification listeners and the resource URIs they watch."""

    children: list[Any]
    _prefix: str
    _ids: itertools.count[int]

    def _init_subscriptions(self) -> None:
        #: Notification listeners (subscriptions/listen, pooled sessions): callables of (raw, msg).
        self.listeners: set[Callable[[bytes, dict[str, Any]], None]] = set()
        #: Resource URIs some listener watches -> how many listeners; every ready child is subscribed to each.
        self._subscriptions: dict[str, int] = {}

    def subscribed(self, child: Any) -> None:
        """A child is ready: it is subscribed to every watched URI."""
        for uri in self._subscriptions:
            self._send_own(child, "resources/subscribe", {"uri": uri})

    def broadcast(self, msg: dict[str, Any]) -> None:
        """A child's notification that no call claims: every listener hears it."""
        if self.listeners:
            raw = jsonrpc.dumps(msg)
            for listener in list(self.listeners):
                listener(raw, msg)

    def subscribe(self, uris: list[str]) -> None:
        """A listener watches ``uris``: every ready child is asked for ``resources/subscribe`` once per URI."""
        for uri in uris:
            self._subscriptions[uri] = self._subscriptions.get(uri, 0) + 1
            if self._subscriptions[uri] == 1:
                for child in self.children:
                    if child.ready:
                        self._send_own(child, "resources/subscribe", {"uri": uri})

    def unsubscribe(self, uris: list[str]) -> None:
        for uri in uris:
            left = self._subscriptions.get(uri, 0) - 1
            if left > 0:
                self._subscriptions[uri] = left
                continue
            self._subscriptions.pop(uri, None)
            for child in self.children:
                if child.ready:
                    self._send_own(child, "resources/unsubscribe", {"uri": uri})

    def _send_own(self, child: Any, method: str, params: dict[str, Any]) -> None:
        """A request of the gateway's own (its answer matches no client request and is dropped)."""
        child.upstream.send(jsonrpc.dumps({"jsonrpc": "2.0", "id": f"{self._prefix}own-{next(self._ids)}",
                                           "method": method, "params": params}))
