"""Autobahn's WebSocket frame handling and Twisted's TCP write buffer, past their public API: the
shortcuts mcpgw.transports.websocket takes, and the one slot of Autobahn's it fills.

- :class:`FastFrames` receiving: a read that holds only whole, final, masked, unextended text frames
  (what every client sends for a JSON-RPC message) is parsed and unmasked here and each message
  handed to ``onMessage`` directly, past Autobahn's per-frame machinery; such a frame split across
  reads is kept here until its last byte has come. Any other frame (a control frame, a fragment, a
  frame over the limit, a protocol error, any state but OPEN) goes to Autobahn's byte entry
  ``_dataReceived``, which sees exactly the bytes of the frames it would have parsed, in order: the
  frame alone when its header tells its length, else a piece (:data:`PIECE`) at a time, back to the
  fast path as soon as Autobahn's parser holds nothing. Whichever path parses, a reply that takes
  the write buffer over its high-water mark holds the rest of the read until the buffer has
  drained (``held``): one read of tiny frames costs one turn of the reactor at most a write
  buffer's worth of replies, not thousands of them. It reads Autobahn's parser state (``data``,
  ``current_frame``, ``inside_message``), its keepalive state (``autoPingTimeoutCall``,
  ``autoPingRestartOnAnyTraffic``, ``_cancelAutoPingTimeoutCall``) and what decides that every frame
  must be Autobahn's (``_perMessageCompress``, ``logFrames``, ``logOctets``, ``trackedTimings``).
- :class:`FastFrames` sending: a reply is framed here, header + payload in one write, rather than by
  ``sendMessage`` (which builds debug-log arguments per frame and refuses replies over the limit
  that clients are held to); skipped when Autobahn has queued writes (``send_queue``).
- direct writes (part of :class:`FastFrames`): the frame goes straight into an idle plain-TCP socket
  with Twisted's ``writeSomeData`` when ``tcp.Connection`` has nothing buffered (``_tempDataLen``,
  ``dataBuffer``, ``_writeDisconnected``, ``TLS``): Twisted's ``write`` only buffers, and each reply
  would cost an ``epoll_ctl`` to watch the socket, a reactor turn to write it and another
  ``epoll_ctl``.
- :func:`use_reactor` puts Autobahn's timers (handshake timeouts, keepalive pings) on the gateway's
  reactor: Autobahn takes them from the factory's ``_batched_timer``, which it makes on txaio's
  global loop, and has no public way to choose another. This one is not about speed, so
  ``fastPaths: false`` leaves it on; only a failed probe turns it off (then the timers run on the
  global reactor, which is the gateway's own outside tests).

:func:`probe` checks, when this module is imported, the exact names and signatures each shortcut
reads against the installed Autobahn (26.11) and Twisted (26.10); a shortcut whose check fails
writes one warning line (mcpgw._fast.probe_failed) and stays off. The public path, taken when a
probe fails or the fast paths are off, is Autobahn's own: its ``dataReceived`` and frame parser
into ``onMessage``, ``sendMessage`` and ``transport.write``.
"""

from __future__ import annotations

from typing import Any

from autobahn.websocket import xormasker
from autobahn.websocket.protocol import WebSocketProtocol, WebSocketServerFactory
from autobahn.websocket.xormasker import create_xor_masker
from twisted.internet import abstract, tcp

from mcpgw import _fast
from mcpgw._fast.probe import Need, contains, first_missing, params, sets, uses

#: What the probe found usable, one flag per shortcut.
frames_usable = False
direct_usable = False
timers_usable = False

_OPEN = WebSocketProtocol.STATE_OPEN
#: Payloads up to this many bytes are unmasked with one int XOR (cheaper than making a
#: masker object); longer ones with Autobahn's masker (native SIMD when it was built).
_INT_UNMASK_MAX = 1024
#: The header of a text frame (FIN, opcode 1, unmasked) for each 7-bit payload length.
_TEXT_HEADERS = [bytes((0x81, n)) for n in range(126)]
#: Bytes handed to Autobahn's parser at a time when it does not tell where its frame ends: between
#: pieces a write buffer over the high-water mark holds the rest of the read.
PIECE = 4096


# -- the probe -----------------------------------------------------------------------------------

#: What FastFrames reads of Autobahn: the methods that keep the parser's and the keepalive's state
#: (instance attributes set in ``_connectionMade``, so read from the methods' code), the ones it
#: calls, and the options that decide that every frame must be Autobahn's (copied from the factory
#: by name, CONFIG_ATTRS_COMMON; ``trackedTimings`` is set by ``_connectionMade``).
_FRAMES = (
    *(Need(WebSocketProtocol, method, f"WebSocketProtocol.{method} using {name}", uses(name))
      for method, names in (
          ("_connectionMade", ("data", "send_queue", "autoPingTimeoutCall", "_perMessageCompress")),
          ("_dataReceived", ("data", "consumeData")),
          ("processData", ("data", "current_frame", "inside_message")),
          ("onFrameBegin", ("current_frame", "inside_message")),
          ("onFrameEnd", ("autoPingTimeoutCall", "autoPingRestartOnAnyTraffic", "_cancelAutoPingTimeoutCall")),
          ("sendData", ("send_queue",)),
      ) for name in names),
    *(Need(WebSocketProtocol, method, f"WebSocketProtocol.{method}({', '.join(names)})", params(*names))
      for method, names in (
          ("_dataReceived", ("self", "data")),
          ("_cancelAutoPingTimeoutCall", ("self",)),
          ("onMessage", ("self", "payload", "isBinary")),
      )),
    *(Need(WebSocketProtocol, "CONFIG_ATTRS_COMMON", f"WebSocketProtocol.{name}", contains(name))
      for name in ("logFrames", "logOctets", "maxMessagePayloadSize", "maxFramePayloadSize")),
    Need(WebSocketProtocol, "_connectionMade", "WebSocketProtocol.trackedTimings", uses("trackedTimings")),
    Need(xormasker, "create_xor_masker", "autobahn.websocket.xormasker.create_xor_masker(mask, length)",
         params("mask", "length")),
)
#: What a direct write reads of a Twisted TCP transport to know that nothing is buffered.
_DIRECT = (
    *(Need(tcp, "Connection", f"tcp.Connection.{name}", sets(name))
      for name in ("_tempDataLen", "dataBuffer", "connected", "disconnecting", "_writeDisconnected", "TLS",
                   "writeSomeData")),
    Need(abstract, "FileDescriptor.write", "FileDescriptor.write using _tempDataLen", uses("_tempDataLen")),
    Need(tcp, "Connection.writeSomeData", "tcp.Connection.writeSomeData(self, data)", params("self", "data")),
)
#: The slot use_reactor fills: the factory makes it, each protocol's ``_connectionMade`` reads it.
_TIMERS = (
    Need(WebSocketServerFactory, "__init__", "WebSocketServerFactory._batched_timer", uses("_batched_timer")),
    Need(WebSocketProtocol, "_connectionMade", "WebSocketProtocol._connectionMade using factory._batched_timer",
         uses("_batched_timer")),
)


def _frames_missing() -> str | None:
    """The first thing FastFrames reads that the installed Autobahn lacks, or None."""
    return first_missing(_FRAMES)


def _direct_missing() -> str | None:
    """The first thing a direct write reads that the installed Twisted lacks, or None."""
    return first_missing(_DIRECT)


def _timers_missing() -> str | None:
    """What use_reactor relies on that the installed Autobahn lacks, or None."""
    return first_missing(_TIMERS)


def probe() -> bool:
    """Check each shortcut against the installed Autobahn and Twisted; one warning line per shortcut
    that stays off. True when all may be used (mcpgw._fast.enabled() still decides whether the fast
    ones are)."""
    global frames_usable, direct_usable, timers_usable
    found: dict[str, bool] = {}
    for name, library, what, missing in (
        ("frames", "Autobahn", "WebSocket frames", _frames_missing),
        ("direct", "Twisted", "writing WebSocket frames", _direct_missing),
        ("timers", "Autobahn", "WebSocket timers on the gateway's reactor", _timers_missing),
    ):
        gone = missing()
        found[name] = gone is None
        if gone is not None:
            _fast.probe_failed(library, what, gone)
    frames_usable, direct_usable, timers_usable = found["frames"], found["direct"], found["timers"]
    return frames_usable and direct_usable and timers_usable


def usable() -> bool:
    """Whether a connection built now takes the fast paths (decided once per connection)."""
    return frames_usable and _fast.enabled()


# -- timers --------------------------------------------------------------------------------------

def use_reactor(factory: Any, reactor: Any) -> None:
    """Autobahn's timers for ``factory``'s connections on ``reactor`` rather than txaio's global loop."""
    if timers_usable:
        factory._batched_timer = ReactorTimer(reactor)


class ReactorTimer:
    """The ``call_later`` Autobahn's protocols ask of ``factory._batched_timer``."""

    def __init__(self, reactor: Any):
        self._reactor = reactor

    def call_later(self, delay: float, func: Any, *args: Any, **kwargs: Any) -> _Call:
        return _Call(self._reactor.callLater(delay, func, *args, **kwargs))


class _Call:
    """A delayed call whose ``cancel`` may come after it ran."""

    def __init__(self, call: Any):
        self._call = call

    def cancel(self) -> None:
        if self._call.active():
            self._call.cancel()


# -- one connection's fast paths -----------------------------------------------------------------

class FastFrames:
    """The fast paths of one open connection (made by :meth:`open` from the protocol's ``onOpen``).

    ``proto`` is an Autobahn ``WebSocketServerProtocol`` with mcpgw's ``stopped_reading``.
    """

    def __init__(self, proto: Any, limit: int, direct: bool):
        self._proto = proto
        #: Largest payload the receive path takes (websocket.maxMessageBytes); -1: none.
        self.limit = limit
        #: The transport is a Twisted TCP connection: replies may be sent at once (``_write``).
        self.direct = direct
        #: The rest of a read whose replies went over the write buffer's high-water mark: parsed
        #: when the buffer has drained (``resume``), so one read of small frames cannot keep the
        #: reactor answering them for long while other connections wait.
        self.held = b""
        #: A whole text frame's first bytes, split across reads (the reads so far, in order).
        self.partial: list[bytes] = []
        self._partial_len = 0
        #: Its size once its header is in (0 before): a read that does not complete it is only kept.
        self._partial_need = 0

    def resume(self) -> None:
        """The write buffer drained: parse what the last read left."""
        held, self.held = self.held, b""
        if held:
            self._parse(held)

    @classmethod
    def open(cls, proto: Any) -> FastFrames:
        return cls(proto, _receive_limit(proto), _is_plain_tcp(proto.transport))

    def data_received(self, data: bytes) -> None:
        """Replaces Autobahn's Twisted ``dataReceived``, which only adds a debug-log call whose
        arguments are formatted for every read even when debug is off."""
        if self.held:
            self.held += data  # read before the pause took effect: behind what is held
            return
        if self.partial:
            self.partial.append(data)
            self._partial_len += len(data)
            if self._partial_len < self._partial_need:
                return  # the split frame is not whole yet
            data = b"".join(self.partial)
            self.partial, self._partial_len, self._partial_need = [], 0, 0
        self._parse(data)

    def _parse(self, data: bytes) -> None:
        """Whole text frames here, other frames Autobahn's, in order, until the data ends, a split
        text frame is left (kept), a reply went over the high-water mark (the rest held) or the
        connection failed (the rest dropped)."""
        proto = self._proto
        n = len(data)
        pos = 0
        while True:
            if proto.state == _OPEN and not (proto.data or proto.current_frame is not None or proto.inside_message):
                # Replies written while a read is parsed (errors, 429s, {"type":"pong"}) go into
                # Twisted's buffer, out in one send when the reactor next writes, rather than one
                # send each; and past the high-water mark they pause reading (_Backpressure).
                direct, self.direct = self.direct, False
                try:
                    end, split = self._whole_frames(proto, data, pos)
                finally:
                    self.direct = direct
                if split:
                    self._keep(data[end:] if end else data)
                    return
                if end == pos:  # a frame of Autobahn's: that frame alone, or its first piece
                    end = pos + min(_frame_size(data, pos) or PIECE, PIECE)
                    proto._dataReceived(data[pos:end] if pos or end < n else data)
            else:
                end = pos + PIECE
                proto._dataReceived(data[pos:end] if pos or end < n else data)
            pos = end
            if pos >= n or proto.stopped_reading:
                return
            backpressure = proto.backpressure
            if backpressure is not None and backpressure.paused:
                self.held = data[pos:]
                return

    def _keep(self, rest: bytes) -> None:
        """The first bytes of a whole text frame: parsed once the reads after them complete it."""
        self.partial = [rest]
        self._partial_len = len(rest)
        self._partial_need = _frame_size(rest, 0)

    def _whole_frames(self, proto: Any, data: bytes, pos: int) -> tuple[int, bool]:
        """Hand each whole, final, masked text frame from ``data[pos:]`` on to ``onMessage``, until
        another frame, a state but OPEN or a full write buffer: (the offset where it stopped, whether
        what is left there is the start of such a frame, split across reads)."""
        n = len(data)
        limit = self.limit
        while n - pos >= 6:
            b1 = data[pos + 1]
            if data[pos] != 0x81 or b1 < 0x80:
                return pos, False  # not FIN + text without RSV bits, or unmasked: Autobahn decides
            length = b1 & 0x7F
            if length < 126:
                start = pos + 6
            elif length == 126:
                start = pos + 8
                if start > n:
                    return pos, limit >= 0
                length = (data[pos + 2] << 8) | data[pos + 3]
                if length < 126:
                    return pos, False  # not the minimal length encoding: a protocol error
            else:
                start = pos + 14
                if start > n:
                    return pos, limit >= 0
                length = int.from_bytes(data[pos + 2:pos + 10], "big")
                if length < 65536 or length >> 63:
                    return pos, False  # not minimal, or the reserved top bit: a protocol error
            if length > limit:
                return pos, False  # over websocket.maxMessageBytes (1009)
            end = start + length
            if end > n:
                return pos, True  # the rest of it is still to come
            mask = data[start - 4:start]
            if length <= _INT_UNMASK_MAX:
                q, r = divmod(length, 4)
                payload = (int.from_bytes(data[start:end], "little")
                           ^ int.from_bytes(mask * q + mask[:r], "little")).to_bytes(length, "little")
            else:
                payload = create_xor_masker(mask, length).process(data[start:end])
            pos = end
            if proto.autoPingTimeoutCall and proto.autoPingRestartOnAnyTraffic:
                proto._cancelAutoPingTimeoutCall()  # as Autobahn's onFrameEnd: any data frame will do
            proto.onMessage(payload, False)
            if proto.state != _OPEN:
                return pos, False  # closing: the rest is Autobahn's
            backpressure = proto.backpressure
            if backpressure is not None and backpressure.paused:
                return pos, False
        # under 6 bytes left: the start of a text frame (FIN, text, masked) waits for the next read
        return pos, pos < n and limit >= 0 and data[pos] == 0x81 and (n - pos < 2 or data[pos + 1] >= 0x80)

    def send_text(self, raw: bytes) -> bool:
        """One message, one text frame, header + payload in one write; False when Autobahn has
        queued writes or logs frames (the caller sends it the public way, behind them)."""
        proto = self._proto
        if proto.send_queue or proto.logFrames or proto.logOctets:
            return False
        n = len(raw)
        if n < 126:
            self._write(_TEXT_HEADERS[n] + raw)
        elif n < 65536:
            self._write(b"\x81\x7e" + n.to_bytes(2, "big") + raw)
        else:
            proto.transport.writeSequence((b"\x81\x7f" + n.to_bytes(8, "big"), raw))
        return True

    def _write(self, frame: bytes) -> None:
        """``transport.write``, but straight into an idle plain-TCP socket.

        When nothing is buffered this sends at once, with Twisted's own ``writeSomeData``;
        whatever the kernel does not take (a full socket buffer, an error) goes through ``write``,
        so the order of bytes, backpressure (the session pauses the child) and error
        handling are Twisted's.
        """
        t = self._proto.transport
        if (self.direct and not t._tempDataLen and not t.dataBuffer and t.connected
                and not t.disconnecting and not t._writeDisconnected and not t.TLS):
            sent = t.writeSomeData(frame)
            if sent.__class__ is not int:
                t.write(frame)  # a lost connection: Twisted finds out and reports it
            elif sent < len(frame):
                t.write(frame[sent:])
        else:
            t.write(frame)


def _frame_size(data: bytes, pos: int) -> int:
    """Bytes of the frame at ``data[pos:]`` (header, mask key, payload); 0 while its header is short."""
    have = len(data) - pos
    if have < 2:
        return 0
    b1 = data[pos + 1]
    length = b1 & 0x7F
    header = 2
    if length == 126:
        header = 4
        if have < 4:
            return 0
        length = (data[pos + 2] << 8) | data[pos + 3]
    elif length == 127:
        header = 10
        if have < 10:
            return 0
        length = int.from_bytes(data[pos + 2:pos + 10], "big")
    return header + (4 if b1 & 0x80 else 0) + length


def _receive_limit(proto: Any) -> int:
    """The payload limit of one fast-path frame, or -1 when every frame must go to Autobahn."""
    if proto.logFrames or proto.logOctets or proto.trackedTimings or proto._perMessageCompress is not None:
        return -1  # Autobahn's hooks and extensions see every frame
    limits = [n for n in (proto.maxMessagePayloadSize, proto.maxFramePayloadSize) if n > 0]
    return min(limits) if limits else 1 << 62


def _is_plain_tcp(transport: Any) -> bool:
    """A Twisted TCP connection (whose buffers the probe checked), not TLS or a test's transport."""
    return direct_usable and isinstance(transport, tcp.Connection)


probe()
