"""Hand-made HTTP/2 frames for talking to the gRPC port on a raw socket
(RFC 9113, HPACK literals from RFC 7541): valid enough to get past the
preface, broken wherever an attack wants."""
import socket
import struct
import time

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, \
    WINDOW_UPDATE, CONTINUATION = range(10)
FRAME_NAMES = {DATA: "DATA", HEADERS: "HEADERS", PRIORITY: "PRIORITY", RST_STREAM: "RST_STREAM",
               SETTINGS: "SETTINGS", PUSH_PROMISE: "PUSH_PROMISE", PING: "PING",
               GOAWAY: "GOAWAY", WINDOW_UPDATE: "WINDOW_UPDATE", CONTINUATION: "CONTINUATION"}
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
ERROR_NAMES = {0: "NO_ERROR", 1: "PROTOCOL_ERROR", 2: "INTERNAL_ERROR", 3: "FLOW_CONTROL_ERROR",
               6: "FRAME_SIZE_ERROR", 7: "REFUSED_STREAM", 8: "CANCEL", 9: "COMPRESSION_ERROR",
               11: "ENHANCE_YOUR_CALM"}


def frame(kind, flags, stream, payload, length=None):
    """A frame; `length` may lie about the payload's size."""
    length = len(payload) if length is None else length
    return struct.pack(">I", length)[1:] + struct.pack(">BBI", kind, flags, stream & 0x7FFFFFFF) + payload


def settings(pairs=(), ack=False):
    return frame(SETTINGS, ACK if ack else 0, 0, b"".join(struct.pack(">HI", k, v) for k, v in pairs))


def ping(data=b"\0" * 8, ack=False):
    return frame(PING, ACK if ack else 0, 0, data)


def window_update(stream, increment):
    return frame(WINDOW_UPDATE, 0, stream, struct.pack(">I", increment & 0x7FFFFFFF))


def rst_stream(stream, code=8):
    return frame(RST_STREAM, 0, stream, struct.pack(">I", code))


def data(stream, payload, end_stream=False):
    return frame(DATA, END_STREAM if end_stream else 0, stream, payload)


def headers(stream, block, end_stream=False, end_headers=True):
    flags = (END_STREAM if end_stream else 0) | (END_HEADERS if end_headers else 0)
    return frame(HEADERS, flags, stream, block)


def continuation(stream, block, end_headers=False):
    return frame(CONTINUATION, END_HEADERS if end_headers else 0, stream, block)


# --------------------------------------------------------------------------
# HPACK

def hpack_int(value, prefix_bits, first_byte_flags=0):
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first_byte_flags | value])
    out = [first_byte_flags | limit]
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def hpack_string(text):
    raw = text.encode() if isinstance(text, str) else text
    return hpack_int(len(raw), 7) + raw


def literal(name, value):
    """Literal header field without indexing, new name."""
    return b"\x00" + hpack_string(name) + hpack_string(value)


def literal_indexed(name, value):
    """Literal with incremental indexing (enters the dynamic table at 62)."""
    return b"\x40" + hpack_string(name) + hpack_string(value)


def indexed(index):
    return hpack_int(index, 7, 0x80)


def grpc_request_headers(path, authority="127.0.0.1", extra=()):
    fields = [(":method", "POST"), (":scheme", "http"), (":path", path),
              (":authority", authority), ("content-type", "application/grpc"),
              ("te", "trailers")] + list(extra)
    return b"".join(literal(n, v) for n, v in fields)


def grpc_message(payload, declared_length=None, compressed=False):
    """gRPC's length-prefixed message (the length may lie)."""
    length = len(payload) if declared_length is None else declared_length
    return struct.pack(">BI", 1 if compressed else 0, length) + payload


CLASSIFY = "/emoserve.v1.EmotionService/Classify"
STREAM_CLASSIFY = "/emoserve.v1.EmotionService/StreamClassify"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"


# --------------------------------------------------------------------------
# Connections

SETTINGS_INITIAL_WINDOW_SIZE = 4


def connect(port, host="127.0.0.1", timeout=2.0, preface=True, settings_pairs=()):
    """A TCP connection; with `preface`, the HTTP/2 preface and our SETTINGS
    (`settings_pairs`) are sent."""
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if preface:
        sock.sendall(PREFACE + settings(settings_pairs))
    return sock


def data_frames(stream, payload, max_frame=16384, end_stream=False):
    """`payload` cut into DATA frames no larger than the default maximum."""
    pieces = [payload[i:i + max_frame] for i in range(0, len(payload), max_frame)] or [b""]
    return b"".join(data(stream, piece, end_stream and i == len(pieces) - 1)
                    for i, piece in enumerate(pieces))


def handshake(sock, timeout=1.0):
    """After the preface: waits (up to `timeout`) for the server's SETTINGS
    and acknowledges them."""
    end = time.monotonic() + timeout
    buf = b""
    while time.monotonic() < end:
        sock.settimeout(max(0.01, end - time.monotonic()))
        try:
            got = sock.recv(65536)
        except (socket.timeout, OSError):
            break
        if not got:
            break
        buf += got
        if len(buf) >= 9 and buf[3] == SETTINGS and not buf[4] & ACK:
            break
    sock.sendall(settings(ack=True))


def send_for(sock, chunks, seconds):
    """Sends chunks (an iterable of bytes) until they run out or `seconds`
    pass; a blocked send (the server stopped reading) counts as time spent.
    Returns (bytes sent, why it stopped)."""
    end = time.monotonic() + seconds
    sent = 0
    for chunk in chunks:
        left = end - time.monotonic()
        if left <= 0:
            return sent, "time up"
        sock.settimeout(min(left, 1.0))
        try:
            sock.sendall(chunk)
            sent += len(chunk)
        except socket.timeout:
            return sent, "server stopped reading"
        except OSError as error:
            return sent, f"closed by server ({error.strerror or error})"
    return sent, "all sent"


def read_frames(sock, seconds, max_bytes=1 << 22):
    """Reads what the server sends for up to `seconds`: a list of
    (type, flags, stream, payload) and how the connection ended ('open',
    'closed', 'reset')."""
    end = time.monotonic() + seconds
    buf = b""
    state = "open"
    while time.monotonic() < end and len(buf) < max_bytes:
        sock.settimeout(max(0.01, end - time.monotonic()))
        try:
            got = sock.recv(65536)
        except socket.timeout:
            break
        except OSError:
            state = "reset"
            break
        if not got:
            state = "closed"
            break
        buf += got
    frames = []
    while len(buf) >= 9:
        length = int.from_bytes(buf[:3], "big")
        kind, flags, stream = buf[3], buf[4], int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
        if len(buf) < 9 + length:
            break
        frames.append((kind, flags, stream, buf[9:9 + length]))
        buf = buf[9 + length:]
    return frames, state


def describe_reaction(frames, state):
    """'GOAWAY(PROTOCOL_ERROR) SETTINGS+ACKx3 closed' and the like."""
    counts = {}
    for kind, flags, _stream, payload in frames:
        if kind == GOAWAY and len(payload) >= 8:
            code = struct.unpack(">I", payload[4:8])[0]
            text = payload[8:60].decode(errors="replace")
            name = f"GOAWAY({ERROR_NAMES.get(code, code)}{': ' + text if text else ''})"
        elif kind == RST_STREAM and len(payload) >= 4:
            code = struct.unpack(">I", payload[:4])[0]
            name = f"RST_STREAM({ERROR_NAMES.get(code, code)})"
        else:
            name = FRAME_NAMES.get(kind, str(kind))
            if kind in (SETTINGS, PING) and flags & ACK:
                name += "+ACK"
        counts[name] = counts.get(name, 0) + 1
    parts = [f"{name}x{count}" if count > 1 else name for name, count in counts.items()]
    return " ".join(parts + [state])
