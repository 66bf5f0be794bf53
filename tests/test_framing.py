"""mcpgw.upstream.stdio.LineFramer: newline framing of a child's stdout/stderr."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mcpgw.upstream.stdio import LineFramer


class Collector:
    """A LineFramer with its callbacks recorded."""

    def __init__(self, max_length: int = 16):
        self.lines: list[bytes] = []
        self.overflows: list[int] = []
        self.framer = LineFramer(max_length, self.lines.append, self.overflows.append)

    def feed(self, *chunks: bytes) -> Collector:
        for chunk in chunks:
            self.framer.feed(chunk)
        return self


class LineFramerTests(SynchronousTestCase):
    def test_oneLine(self) -> None:
        """A complete line is delivered without its newline."""
        c = Collector().feed(b"hello\n")
        self.assertEqual(c.lines, [b"hello"])

    def test_partialLineWaits(self) -> None:
        """Bytes without a newline are held until the newline arrives."""
        c = Collector().feed(b"hel")
        self.assertEqual(c.lines, [])
        c.feed(b"lo\n")
        self.assertEqual(c.lines, [b"hello"])

    def test_lineSplitAcrossManyChunks(self) -> None:
        """A line fed one byte at a time comes out whole, once."""
        c = Collector()
        for b in b"abcdef\n":
            c.feed(bytes([b]))
        self.assertEqual(c.lines, [b"abcdef"])

    def test_manyLinesPerChunk(self) -> None:
        """One chunk holding several lines delivers each, in order."""
        c = Collector().feed(b"one\ntwo\nthree\n")
        self.assertEqual(c.lines, [b"one", b"two", b"three"])

    def test_linesAndPartialInOneChunk(self) -> None:
        """The tail after the last newline starts the next line."""
        c = Collector().feed(b"one\ntw", b"o\nthr", b"ee\n")
        self.assertEqual(c.lines, [b"one", b"two", b"three"])

    def test_crlfStripped(self) -> None:
        """A CRLF-terminated line is delivered without the CR."""
        c = Collector().feed(b"one\r\ntwo\r", b"\n")
        self.assertEqual(c.lines, [b"one", b"two"])

    def test_emptyLinesSkipped(self) -> None:
        """Empty and whitespace-only lines are not delivered."""
        c = Collector().feed(b"\n\r\n  \none\n\n\t\ntwo\n")
        self.assertEqual(c.lines, [b"one", b"two"])

    def test_exactMaxLength(self) -> None:
        """A line of exactly max_length bytes is accepted."""
        c = Collector(8).feed(b"12345678\n")
        self.assertEqual((c.lines, c.overflows), ([b"12345678"], []))

    def test_exactMaxLengthPending(self) -> None:
        """max_length bytes waiting for their newline are not yet too long."""
        c = Collector(8).feed(b"1234", b"5678", b"\n")
        self.assertEqual((c.lines, c.overflows), ([b"12345678"], []))

    def test_exactMaxLengthWithCrlf(self) -> None:
        """The CR of a CRLF does not count toward max_length."""
        c = Collector(8).feed(b"12345678\r\n")
        self.assertEqual((c.lines, c.overflows), ([b"12345678"], []))

    def test_exactMaxLengthWithCrlfSplit(self) -> None:
        """max_length bytes and a CR still waiting for the LF are not too long."""
        c = Collector(8).feed(b"12345678\r", b"\n")
        self.assertEqual((c.lines, c.overflows), ([b"12345678"], []))

    def test_maxPlusOne(self) -> None:
        """A complete line of max_length + 1 bytes overflows and is not delivered."""
        c = Collector(8).feed(b"123456789\n")
        self.assertEqual((c.lines, c.overflows), ([], [9]))

    def test_maxPlusOnePending(self) -> None:
        """max_length + 1 bytes without a newline overflow at once, before any newline."""
        c = Collector(8).feed(b"12345", b"6789")
        self.assertEqual((c.lines, c.overflows), ([], [9]))

    def test_maxPlusOneTail(self) -> None:
        """A too-long tail after a good line overflows after the good line is delivered."""
        c = Collector(8).feed(b"ok\n123456789")
        self.assertEqual((c.lines, c.overflows), ([b"ok"], [9]))

    def test_maxPlusOneWithCrButNoLf(self) -> None:
        """max_length bytes, a CR and one more byte overflow."""
        c = Collector(8).feed(b"12345678\rx")
        self.assertEqual(c.overflows, [10])

    def test_overflowReportedOnce(self) -> None:
        """After an overflow, more too-long input is not reported again."""
        c = Collector(4).feed(b"123456", b"789012", b"abcdefgh\n")
        self.assertEqual(len(c.overflows), 1)
        self.assertTrue(c.framer.broken)

    def test_inputIgnoredAfterOverflow(self) -> None:
        """Good lines after an overflow are ignored: the stream can no longer be trusted."""
        c = Collector(4).feed(b"123456\nok\n", b"fine\n")
        self.assertEqual((c.lines, c.overflows), ([], [6]))

    def test_linesBeforeOverflowDelivered(self) -> None:
        """Lines earlier in the same chunk as an overlong one are still delivered."""
        c = Collector(4).feed(b"ok\n123456\nlost\n")
        self.assertEqual((c.lines, c.overflows), ([b"ok"], [6]))

    def test_flushDeliversLastLine(self) -> None:
        """flush() delivers a last line that had no newline."""
        c = Collector().feed(b"one\ntw", b"o")
        c.framer.flush()
        self.assertEqual(c.lines, [b"one", b"two"])

    def test_flushTwice(self) -> None:
        """A second flush() delivers nothing more."""
        c = Collector().feed(b"last")
        c.framer.flush()
        c.framer.flush()
        self.assertEqual(c.lines, [b"last"])

    def test_flushWithNothingPending(self) -> None:
        """flush() after complete lines delivers nothing."""
        c = Collector().feed(b"one\n")
        c.framer.flush()
        self.assertEqual(c.lines, [b"one"])

    def test_flushWhitespaceOnly(self) -> None:
        """flush() does not deliver a whitespace-only tail."""
        c = Collector().feed(b"one\n  ")
        c.framer.flush()
        self.assertEqual(c.lines, [b"one"])

    def test_flushAfterOverflow(self) -> None:
        """flush() after an overflow delivers nothing."""
        c = Collector(4).feed(b"123456")
        c.framer.flush()
        self.assertEqual((c.lines, c.overflows), ([], [6]))

    def test_emptyChunk(self) -> None:
        """An empty chunk changes nothing."""
        c = Collector(8).feed(b"12345678\r", b"", b"\n")
        self.assertEqual((c.lines, c.overflows), ([b"12345678"], []))


# -- properties ----------------------------------------------------------------

#: Short alphabets make newlines, CRs, blanks and long lines all likely.
_STREAM = st.lists(st.sampled_from(list(b"ab\r\n \x00{}")), max_size=120).map(bytes)
_MAX = st.integers(min_value=1, max_value=24)


def _run(max_length: int, chunks: list[bytes]) -> tuple[list[bytes], bool]:
    c = Collector(max_length).feed(*chunks)
    c.framer.flush()
    return c.lines, bool(c.overflows)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def _oracle(max_length: int, data: bytes) -> list[bytes] | None:
    """The lines of ``data`` by a plain split; None if any line is too long."""
    *complete, last = data.split(b"\n")
    lines = []
    for line in complete:
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > max_length:
            return None
        if line.strip():
            lines.append(line)
    if last.endswith(b"\r"):
        last = last[:-1]
    if len(last) > max_length:
        return None
    if last.strip():
        lines.append(last)
    return lines


class LineFramerPropertyTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(_MAX, _STREAM, st.lists(st.integers(min_value=0, max_value=120), max_size=12))
    def test_anySplitSameLines(self, max_length: int, data: bytes, cuts: list[int]) -> None:
        """Any split of a byte stream into chunks yields the same lines (and the same overflow verdict)."""
        self.assertEqual(_run(max_length, _split(data, cuts)), _run(max_length, [data]))

    @settings(max_examples=300, deadline=None)
    @given(_MAX, _STREAM)
    def test_byteAtATimeMatchesOracle(self, max_length: int, data: bytes) -> None:
        """Fed byte by byte, the framer agrees with a plain split of the whole stream."""
        lines, overflowed = _run(max_length, [data[i:i + 1] for i in range(len(data))])
        expected = _oracle(max_length, data)
        if expected is None:
            self.assertTrue(overflowed)
        else:
            self.assertEqual((lines, overflowed), (expected, False))


class LargeLineTests(SynchronousTestCase):
    """A 1 MiB line read in pipe-sized pieces (the 1 MiB round trip of docs/performance.md)."""

    MiB = 1 << 20

    def test_oneMiBLineInManyReads(self) -> None:
        """A 1 MiB line split into 64 KiB reads (and odd sizes) comes out whole, once, and the next
        line that shares its last read follows it."""
        line = bytes(range(33, 123)) * (self.MiB // 90)
        stream = line + b"\r\n" + b'{"next":1}\n' + b"tail"
        for size in (65536, 4096, 65535, 1 << 20, 7):
            c = Collector(2 * self.MiB)
            for i in range(0, len(stream), size):
                c.feed(stream[i:i + size])
            self.assertEqual(c.lines, [line, b'{"next":1}'], size)
            self.assertEqual(c.overflows, [])
            c.framer.flush()
            self.assertEqual(c.lines[-1], b"tail")

    def test_oneMiBLineJoinedOnce(self) -> None:
        """The pieces of a line are joined once: the line is not rebuilt on every read."""
        c = Collector(2 * self.MiB)
        piece = b"x" * 65536
        for _ in range(16):
            c.feed(piece)
        self.assertEqual(c.lines, [])
        self.assertEqual(len(c.framer._chunks), 16)  # held as pieces, not concatenated
        c.feed(b"y\n")
        self.assertEqual(c.lines, [piece * 16 + b"y"])
        self.assertEqual((c.framer._chunks, c.framer._pending), ([], 0))

    def test_oneMiBLineOverTheLimit(self) -> None:
        """A line that grows past max_length in many reads is reported once, as soon as it is too long."""
        c = Collector(self.MiB)
        piece = b"x" * 65536
        for _ in range(17):
            c.feed(piece)
        self.assertEqual(c.overflows, [17 * 65536])
        c.feed(b"\n")
        self.assertEqual((c.lines, c.overflows), ([], [17 * 65536]))

    def test_blankEndsNotCopiedAway(self) -> None:
        """A line with blanks around it is delivered as written (blank lines alone are skipped)."""
        c = Collector(64).feed(b"  {}  \n \t \n")
        self.assertEqual(c.lines, [b"  {}  "])
