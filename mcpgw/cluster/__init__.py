"""Several gateway instances as one gateway, sharing a bus and a session store (Redis).

Every session lives in one instance, its *owner*: the one that created it and runs its child. Its
record in the store names the owner. Any instance may receive a client's request for it (a load
balancer without stickiness):

- On the owner, nothing changes: the session is in memory, no round trip.
- Elsewhere (the *receiving* instance) the session is looked up once (``directory``) and kept as a
  ``RemoteSession``: a stand-in with the session interface the transports use. Its messages are
  published to the owner (``wire``, over ``pubsub``); the owner writes them to the child. Answers,
  progress and server requests for a POST come back to the receiving instance's ``PostExchange``
  through a ``RemoteRoute`` (``routes``).
- SSE streams: a GET stream may be held by any instance, and every stream may be resumed with
  ``Last-Event-ID`` on any instance (``streams``, with the shared ``eventlog``).
- An owner that is gone (killed: no connection to Redis left; or its heartbeat key expired): 404,
  and the record is deleted, so the client initializes a new session. Redis down: sessions owned
  here go on; everything that needs another instance answers 503 (``sweep``).

``service.Cluster`` puts the parts together as a Twisted service; ``memory`` runs several
instances in one process for tests. docs/scaling.md describes the deployment.
"""

from __future__ import annotations

from mcpgw.cluster.node import STREAM_BASE, holder_of
from mcpgw.cluster.service import Backend, Cluster, redis_backend

__all__ = ["STREAM_BASE", "Backend", "Cluster", "holder_of", "redis_backend"]
