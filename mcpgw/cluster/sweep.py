"""Housekeeping: instances that went away, idle stand-ins, and a lost bus.

Every heartbeat interval the ``Sweeper`` asks the registry about each instance this one waits on
(the owners of its active remote sessions) or serves (POSTs, resumed streams and GET streams held
there); one that is gone has its sessions forgotten (404) and its waiting routes cancelled. Remote
sessions idle longer than ``session.maxAge`` are forgotten here (not ended: the owner decides).
When the bus is lost, nothing published can be answered: everything that waits on another instance
fails at once.
"""

from __future__ import annotations

from typing import Any

from mcpgw.cluster.directory import Directory, RemoteSession
from mcpgw.cluster.routes import OwnerRoutes
from mcpgw.cluster.streams import Streams
from mcpgw.transports.streamable import StreamableOutlet


class Sweeper:
    def __init__(self, directory: Directory, owner: OwnerRoutes, streams: Streams, max_age: float):
        self.directory = directory
        self.owner = owner
        self.streams = streams
        self.max_age = max_age
        self.node = directory.node

    def sweep(self) -> None:
        """Notice owners and peers that went away; forget idle remote sessions."""
        if not self.node.pubsub.available:
            return
        now = self.node.reactor.seconds()
        owners: dict[str, list[RemoteSession]] = {}
        for remote in list(self.directory.remote.values()):
            if remote.active():
                owners.setdefault(remote.instance, []).append(remote)
            elif now - remote.last_used > self.max_age:
                del self.directory.remote[remote.id]
                if isinstance(remote.outlet, StreamableOutlet):
                    remote.outlet.session_ended("forgotten here after session.maxAge without use")
        peers = {i for i, _ in self.owner.routes_out} | {i for i, _ in self.streams.lives_out}
        peers |= {get.instance for get in self.streams.remote_gets() if get.live is not None}
        for instance in set(owners) | peers:
            self.directory.registry.alive(instance).addCallback(self._swept, instance, owners.get(instance, [])) \
                .addErrback(lambda f: None)

    def _swept(self, alive: bool, instance: str, remotes: list[RemoteSession]) -> None:
        if alive:
            return
        for remote in remotes:
            self.directory.owner_gone(remote)
        self.owner.lose_all("instance gone", instance)
        for key, live in list(self.streams.lives_out.items()):
            if key[0] == instance:
                live.gone()
        for get in self.streams.remote_gets():
            if get.instance == instance:
                get.live = None

    def bus_changed(self, available: bool) -> None:
        if available:
            return
        # Nothing published now can be answered: fail what waits on other instances.
        why = "Redis connection lost"
        for remote in list(self.directory.remote.values()):
            self.directory.routes.fail_routes(
                remote, 503, f"Service Unavailable: {why}; the session's instance cannot be reached")
            if isinstance(remote.outlet, StreamableOutlet):
                for stream in list(remote.outlet.streams.values()):
                    if stream.live is not None:
                        stream.live.finish()
        for pipe in list(self.streams.pipes.values()):
            pipe.finish()
        self.streams.pipes.clear()
        self.owner.lose_all(why)
        for live in list(self.streams.lives_out.values()):
            live.gone()
        for get in self.streams.remote_gets():
            get.live = None

    def __repr__(self) -> str:
        return f"<Sweeper of {self.node.instance}: {len(self.directory.remote)} remote sessions>"

    def state(self) -> dict[str, Any]:
        """What this instance holds for others and of others (for tests and debugging)."""
        return {"remote": len(self.directory.remote), "routes": len(self.directory.routes.routes),
                "routes_out": len(self.owner.routes_out), "lives_out": len(self.streams.lives_out),
                "pipes": len(self.streams.pipes), "gets": len(self.streams.gets)}
