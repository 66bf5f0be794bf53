"""InputRequiredResult (2026-07-28 mrtr): a child's request to its client during a call is gathered,
the call parked under a ``requestState``, and the client's retry with ``inputResponses`` resumes it."""

from __future__ import annotations

import hmac
import re
import secrets
from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

from mcpgw import jsonrpc
from mcpgw.config import StdioServer
from mcpgw.pool.pending import INPUT_GATHER, INPUT_KEY_META, INPUT_KEYS, Pending
from mcpgw.pool.tokens import StateRejected, StateTokens, request_name
from mcpgw.versions import params_of

_INPUT_KEY = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class InputParking:
    """A ChildPool's calls that wait for their client's input, and the requestStates it issued."""

    log: Logger
    server: StdioServer
    _reactor: Any
    _pending: dict[str, Pending]
    #: ChildPool.cancel: a parked call nobody comes back for is cancelled in its child.
    cancel: Callable[[Pending, str], None]

    def _init_inputs(self, secret: str | None) -> None:
        #: requestState nonce -> a call waiting for the client's retry with its inputResponses.
        self._parked: dict[str, Pending] = {}
        #: requestState nonces already used -> (expiry ms, owner, method, name), kept until they expire
        #: (after that the expiry refuses them): a replay is told apart from a forgery. Oldest first.
        self._spent: dict[str, tuple[int, str | None, str, Any]] = {}
        self.tokens = StateTokens(secret, self.server.name)
        self.input_wait = float(self.server.poolInputWait)

    def _drop_inputs(self, pending: Pending, why: str) -> None:
        """The call is over: its timers stop, and every request it still waits on gets an error in the child."""
        if pending.input_timer is not None and pending.input_timer.active():
            pending.input_timer.cancel()
        pending.input_timer = None
        if pending.state is not None:
            self._parked.pop(pending.state, None)
            pending.state = None
        asked, pending.asked, pending.inputs = pending.asked, {}, {}
        child = pending.child
        if child is not None and not child.dead:
            for child_id in asked.values():
                child.upstream.send(jsonrpc.error_bytes(child_id, jsonrpc.REQUEST_CANCELLED, f"no input from the client: {why}"))

    @staticmethod
    def asker(child: Any) -> Pending | None:
        """The call a child's request to its client (or log line) belongs to: the child's only call that is
        not waiting for its client's retry; None when there is none, or several (who asked is unknowable)."""
        found = None
        for pending in child.inflight.values():
            if pending.state is None:
                if found is not None:
                    return None
                found = pending
        return found

    def input_key(self, pending: Pending, server_request: dict[str, Any], taken: Any) -> str:
        """The inputRequests key of a child's request: its ``_meta["mcpgw/inputKey"]`` hint, else the
        method's own name; made unique among ``taken`` with ``_2``, ``_3``..."""
        meta = params_of(server_request).get("_meta")
        hint = meta.get(INPUT_KEY_META) if isinstance(meta, dict) else None
        base = hint if isinstance(hint, str) and _INPUT_KEY.fullmatch(hint) else INPUT_KEYS.get(server_request["method"], "input")
        key, n = base, 2
        while key in taken:
            key, n = f"{base}_{n}", n + 1
        return key

    def answer_offered(self, pending: Pending, server_request: dict[str, Any]) -> bool:
        """The call came with ``inputResponses`` (and no requestState): if one answers this request of the
        child (same key), the child gets it at once and nothing is asked of the client; else False."""
        offered = pending.offered
        if not offered or pending.child is None:
            return False
        base = self.input_key(pending, server_request, ())
        key = next((k for k in [base, *(f"{base}_{n}" for n in range(2, len(offered) + 2))] if k in offered), None)
        if key is None:
            return False
        answer = offered.pop(key)
        pending.child.upstream.send(jsonrpc.dumps({"jsonrpc": "2.0", "id": server_request["id"], "result": answer}))
        return True

    def ask(self, pending: Pending, server_request: dict[str, Any],
            flush: Callable[[dict[str, Any], str], None]) -> str:
        """The child asks the caller of ``pending`` something: gather it (and whatever else the call asks
        within INPUT_GATHER), then park the call and ``flush(inputRequests, requestState)``; its key."""
        params = params_of(server_request)
        key = self.input_key(pending, server_request, pending.asked)
        meta = params.get("_meta")
        if isinstance(meta, dict) and INPUT_KEY_META in meta:
            meta = {k: v for k, v in meta.items() if k != INPUT_KEY_META}
            params = {**params, "_meta": meta} if meta else {k: v for k, v in params.items() if k != "_meta"}
        asked: dict[str, Any] = {"method": server_request["method"]}
        if params or "params" in server_request:
            asked["params"] = params
        pending.asked[key] = server_request["id"]
        pending.inputs[key] = asked
        if pending.input_timer is None:
            pending.input_timer = self._reactor.callLater(INPUT_GATHER, self._park, pending, flush)
        return key

    def _park(self, pending: Pending, flush: Callable[[dict[str, Any], str], None]) -> None:
        pending.input_timer = None
        if pending.gid not in self._pending or not pending.asked:
            return
        nonce = secrets.token_urlsafe(16)
        expires_ms = int((self._reactor.seconds() + self.input_wait) * 1000)
        if pending.name is None:
            pending.name = request_name(jsonrpc.loads(pending.raw))
        token = self.tokens.issue(nonce, expires_ms, pending.owner, pending.method, pending.name)
        pending.state = nonce
        self._parked[nonce] = pending
        pending.input_timer = self._reactor.callLater(self.input_wait, self._abandon, nonce)
        flush(dict(pending.inputs), token)

    def park(self, pending: Pending, server_request: dict[str, Any]) -> str:
        """Park ``pending`` at once on this one request of its child (its route is answered by the caller);
        the requestState. (What ``ask`` does after its gathering time, for callers that answer themselves.)"""
        issued: list[str] = []
        self.ask(pending, server_request, lambda inputs, state: None)
        if pending.input_timer is not None and pending.input_timer.active():
            pending.input_timer.cancel()
        self._park(pending, lambda inputs, state: issued.append(state))
        return issued[0]

    def claim(self, token: Any, client_msg: dict[str, Any], owner: str | None = None) -> Pending:
        """The parked call a retry's ``requestState`` names, taken out of the parked set (a token is good
        once); StateRejected (-32602 for the client) when the token fails its MAC, belongs to another
        identity or request, has expired, was used already, or names a call that no longer exists."""
        parsed = StateTokens.parse(token)
        if parsed is None:
            raise StateRejected("tampered", "Invalid requestState: it failed its integrity check (tampered or not issued here)")
        nonce, expires_ms, tag = parsed
        method, name = str(client_msg.get("method")), request_name(client_msg)
        if not hmac.compare_digest(tag, self.tokens.tag(nonce, expires_ms, owner, method, name)):
            raise self._why_not_yours(nonce, expires_ms, tag, owner)
        if self._reactor.seconds() * 1000 >= expires_ms:
            raise StateRejected("expired", f"Invalid requestState: it expired (poolInputWait={self.input_wait:g} s); "
                                           "send the request again without requestState")
        if nonce in self._spent:
            raise StateRejected("replayed", "Invalid requestState: it was already used (a requestState is good for one retry)")
        pending = self._parked.pop(nonce, None)
        if pending is None:
            raise StateRejected("unknown", "Invalid requestState: the call it names no longer exists "
                                           "(it ended, or its server's child exited); send the request again without requestState")
        self._spend(nonce, expires_ms, pending)
        if pending.input_timer is not None and pending.input_timer.active():
            pending.input_timer.cancel()
        pending.input_timer = None
        pending.state = None
        return pending

    def _why_not_yours(self, nonce: str, expires_ms: int, tag: str, owner: str | None) -> StateRejected:
        """A token whose MAC does not hold for this identity and request: genuine but someone else's (or for
        another request), or forged."""
        record: tuple[Any, ...] | None = None
        pending = self._parked.get(nonce)
        if pending is not None:
            record = (pending.owner, pending.method, pending.name)
        elif nonce in self._spent:
            record = self._spent[nonce][1:]
        if record is not None and hmac.compare_digest(tag, self.tokens.tag(nonce, expires_ms, *record)):
            if record[0] != owner:
                return StateRejected("foreign", "Invalid requestState: it was issued to another identity")
            return StateRejected("mismatch", f"Invalid requestState: it was issued for another request ({record[1]} {record[2]!r})")
        return StateRejected("tampered", "Invalid requestState: it failed its integrity check (tampered or not issued here)")

    def _spend(self, nonce: str, expires_ms: int, pending: Pending) -> None:
        """Remember a used token until it expires (then its expiry refuses it); the oldest go first."""
        now_ms = self._reactor.seconds() * 1000
        while self._spent:
            oldest = next(iter(self._spent))
            if self._spent[oldest][0] > now_ms:
                break
            del self._spent[oldest]
        self._spent[nonce] = (expires_ms, pending.owner, pending.method, pending.name)

    def resume(self, pending: Pending, client_msg: dict[str, Any], responses: Any, route: Any) -> Pending:
        """A claimed call's retry: answer the child's requests from the client's inputResponses (an error for
        each key the client left out), re-route the call's eventual response to ``route`` under the retry's id."""
        pending.route = route
        pending.id = client_msg["id"]
        asked, pending.asked, pending.inputs = pending.asked, {}, {}
        child = pending.child
        assert child is not None
        for name, child_id in asked.items():
            answer = responses.get(name) if isinstance(responses, dict) else None
            if isinstance(answer, dict):
                reply = jsonrpc.dumps({"jsonrpc": "2.0", "id": child_id, "result": answer})
            else:
                reply = jsonrpc.error_bytes(child_id, jsonrpc.INVALID_PARAMS, f"the client gave no input for {name!r}")
            child.upstream.send(reply)
        return pending

    def parked(self) -> int:
        """Calls waiting for their client's retry with inputResponses."""
        return len(self._parked)

    def _abandon(self, nonce: str) -> None:
        pending = self._parked.get(nonce)
        if pending is not None:
            pending.input_timer = None
            self.log.info("pool {server}: {method} {gid} abandoned: no retry with its input within {wait}s",
                          server=self.server.name, method=pending.method, gid=pending.gid, wait=self.input_wait)
            self.cancel(pending, f"the client did not retry with its input within {self.input_wait:g} s")
