"""Issue 22: the 2026-07-28 bridge owns what it invents (integration: a real gateway, auth on, pooled children).

The ``requestState`` of an ``InputRequiredResult`` is the gateway's own token (a handshake-era child never
sees one). 2026-07-28 basic/utilities/mrtr, Server Requirements (Basic Workflow) 4-5: it is attacker-controlled
input, so its integrity is protected (HMAC), it is bound to the authenticated principal, an expiry and the
originating request, and single use is enforced by the server. Every retry whose requestState fails one of
those gets JSON-RPC -32602 saying which, and no child sees the call.

Also: the request's ``_meta`` (per-request ``clientCapabilities``, ``protocolVersion``, ``logLevel``) reaches
the child unchanged; a child that asks for a capability the client did not declare gets an error itself, the
client -32021 (Server Requirements 7), and the child keeps no parked request. ``inputResponses`` without
``requestState`` (mrtr Error Handling) and the SEP-2164 error code.

The fixture runs with ``FIXTURE_TRACE=1``: it logs every request it receives to stderr ("request METHOD NAME"),
which the gateway logs as its child's stderr: that is how these tests see what reached the child.
"""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest

from tests import wire
from tests.gateway_process import fixture_server, wait_until

pytestmark = pytest.mark.integration
MODERN = "2026-07-28"
ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-0123456789abcdef00"
ALL_CAPS = {"elicitation": {}, "sampling": {}, "roots": {}}
NAME_OF = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}
ASK = "test_input_required_result_elicitation"


@pytest.fixture(scope="module")
def gw(make_module_gateway):
    """One pooled child (every call meets every other), auth with two named identities, poolInputWait 1.5 s."""
    return make_module_gateway({
        "auth": {"bearerTokens": [{"name": "alice", "token": ALICE}, {"name": "bob", "token": BOB}]},
        "mcpServers": {"fx": fixture_server(sessions="pooled", poolSize=1, poolInputWait=1.5, default=True,
                                            env={"FIXTURE_TRACE": "1"})},
    })


def modern(id: Any, method: str, params: dict | None = None, caps: dict | None = None, meta: dict | None = None,
           token: str = ALICE) -> tuple[dict, dict]:
    """A 2026-07-28 request body (the client's capabilities in _meta) and the headers that mirror it."""
    params = dict(params or {})
    params["_meta"] = {"io.modelcontextprotocol/protocolVersion": MODERN,
                       "io.modelcontextprotocol/clientInfo": {"name": "request-state-tests", "version": "1"},
                       "io.modelcontextprotocol/clientCapabilities": ALL_CAPS if caps is None else caps, **(meta or {})}
    headers = {**wire.POST_HEADERS, "mcp-protocol-version": MODERN, "mcp-method": method,
               "authorization": f"Bearer {token}"}
    if method in NAME_OF:
        headers["mcp-name"] = params[NAME_OF[method]]
    return {"jsonrpc": "2.0", "id": id, "method": method, "params": params}, headers


def post(gw, id: Any, method: str, params: dict | None = None, **kw: Any) -> httpx.Response:
    body, headers = modern(id, method, params, **kw)
    return httpx.post(f"{gw.url}/mcp", headers=headers, json=body, timeout=15)


def child_saw(gw, tool: str) -> int:
    """How many ``tools/call`` of ``tool`` the child received (its request log, FIXTURE_TRACE)."""
    return len(re.findall(rf"\[conformance-fixture\] request tools/call {re.escape(tool)}\b", gw.log()))


def ask(gw, id: Any, token: str = ALICE) -> dict:
    """A call whose child asks the user's name: the InputRequiredResult."""
    r = post(gw, id, "tools/call", {"name": ASK, "arguments": {}}, token=token)
    assert r.status_code == 200, r.text
    result = r.json()["result"]
    assert result["resultType"] == "input_required", result
    assert list(result["inputRequests"]) == ["user_name"]
    return result


def answer(gw, id: Any, state: Any, name: str = "Al", token: str = ALICE, tool: str = ASK) -> httpx.Response:
    return post(gw, id, "tools/call", {"name": tool, "arguments": {}, "requestState": state,
                                       "inputResponses": {"user_name": {"action": "accept", "content": {"name": name}}}},
                token=token)


def refused(r: httpx.Response, kind: str) -> str:
    """The -32602 a refused requestState gets; its message."""
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == -32602 and error["data"] == {"requestState": kind}, error
    return error["message"]


def settle(gw, seen: int) -> None:
    """Give a wrongly forwarded call the time to show up in the child's request log (the log is asynchronous)."""
    wait_until(lambda: child_saw(gw, ASK) > seen, timeout=0.5)


# -- a retry's requestState that is not honoured: -32602, and no child sees the call -----------------


def test_tampered_request_state(gw):
    """The conformance scenario's tampering (``+ "-TAMPERED"``) and a made-up token: "tampered"; no child
    sees either; the genuine token still resumes the call (mrtr Server Requirements 4: reject state that
    fails integrity verification)."""
    state = ask(gw, "t-1")["requestState"]
    seen = child_saw(gw, ASK)
    for forged in (state + "-TAMPERED", state[:-1] + ("A" if state[-1] != "A" else "B"), "made-up", 42):
        assert "integrity" in refused(answer(gw, "t-2", forged), "tampered")
    # The genuine retry first (the token lives poolInputWait, 1.5 s), then the child's request log is checked:
    # a resumed call is no new tools/call in the child.
    final = answer(gw, "t-3", state, "Tess").json()
    assert final["id"] == "t-3" and final["result"]["content"][0]["text"] == "Hello, Tess!", final
    settle(gw, seen)
    assert child_saw(gw, ASK) == seen


def test_foreign_request_state(gw):
    """Issue 15 finding 9: bob retries with alice's requestState under his own token: "foreign", no child sees
    it; alice's retry still gets her result (mrtr Server Requirements 5: bind state to the principal)."""
    state = ask(gw, "f-1", token=ALICE)["requestState"]
    seen = child_saw(gw, ASK)
    assert "another identity" in refused(answer(gw, "f-2", state, "Bob", token=BOB), "foreign")
    final = answer(gw, "f-3", state, "Alice", token=ALICE).json()
    assert final["result"]["content"][0]["text"] == "Hello, Alice!", final
    settle(gw, seen)
    assert child_saw(gw, ASK) == seen


def test_replayed_request_state(gw):
    """The second use of a token: "replayed" (single use is enforced by the gateway), no child sees it."""
    state = ask(gw, "r-1")["requestState"]
    assert answer(gw, "r-2", state, "Once").json()["result"]["content"][0]["text"] == "Hello, Once!"
    seen = child_saw(gw, ASK)
    assert "already used" in refused(answer(gw, "r-3", state, "Twice"), "replayed")
    settle(gw, seen)
    assert child_saw(gw, ASK) == seen


def test_request_state_for_another_request(gw):
    """A token presented on another tool: "mismatch" (bound to the originating request's method and name)."""
    state = ask(gw, "m-1")["requestState"]
    r = post(gw, "m-2", "tools/call", {"name": "echo", "arguments": {"text": "x"}, "requestState": state,
                                       "inputResponses": {}})
    assert "another request" in refused(r, "mismatch")
    assert answer(gw, "m-3", state, "Mo").json()["result"]["content"][0]["text"] == "Hello, Mo!"
    assert "[conformance-fixture] request tools/call echo" not in gw.log()


def test_expired_request_state_after_pool_input_wait(gw):
    """No retry within poolInputWait (1.5 s here): the call is abandoned in the child (its elicitation gets an
    error, then notifications/cancelled); a retry after that is "expired" -32602, not a fresh call."""
    state = ask(gw, "e-1")["requestState"]
    assert wait_until(lambda: "abandoned: no retry with its input within 1.5s" in gw.log(), timeout=10)
    seen = child_saw(gw, ASK)
    assert "expired" in refused(answer(gw, "e-2", state, "Late"), "expired")
    settle(gw, seen)
    assert child_saw(gw, ASK) == seen


def test_unknown_request_state_of_a_call_that_ended(gw):
    """A genuine, unexpired token whose call no longer exists (its child exited): "unknown", no child sees it."""
    state = ask(gw, "u-1")["requestState"]
    pids = gw.child_pids()
    r = post(gw, "u-2", "tools/call", {"name": "crash", "arguments": {}})
    assert r.json()["error"]["code"] == -32000, r.text  # the child died: every call on it failed
    assert wait_until(lambda: gw.child_pids() and gw.child_pids() != pids, timeout=15)
    seen = child_saw(gw, ASK)
    assert "no longer exists" in refused(answer(gw, "u-3", state), "unknown")
    settle(gw, seen)
    assert child_saw(gw, ASK) == seen
    assert wait_until(lambda: post(gw, "u-4", "tools/call", {"name": "echo", "arguments": {"text": "up"}}).status_code == 200,
                      timeout=15)


# -- per-request _meta and capabilities -----------------------------------------------------------------


def test_per_request_meta_reaches_the_child_unchanged(gw):
    """The request's _meta (protocolVersion, clientCapabilities, clientInfo, logLevel, a key of the client's
    own) reaches the child as sent; only the progress token is the gateway's."""
    meta = {"io.modelcontextprotocol/logLevel": "warning", "com.example/trace": "t-42"}
    r = post(gw, "meta-1", "tools/call", {"name": "echo_meta", "arguments": {}}, caps={"sampling": {}}, meta=meta)
    seen = json.loads(r.json()["result"]["content"][0]["text"])
    assert seen == {"io.modelcontextprotocol/protocolVersion": MODERN,
                    "io.modelcontextprotocol/clientInfo": {"name": "request-state-tests", "version": "1"},
                    "io.modelcontextprotocol/clientCapabilities": {"sampling": {}}, **meta}


def test_capability_aware_child_asks_only_for_declared(gw):
    """input-required-result-capability-check: a child that reads the per-request capabilities asks only for
    sampling when that is all the client declared (mrtr Server Requirements 7)."""
    r = post(gw, "c-1", "tools/call", {"name": "test_input_required_result_capabilities", "arguments": {}},
             caps={"sampling": {}})
    result = r.json()["result"]
    assert result["resultType"] == "input_required"
    assert [v["method"] for v in result["inputRequests"].values()] == ["sampling/createMessage"]
    state = result["requestState"]
    [key] = result["inputRequests"]
    done = post(gw, "c-2", "tools/call", {"name": "test_input_required_result_capabilities", "arguments": {},
                                          "requestState": state, "inputResponses": {key: {
                                              "role": "assistant", "content": {"type": "text", "text": "4"}, "model": "m"}}},
                caps={"sampling": {}}).json()
    assert done["result"]["content"][0]["text"] == "Sampling response: 4", done


def test_undeclared_capability_32021_and_the_child_is_not_left_waiting(gw):
    """A child that still asks for a capability the client did not declare: the client gets 400/-32021 naming it;
    the child's own request gets an error (its log says so) and the call is cancelled in it, so the child (the
    pool's only one) has no call left: the next call's elicitation is bridged, not refused as unattributable."""
    r = post(gw, "x-1", "tools/call", {"name": "test_missing_capability", "arguments": {}}, caps={"elicitation": {}})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == -32021 and error["data"]["requiredCapabilities"] == {"sampling": {}}
    assert wait_until(lambda: "client answered sampling/createMessage with error -32600: Sampling not supported" in gw.log(),
                      timeout=10)
    assert wait_until(lambda: "cancelled: the client lacks the sampling capability" in gw.log(), timeout=10)
    next_call = ask(gw, "x-2")
    assert answer(gw, "x-3", next_call["requestState"], "Next").json()["result"]["content"][0]["text"] == "Hello, Next!"


# -- inputResponses without requestState (mrtr Error Handling), SEP-2164 -------------------------------------


def test_input_responses_without_request_state_complete_the_call(gw):
    """sep-2322-ignore-unexpected-params: answers sent with the call itself (keys the child uses, plus extra
    ones) answer the child's request of that key at once: a complete result, the extra keys ignored."""
    r = post(gw, "i-1", "tools/call", {"name": ASK, "arguments": {}, "inputResponses": {
        "user_name": {"action": "accept", "content": {"name": "Ivy"}}, "unknown_extra_key": {"action": "accept"}}})
    assert r.json()["result"]["content"][0]["text"] == "Hello, Ivy!", r.text


def test_input_responses_of_other_keys_ask_again(gw):
    """missing-input-response: answers of keys the child does not use: a new InputRequiredResult, not an error."""
    r = post(gw, "k-1", "tools/call", {"name": ASK, "arguments": {}, "inputResponses": {"wrong_key": {"action": "accept"}}})
    result = r.json()["result"]
    assert result["resultType"] == "input_required" and list(result["inputRequests"]) == ["user_name"]
    assert answer(gw, "k-2", result["requestState"], "Kay").json()["result"]["content"][0]["text"] == "Hello, Kay!"


@pytest.mark.parametrize("responses", [None, {"user_name": 12345}, [1], "x"])
def test_malformed_input_responses_are_32602(gw, responses):
    """validate-input: an InputResponses that is not an object of result objects: -32602, no child sees it."""
    seen = child_saw(gw, ASK)
    r = post(gw, "v-1", "tools/call", {"name": ASK, "arguments": {}, "inputResponses": responses})
    assert r.status_code == 400 and r.json()["error"]["code"] == -32602, r.text
    settle(gw, seen)
    assert child_saw(gw, ASK) == seen


def test_resource_not_found_is_32602_for_2026_clients(gw):
    """SEP-2164 (2026-07-28 server/resources Error Handling): the child's -32002 reaches a 2026-07-28 client as
    -32602, its data (the URI) kept."""
    uri = "test://nonexistent"
    error = post(gw, "n-1", "resources/read", {"uri": uri}).json()["error"]
    assert error["code"] == -32602 and error["data"] == {"uri": uri}, error
