"""Issue 20, item 7: a draining gateway tells new sessions so, distinct from shutting down.

``POST /admin/drain`` is undone by ``DELETE /admin/drain``: a client refused meanwhile gets
``503 Draining`` (reason phrase; ``error.data.reason`` "draining", a message that says draining and
``Retry-After``) on every transport, never "gateway is shutting down", which stays the answer of a
gateway that is really stopping (RFC 9110 §15.6.4: 503 is temporary, Retry-After says when).
"""

from __future__ import annotations

import pytest
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from mcpgw.transports.common import refuse_new_session
from tests import wire
from tests.gateway_process import fixture_server

TOKEN = "drain-admin-token-0123456789"


class _Sessions:
    accepting = False
    draining = False


class RefusalTests(SynchronousTestCase):
    def refuse(self, draining: bool) -> tuple[DummyRequest, dict]:
        import json

        sessions = _Sessions()
        sessions.draining = draining
        request = DummyRequest([b""])
        body = refuse_new_session(request, sessions, 7)
        return request, json.loads(body)

    def test_draining(self) -> None:
        request, body = self.refuse(draining=True)
        self.assertEqual((request.responseCode, request.responseMessage), (503, b"Draining"))
        self.assertEqual(request.responseHeaders.getRawHeaders(b"retry-after"), [b"5"])
        self.assertEqual(body["id"], 7)
        self.assertEqual(body["error"]["data"], {"reason": "draining"})
        self.assertIn("draining", body["error"]["message"])
        self.assertNotIn("shutting down", body["error"]["message"])

    def test_shutting_down(self) -> None:
        request, body = self.refuse(draining=False)
        self.assertEqual((request.responseCode, request.responseMessage), (503, b"Service Unavailable"))
        self.assertEqual(body["error"]["message"], "gateway is shutting down")
        self.assertEqual(body["error"]["data"], {"reason": "shutting down"})


@pytest.mark.integration
def test_new_sessions_while_draining_get_503_draining(make_gateway):
    gw = make_gateway({"mcpServers": {"fx": fixture_server()}, "admin": {"token": TOKEN}})
    admin = {"authorization": f"Bearer {TOKEN}"}
    with wire.http_client(gw.url) as client:
        assert client.post("/admin/drain", headers=admin).json()["draining"] is True
        r = client.post("/mcp", headers=wire.POST_HEADERS, json=wire.initialize())
        assert (r.status_code, r.reason_phrase) == (503, "Draining"), r.text
        assert r.headers["retry-after"] == "5"
        error = r.json()["error"]
        assert error["data"] == {"reason": "draining"} and "draining" in error["message"]
        assert "shutting down" not in r.text
        sse = client.get("/sse", headers={"accept": "text/event-stream"})
        assert (sse.status_code, sse.reason_phrase) == (503, "Draining") and "shutting down" not in sse.text
        with pytest.raises(InvalidStatus) as refused:
            ws_connect(gw.url.replace("http://", "ws://") + "/ws", open_timeout=10).close()
        assert (refused.value.response.status_code, refused.value.response.reason_phrase) == (503, "Draining")
        # DELETE undoes it: new sessions again.
        assert client.delete("/admin/drain", headers=admin).json()["draining"] is False
        wire.open_session(client)
    assert "shutting down" not in gw.log()
