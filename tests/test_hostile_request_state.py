"""Issue 15, finding 9: requestState replay against a pooled 2026-07-28 server.

As reported: on a pooled server, bob resent alice's ``requestState`` with his own token and got alice's
result. 2026-07-28 basic/utilities/mrtr, Server Requirements (Basic Workflow) 4-5: the server treats
requestState as attacker-controlled input, protects its integrity (HMAC), binds it to the authenticated
principal and a short expiry, and enforces single use. The gateway issues the token (its children never
see one), so it verifies it: a MAC over the parked call, the identity that received it, the request and
an expiry (mcpgw.pool.StateTokens).

The attack runs against a real ``twistd mcpgw`` with auth on (alice, bob, and carol for the legitimate
SDK client): bob replays alice's live requestState (as is and altered) and brute-forces made-up ones,
bounded in count and time, while carol keeps calling ``echo``. Measured: every attempt is -32602 and
none reaches the child (the fixture's request log), alice's call is unaffected, the time to the error,
and the gateway's RSS and descriptors before and after.
"""

from __future__ import annotations

import secrets
import time

import httpx
import pytest

from tests.gateway_process import fixture_server, wait_until
from tests.hostile import LegitClient, proc_stats
from tests.test_request_state import ALICE, ASK, BOB, answer, ask, child_saw, modern

pytestmark = pytest.mark.integration
CAROL = "carol-token-0123456789abcdef"
#: Replays of alice's live token by bob, and made-up tokens: bounded in count and in time.
REPLAYS = 300
FORGERIES = 300
ATTACK_SECONDS = 60.0
#: RSS growth allowed over the attack. A refused retry keeps nothing (no parked call, no spent record: only a
#: genuine retry of the owner records one); what remains is allocator slack from ~600 requests and their
#: access-log lines, a few MiB on CPython. 16 MiB is far below what keeping per-attempt state would show.
RSS_BOUND = 16 * 1024 * 1024


@pytest.fixture
def gw(make_gateway):
    return make_gateway({
        "auth": {"bearerTokens": [{"name": "alice", "token": ALICE}, {"name": "bob", "token": BOB},
                                  {"name": "carol", "token": CAROL}]},
        # poolInputWait outlasts the attack's time bound: alice's token must still be live for her retry.
        "mcpServers": {"fx": fixture_server(sessions="pooled", poolSize=2, poolInputWait=2 * ATTACK_SECONDS, default=True,
                                            env={"FIXTURE_TRACE": "1"})},
    })


def test_bob_replays_alices_request_state(gw):
    """Finding 9: every replay of alice's requestState by bob is -32602 ("foreign"), every made-up token is
    -32602 ("tampered"), none reaches a child; alice's retry then gets her own result; carol's SDK client
    sees no failed call and a p99 under 1 s; the gateway keeps no state per refused attempt."""
    state = ask(gw, "alice-1", token=ALICE)["requestState"]
    seen = child_saw(gw, ASK)
    before = proc_stats(gw.proc.pid)
    latencies: list[float] = []
    kinds: dict[str, int] = {}
    nonce, expiry, tag = state.split(".")
    variants = [state, state + "-TAMPERED", f"{nonce}.{expiry}.{tag[::-1]}"]
    deadline = time.monotonic() + ATTACK_SECONDS
    with LegitClient(gw.url + "/mcp", headers={"authorization": f"Bearer {CAROL}"}) as legit, \
            httpx.Client(base_url=gw.url, timeout=10) as bob:
        attempts = [variants[i % len(variants)] for i in range(REPLAYS)]
        attempts += [f"{secrets.token_urlsafe(16)}.{expiry}.{secrets.token_urlsafe(32)}" for _ in range(FORGERIES)]
        for n, forged in enumerate(attempts):
            assert time.monotonic() < deadline, f"attack bound: only {n} attempts in {ATTACK_SECONDS:g} s"
            body, headers = modern(f"bob-{n}", "tools/call", {
                "name": ASK, "arguments": {}, "requestState": forged,
                "inputResponses": {"user_name": {"action": "accept", "content": {"name": "Bob"}}}}, token=BOB)
            started = time.monotonic()
            r = bob.post("/mcp", headers=headers, json=body)
            latencies.append(time.monotonic() - started)
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["code"] == -32602 and "Bob" not in r.text, error
            kinds[error["data"]["requestState"]] = kinds.get(error["data"]["requestState"], 0) + 1
    legit.assert_healthy()
    after = proc_stats(gw.proc.pid)
    # Genuine token under bob's identity: foreign; altered ones and made-up ones: tampered.
    assert kinds == {"foreign": REPLAYS // 3, "tampered": REPLAYS - REPLAYS // 3 + FORGERIES}, kinds
    assert not wait_until(lambda: child_saw(gw, ASK) > seen, timeout=1.0), "a refused retry reached the child"
    # Alice's call is untouched: her retry resumes it and gets her own answer.
    final = answer(gw, "alice-2", state, "Alice", token=ALICE).json()
    assert final["id"] == "alice-2" and final["result"]["content"][0]["text"] == "Hello, Alice!", final
    # The token is spent now: alice cannot replay it either.
    assert answer(gw, "alice-3", state, "Again", token=ALICE).json()["error"]["data"] == {"requestState": "replayed"}
    ordered = sorted(latencies)
    p99 = ordered[int(len(ordered) * 0.99)]
    grew = after.grew(before)
    print(f"requestState attack: {len(latencies)} refused, p99 time to the error {p99 * 1000:.1f} ms, "
          f"RSS {grew.rss / 1024:+.0f} KiB, fds {grew.fds:+d}")
    assert p99 < 0.5, p99
    assert grew.rss < RSS_BOUND, grew
    assert grew.fds <= 4, grew  # keep-alive connections of the clients, no descriptor per attempt
