"""mcpgw.jsonrpc.route_view: routing a large child message without decoding its payload."""

from __future__ import annotations

import json
import random

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mcpgw import jsonrpc
from mcpgw.jsonrpc import Undecoded, decoded, route_view

MiB = 1 << 20

_SCALARS = st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=False, allow_infinity=False) \
    | st.text(alphabet=st.sampled_from('ab"\\/\n\té€😀{}[]:, '), max_size=12)
_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.text(alphabet='ab"\\é{', max_size=4), inner, max_size=4), max_leaves=20)
_OBJECTS = st.dictionaries(st.text(alphabet='abi"\\d', max_size=6), _VALUES, max_size=6)


def _encode(obj: object, spaced: bool) -> bytes:
    if spaced:
        return json.dumps(obj, ensure_ascii=False, indent=1, separators=(" , ", " : ")).encode()
    return orjson.dumps(obj)


def _full(view: dict) -> dict:
    return {k: decoded(v) for k, v in view.items()}


class RouteViewTests(SynchronousTestCase):
    def test_largeResultLeftUndecoded(self) -> None:
        """A 1 MiB result: id and jsonrpc decoded, the result left as its bytes, decodable on demand."""
        text = "x" * MiB
        line = orjson.dumps({"jsonrpc": "2.0", "id": 7, "result": {"content": [{"type": "text", "text": text}]}})
        view = route_view(line)
        self.assertEqual((view["jsonrpc"], view["id"]), ("2.0", 7))
        self.assertIsInstance(view["result"], Undecoded)
        self.assertEqual(decoded(view["result"]), {"content": [{"type": "text", "text": text}]})
        self.assertNotIn("method", view)

    def test_largeRequestFromChild(self) -> None:
        """A server request with large params: method and id are there to route it."""
        line = b'{"params":{"blob":"' + b"a" * MiB + b'"},"method":"sampling/createMessage","id":"s-1","jsonrpc":"2.0"}'
        view = route_view(line)
        self.assertEqual((view["method"], view["id"]), ("sampling/createMessage", "s-1"))
        self.assertIsInstance(view["params"], Undecoded)

    def test_escapedQuotesInPayload(self) -> None:
        """Escaped quotes and backslashes inside a large string do not end it early."""
        text = 'say \\"hi\\" \\\\' * 20 + "z" * 5000
        line = orjson.dumps({"id": 1, "result": {"text": text}, "jsonrpc": "2.0"})
        self.assertEqual(_full(route_view(line)), orjson.loads(line))

    def test_denseEscapesFallBackToFullDecode(self) -> None:
        """A payload of JSON-in-a-string (all escaped quotes) is decoded fully instead: same result."""
        inner = json.dumps([{"k": str(i)} for i in range(5000)])
        line = orjson.dumps({"jsonrpc": "2.0", "id": 2, "result": {"text": inner}})
        view = route_view(line)
        self.assertEqual(view, orjson.loads(line))
        self.assertNotIsInstance(view["result"], Undecoded)

    def test_longNumberArray(self) -> None:
        """A long stretch without strings (numbers) is counted, not walked; the result is the same."""
        line = orjson.dumps({"id": 3, "result": {"values": list(range(20000))}, "jsonrpc": "2.0"})
        self.assertEqual(_full(route_view(line)), orjson.loads(line))
        line = orjson.dumps({"id": 3, "result": list(range(20000))})
        self.assertEqual(_full(route_view(line)), orjson.loads(line))

    def test_notAnObject(self) -> None:
        """Anything but an object is left to the full decode (arrays, scalars, garbage)."""
        self.assertEqual(route_view(b"[1,2]"), [1, 2])
        self.assertEqual(route_view(b" 5 "), 5)
        self.assertRaises(ValueError, route_view, b"garbage")

    def test_notUtf8Refused(self) -> None:
        """A large line with invalid UTF-8 inside an undecoded value is refused, like a small one:
        it would otherwise be relayed into a WebSocket text frame or an SSE event as it is."""
        good = b'{"jsonrpc":"2.0","id":1,"result":{"text":"' + "é".encode() * MiB + b'"}}'
        self.assertEqual(route_view(good)["id"], 1)
        bad = b'{"jsonrpc":"2.0","id":1,"result":{"text":"' + b"a" * MiB + b'\xff"}}'
        with self.assertRaises(ValueError):
            route_view(bad)

    def test_malformedStructure(self) -> None:
        """Broken structure around a large value is refused like a full decode would."""
        big = b'"' + b"a" * 100_000 + b'"'
        for bad in [
            b'{"id":1,"result":' + big,  # truncated
            b'{"id":1,"result":' + big + b",}",  # trailing comma
            b'{"id":1 "result":' + big + b"}",  # missing comma
            b'{"id":1,"result" ' + big + b"}",  # missing colon
            b'{"id":1,"result":' + big + b"} x",  # data after the object
            b'{"id":1,"result":' + big[:-1] + b"}",  # unterminated string
            b'{"id":1,"result":{"a":' + big + b"}",  # unclosed object
            b'{id:1,"result":' + big + b"}",  # unquoted name
            b'{"id":tru,"result":' + big + b"}",  # bad scalar
            b'{"id":[1,2},"result":' + big + b"}",  # small value decoded in full: mismatched bracket
            b'{"id":"\xff","result":' + big + b"}",  # small value decoded in full: not UTF-8
        ]:
            self.assertRaises(ValueError, route_view, bad)

    @settings(max_examples=400, deadline=None)
    @given(_OBJECTS, st.booleans(), st.integers(0, 40))
    def test_sameAsFullDecode(self, obj: dict, spaced: bool, small: int) -> None:
        """Any object, compact or spaced, with any size limit: the view decodes to what loads gives."""
        self.patch(jsonrpc, "SMALL_VALUE", small)
        line = _encode(obj, spaced)
        view = route_view(line)
        self.assertEqual(_full(view), orjson.loads(line))
        for value in view.values():
            if isinstance(value, Undecoded):
                self.assertGreaterEqual(len(value.raw), small)

    @settings(max_examples=300, deadline=None)
    @given(_OBJECTS.filter(bool), st.booleans(), st.integers(0, 40), st.randoms(use_true_random=False))
    def test_everyTruncationRefused(self, obj: dict, spaced: bool, small: int, rnd: random.Random) -> None:
        """No proper prefix of an object is taken for a message."""
        self.patch(jsonrpc, "SMALL_VALUE", small)
        line = _encode(obj, spaced).rstrip()
        cut = rnd.randrange(0, len(line))
        self.assertRaises(ValueError, route_view, line[:cut])


class AsMessageTests(SynchronousTestCase):
    """jsonrpc.as_message: an upstream's ``send`` takes the caller's decoded message instead of decoding again."""

    def test_the_callers_message_is_used_as_it_is(self) -> None:
        msg = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
        self.assertIs(jsonrpc.as_message(b"not even JSON", msg), msg)

    def test_decoded_when_not_given_and_none_for_garbage(self) -> None:
        self.assertEqual(jsonrpc.as_message(b'{"id": 1}'), {"id": 1})
        self.assertIsNone(jsonrpc.as_message(b"{garbage"))
        self.assertIsNone(jsonrpc.as_message(b"\xff\xfe"))
