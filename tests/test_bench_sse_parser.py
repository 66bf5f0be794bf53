"""bench.http.SseParser, the bench client's SSE parser: the same events however the stream is cut."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from bench.http import SseParser


def parse(*pieces: bytes) -> list[tuple[bytes, bytes]]:
    events: list[tuple[bytes, bytes]] = []
    parser = SseParser(lambda event, data: events.append((event, data)))
    for piece in pieces:
        parser.feed(piece)
    return events


_LINE_END = st.sampled_from([b"\n", b"\r\n", b"\r"])
_TEXT = st.binary(max_size=12).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    out = b""
    for _ in range(draw(st.integers(0, 4))):
        nl = draw(_LINE_END)
        if draw(st.booleans()):
            out += b"event: " + draw(_TEXT) + nl
        if draw(st.booleans()):
            out += b": comment" + nl
        for _ in range(draw(st.integers(0, 3))):
            out += draw(st.sampled_from([b"data: ", b"data:"])) + draw(_TEXT) + nl
        out += nl
    return out


class SseParserTests(SynchronousTestCase):
    def test_events(self) -> None:
        self.assertEqual(parse(b"event: endpoint\ndata: /m?x\n\ndata: {}\n\n"), [(b"endpoint", b"/m?x"), (b"message", b"{}")])

    def test_multilineData(self) -> None:
        self.assertEqual(parse(b"data: a\r\ndata:b\r\n\r\n"), [(b"message", b"a\nb")])

    def test_largeEventInManyPieces(self) -> None:
        """A 1 MiB event in 64 KiB pieces: one event, intact; pieces are kept, not re-joined per read."""
        data = b"x" * (1 << 20)
        stream = b"event: message\ndata: " + data + b"\n\n"
        events: list[tuple[bytes, bytes]] = []
        parser = SseParser(lambda event, d: events.append((event, d)))
        for i in range(0, len(stream) - 1, 65536):
            parser.feed(stream[i:i + 65536])
            if i + 65536 < len(stream) - 2:
                self.assertEqual(events, [])
        self.assertLessEqual(len(parser._parts), 1)
        self.assertEqual(events, [(b"message", data)])

    def test_blankLineAcrossPieces(self) -> None:
        self.assertEqual(parse(b"data: a\n", b"\ndata: b\r", b"\n\r", b"\n"), [(b"message", b"a"), (b"message", b"b")])

    @settings(max_examples=300, deadline=None)
    @given(streams(), st.lists(st.integers(0, 200), max_size=10))
    def test_anySplitSameEvents(self, stream: bytes, cuts: list[int]) -> None:
        points = sorted({min(c, len(stream)) for c in cuts})
        bounds = [0, *points, len(stream)]
        pieces = [stream[a:b] for a, b in zip(bounds, bounds[1:])]
        self.assertEqual(parse(*pieces), parse(stream))
