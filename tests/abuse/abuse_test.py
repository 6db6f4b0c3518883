#!/usr/bin/python3
"""The abuse suite: hostile clients against a real emoserve-server on
127.0.0.1, one fresh server per case.

  abuse_test.py --server BIN --stubs DIR --model DIR [--shared DIR]
                [--only NAME,...] [--rss-bound-mb N] [--list]

For each case: the abusive calls must end with a clear error (or a correct
answer) within their deadlines; the server's peak RSS over its baseline
(VmRSS sampled every 20 ms and VmHWM after clear_refs) must stay under the
case's bound (or --rss-bound-mb); a well-behaved client in another process
(prober.py: a Classify of a real RAVDESS clip, or of generated speech
without --shared, with a 1 s deadline, and grpc.health.v1.Health/Check)
must keep succeeding during the abuse; and the server must still be alive
and SERVING afterwards.

Exit status: 0 when every case passed, 1 when one failed, 77 (ctest's
SKIP_RETURN_CODE) when a prerequisite is missing.
Debian's /usr/bin/python3 with python3-grpcio, python3-protobuf and
python3-numpy; no other packages.
"""
import argparse
import concurrent.futures
import http.client
import os
import pathlib
import random
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback

SKIP = 77
HERE = pathlib.Path(__file__).resolve().parent


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", required=True, help="the emoserve-server binary")
    parser.add_argument("--stubs", required=True, help="Python stubs of emoserve.v1")
    parser.add_argument("--model", required=True, help="model directory")
    parser.add_argument("--shared", default=os.environ.get("EMOSERVE_SHARED_DIR", ""),
                        help="shared data folder (RAVDESS clips); generated speech without it")
    parser.add_argument("--only", default="", help="comma-separated case names or numbers")
    parser.add_argument("--rss-bound-mb", type=float,
                        help="peak RSS over baseline allowed in every case (default: each case's own)")
    parser.add_argument("--rss-kill-mb", type=float, default=4096,
                        help="kill the server past this RSS to protect the machine (the case fails)")
    parser.add_argument("--logs", help="keep server logs here (default: a temporary folder, "
                                       "kept when a case fails)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    return parser.parse_args()


ARGS = parse_args()
try:
    import grpc
    import numpy as np

    sys.path.insert(0, str(HERE))
    sys.path.insert(0, ARGS.stubs)
    from emoserve.v1 import emoserve_pb2 as pb
    from emoserve.v1 import emoserve_pb2_grpc as pb_grpc

    import audio
    import h2
    import harness
    from harness import (SERVING, Context, MemorySampler, Outcome, Prober, Server,
                         read_status, timed)
except ImportError as error:
    print(f"SKIP: {error} (python3-grpcio, python3-protobuf, python3-numpy and the generated "
          "stubs are needed)")
    sys.exit(SKIP)

LINEAR16 = pb.AUDIO_ENCODING_LINEAR16
FLOAT32 = pb.AUDIO_ENCODING_FLOAT32
MiB = 1 << 20
CASE_TIMEOUT_S = 120  # a case still running then is abandoned (and fails)
SUITE_TIMEOUT_S = 900  # the whole suite: then every child is killed, exit 1


# ==========================================================================
# SERVER FLAGS: the one place where cases' server flags are set.
# COMMON_FLAGS go to every case's server (after --host 127.0.0.1 --port 0
# --metrics-port <free port>); CASE_FLAGS[case] to that case's, replacing a
# common flag of the same name.
# ==========================================================================

def flag(name, value):
    return (name, value)


# The memory the server may hold for calls: gRPC's transport and the budget
# of audio in flight. A case that fills both may grow the server by their
# sum plus MODEL_WORKING_MB: the model's working memory at the largest batch
# and allocator slack, allocated once by the first full batches (the
# baseline is taken after a warm-up of one window). docs/limits.md states
# the same bound for the default flags.
GRPC_MEMORY_MB = 128
AUDIO_MEMORY_MB = 128
MODEL_WORKING_MB = 192
FULL_BOUND_MB = GRPC_MEMORY_MB + AUDIO_MEMORY_MB + MODEL_WORKING_MB

# A case's flag with this value gets a free port.
FREE_PORT = "<free port>"

COMMON_FLAGS = [
    flag("--model", ARGS.model),
    flag("--http-port", "0"),
    flag("--grace-seconds", "3"),
    flag("--metrics-host", "127.0.0.1"),
    flag("--grpc-memory-mb", str(GRPC_MEMORY_MB)),
    flag("--max-audio-memory-mb", str(AUDIO_MEMORY_MB)),
]

STREAM_IDLE_SECONDS = 2.0
CASE_FLAGS = {
    "never_reading_streams": [flag("--stream-idle-seconds", str(STREAM_IDLE_SECONDS))],
    "reflection_streams": [flag("--reflection", "true")],
    "idle_stream": [flag("--stream-idle-seconds", str(STREAM_IDLE_SECONDS))],
    "sigterm_with_streams": [flag("--grace-seconds", "3")],
    "stream_admission": [flag("--max-streams", "16")],
    "http_port_abuse": [flag("--http-port", FREE_PORT), flag("--http-threads", "4")],
}


# ==========================================================================
# Cases: one function each; the docstring's first paragraph is its title.
# ==========================================================================

class Case:
    def __init__(self, number, fn, rss_mb, threads):
        self.number, self.fn, self.rss_mb, self.threads = number, fn, rss_mb, threads
        self.name = fn.__name__
        self.title = " ".join((fn.__doc__ or "").strip().split("\n\n")[0].split())


CASES = []


def case(number, rss_mb, threads=None):
    """Registers a case; `rss_mb` bounds the server's peak RSS over its
    baseline, `threads` (when set) its peak thread count over baseline."""
    def register(fn):
        CASES.append(Case(number, fn, rss_mb, threads))
        return fn
    return register


def raw_format(rate=16000, encoding=LINEAR16, channels=0):
    return pb.AudioFormat(encoding=encoding, sample_rate_hertz=rate, channel_count=channels)


def stream_requests(ctx, first, chunks=(), seconds=float("inf"), counter=None, pause=0.0,
                    keep_open=False, finished=None):
    """A request iterator: `first` (a StreamingConfig, or a list of
    requests), then `chunks` (an iterable of audio bytes) for up to
    `seconds`, `pause` apart; with keep_open it then waits without
    half-closing until `finished` (an Event: the call ended) or the end of
    the case."""
    end = time.monotonic() + seconds
    if isinstance(first, pb.StreamingConfig):
        first = [pb.StreamClassifyRequest(config=first)]
    yield from first
    for chunk in chunks:
        if ctx.stop.is_set() or time.monotonic() >= end or (finished and finished.is_set()):
            break
        yield pb.StreamClassifyRequest(audio=chunk)
        if counter is not None:
            counter[0] += len(chunk)
        if pause:
            ctx.stop.wait(pause)
    while keep_open and not (finished and finished.is_set()) and not ctx.stop.wait(0.1):
        pass


def run_stream(ctx, first, chunks=(), timeout=10, responses=None, **kwargs):
    """Makes a StreamClassify call, reads it to its end and returns its
    Outcome (responses appended to `responses`); its request iterator
    (stream_requests with `kwargs`) stops when the call ends."""
    finished = threading.Event()
    responses = [] if responses is None else responses

    def read():
        for response in ctx.stub.StreamClassify(
                stream_requests(ctx, first, chunks, finished=finished, **kwargs), timeout=timeout):
            responses.append(response)

    try:
        return timed(read)
    finally:
        finished.set()


def forever(item):
    while True:
        yield item


def summarize_codes(outcomes):
    """'INVALID_ARGUMENT x12, OK x1 (max 0.02s)'."""
    counts = {}
    for o in outcomes:
        counts[o.code] = counts.get(o.code, 0) + 1
    text = ", ".join(f"{c} x{n}" for c, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    if outcomes:
        text += f" (max {max(o.seconds for o in outcomes):.2f}s)"
    return text or "no calls"


def for_at_least(ctx, seconds, round_fn):
    """Runs round_fn() over and over until `seconds` pass (at least once),
    so that the prober's calls overlap the abuse; returns the rounds."""
    end = time.monotonic() + seconds
    rounds = 0
    while rounds == 0 or (time.monotonic() < end and not ctx.stop.is_set()):
        round_fn()
        rounds += 1
    return rounds


def acceptable(outcome, codes, within_s, words=()):
    if outcome.code not in codes or outcome.seconds > within_s:
        return False
    return outcome.code == "OK" or not words or any(w in outcome.details.lower() for w in words)


def expect_every(ctx, label, outcomes, codes, within_s, words=()):
    """One check for a list of outcomes of the same input: the first that
    fails (or the first) is the one reported."""
    worst = next((o for o in outcomes if not acceptable(o, codes, within_s, words)), outcomes[0])
    ctx.expect(label, worst, codes, within_s, words)
    ctx.note(f"{label}: {worst!r}" + (f" (x{len(outcomes)})" if len(outcomes) > 1 else ""))


@case(1, rss_mb=64)
def channel_count_overflow(ctx):
    """StreamClassify with channel_count 2^31-1, then 1 MiB audio messages
    for ~10 s: INVALID_ARGUMENT right after the config."""
    config = pb.StreamingConfig(format=raw_format(channels=2147483647))
    chunk = audio.tiled_bytes(audio.linear16(audio.speech_like(1.0)), MiB)
    sent = [0]
    outcomes = []

    def one_round():  # again and again for 2 s when the server answers fast
        outcomes.append(run_stream(ctx, config, forever(chunk), timeout=15, seconds=10,
                                   counter=sent))

    rounds = for_at_least(ctx, 2, one_round)
    ctx.number(f"{rounds} calls {summarize_codes(outcomes)}, {sent[0] / MiB:.0f} MiB sent")
    expect_every(ctx, "rejected after the config", outcomes, ["INVALID_ARGUMENT"], 2.0,
                 ["channel"])


@case(2, rss_mb=256)
def long_silent_flac(ctx):
    """Classify of a 599 s, 192 kHz FLAC of silence: an answer or a clear
    RESOURCE_EXHAUSTED, in bounded memory."""
    flac = audio.flac_silence(599, 192000)
    ctx.number(f"file {len(flac) / 1024:.0f} KiB")
    outcome = timed(ctx.stub.Classify, pb.ClassifyRequest(audio=flac), timeout=30)
    ctx.number(f"call {outcome.code} in {outcome.seconds:.2f}s")
    if ctx.expect("answered or refused", outcome, ["OK", "RESOURCE_EXHAUSTED"], 30):
        if outcome.code == "OK":
            duration = outcome.reply.audio_duration_seconds
            ctx.check("duration is 599 s", abs(duration - 599) < 0.01, f"{duration}")


@case(3, rss_mb=64)
def tiny_hop(ctx):
    """Classify of 100 KB LINEAR16 at 16 kHz with hop_seconds 0.0000625 (one
    sample), 4 callers for 3 s: INVALID_ARGUMENT (hop below the minimum)."""
    request = pb.ClassifyRequest(audio=audio.linear16(audio.speech_like(3.125))[:100000],
                                 format=raw_format(), hop_seconds=0.0000625)
    outcomes = []

    def caller():
        end = time.monotonic() + 3
        while time.monotonic() < end and not ctx.stop.is_set():
            outcomes.append(timed(ctx.stub.Classify, request, timeout=10))

    ctx.join([ctx.spawn(caller) for _ in range(4)], timeout=20)
    ctx.number(f"calls {summarize_codes(outcomes)}")
    bad = [o for o in outcomes if o.code != "INVALID_ARGUMENT" or o.seconds > 1.0
           or "hop" not in o.details]
    ctx.check("every call rejected within 1 s, naming the hop", outcomes and not bad,
              f"{len(bad)} of {len(outcomes)} not, e.g. {bad[0] if bad else ''}")


def slow_header_clients(ctx, port, path, count):
    """`count` connections that send a request's headers a byte every 0.5 s,
    never ending them, until the case ends."""
    def slow(sock):
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode())
        while not ctx.stop.wait(0.5):
            try:
                sock.sendall(b"X")
            except OSError:
                return

    for _ in range(count):
        ctx.spawn(slow, ctx.tcp(port))


@case(4, rss_mb=32)
def metrics_slowloris(ctx):
    """An idle TCP connection and 8 slow ones (headers one byte at a time)
    on the metrics port, plus a 64 KiB request line: GET /metrics still
    answers within 2 s."""
    port = ctx.server.metrics_port
    ctx.tcp(port)  # idle: never sends a byte
    slow_header_clients(ctx, port, "/metrics", 8)
    long_line = ctx.tcp(port)
    try:
        long_line.sendall(b"GET /" + b"a" * 65536 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    except OSError:
        pass
    time.sleep(0.5)
    latencies = []
    for _ in range(3):
        start = time.monotonic()
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/metrics")
            response = connection.getresponse()
            body = response.read()
            connection.close()
            ok = response.status == 200 and b"emoserve_" in body
            result = f"HTTP {response.status}"
        except (OSError, http.client.HTTPException) as error:
            ok, result = False, type(error).__name__
        elapsed = time.monotonic() - start
        latencies.append(elapsed)
        ctx.check("GET /metrics within 2 s", ok and elapsed <= 2.0, f"{result} in {elapsed:.2f}s")
        time.sleep(0.3)
    ctx.number(f"GET /metrics max {max(latencies):.2f}s")


@case(5, rss_mb=192)
def never_reading_streams(ctx):
    """4 StreamClassify calls with interim results and a 0.25 s hop that send
    audio as fast as they can for 5 s and never read: memory bounded, each
    stream ended by the server (idle/backpressure)."""
    config = pb.StreamingConfig(format=raw_format(), hop_seconds=0.25, interim_results=True,
                                voice_activity=pb.VoiceActivityConfig(disabled=True))
    chunk = audio.linear16(audio.speech_like(2.0))  # 64 KB
    sent = [[0] for _ in range(4)]
    start = time.monotonic()
    calls = [ctx.stub.StreamClassify(stream_requests(ctx, config, forever(chunk), seconds=5,
                                                     counter=sent[i], keep_open=True),
                                     timeout=60)
             for i in range(4)]
    # Never iterated. The server should end them within the sending time
    # plus its idle timeout plus a margin: its emoserve_active_streams
    # gauge drops to 0. (The client may never see the status: it waits
    # behind the unread responses unless the server resets the stream.)
    until = start + 5 + STREAM_IDLE_SECONDS + 5
    active = None
    while time.monotonic() < until:
        active = metric(ctx, "emoserve_active_streams")
        if active == 0 and all(c.done() for c in calls):
            break
        time.sleep(0.2)
    seen = [c.code().name for c in calls if c.done()]
    ctx.number(f"sent {sum(s[0] for s in sent) / MiB:.1f} MiB")
    shown = active if active is None else int(active)
    ctx.number(f"active streams {shown} after {time.monotonic() - start:.0f}s; "
               f"client saw the end of {len(seen)}/4 {sorted(set(seen))}")
    ctx.check("the server ended every stream", active == 0,
              f"emoserve_active_streams {active} {until - start:.0f}s after they began")


@case(6, rss_mb=256, threads=64)
def health_watch_flood(ctx):
    """3000 concurrent grpc.health.v1.Health/Watch calls (30 connections x
    100): each answered (SERVING or a clean refusal), memory bounded."""
    outcomes = []
    lock = threading.Lock()

    def watch_many(channel):
        watch = channel.unary_stream("/grpc.health.v1.Health/Watch")
        calls = [watch(b"", timeout=30) for _ in range(100)]
        for call in calls:
            outcome = timed(next, call)
            if outcome.code == "OK":
                outcome.code = "SERVING" if outcome.reply == SERVING else f"reply {outcome.reply!r}"
            with lock:
                outcomes.append(outcome)
            if ctx.stop.is_set():
                return
        ctx.stop.wait(4)  # hold them open while the prober runs

    threads = [ctx.spawn(watch_many, ctx.channel(separate_connection=True)) for _ in range(30)]
    ctx.join(threads, timeout=25)
    ctx.number(f"watches {summarize_codes(outcomes)}")
    good = [o for o in outcomes if o.code in ("SERVING", "RESOURCE_EXHAUSTED", "UNAVAILABLE")]
    ctx.check("every watch answered", len(good) == 3000,
              f"{len(good)} of 3000 answered SERVING or a clean refusal")


@case(7, rss_mb=256, threads=64)
def many_connections(ctx):
    """300 gRPC connections each with an open Health/Watch, and 300 raw TCP
    connections that never send the HTTP/2 preface: memory bounded, new
    connections still served."""
    raw = [ctx.tcp(ctx.port) for _ in range(300)]
    outcomes = []
    lock = threading.Lock()

    def one(channel):
        call = channel.unary_stream("/grpc.health.v1.Health/Watch")(b"", timeout=30)
        outcome = timed(next, call)
        with lock:
            outcomes.append(outcome)
        ctx.stop.wait(5)

    threads = []
    for _ in range(300):
        threads.append(ctx.spawn(one, ctx.channel(separate_connection=True)))
    ctx.join(threads, timeout=25)
    ctx.number(f"watches {summarize_codes(outcomes)}")
    good = [o for o in outcomes if o.code in ("OK", "RESOURCE_EXHAUSTED", "UNAVAILABLE")]
    ctx.check("every connection's call answered", len(good) == 300, f"{len(good)} of 300")
    closed = 0
    for sock in raw:
        sock.setblocking(False)
        try:
            closed += sock.recv(1) == b""
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
    ctx.number(f"preface-less connections closed by server {closed}/300")


@case(8, rss_mb=64)
def broken_http2(ctx):
    """Raw sockets with broken HTTP/2, all at once: a truncated HEADERS
    frame, 64 KiB of random bytes, HTTP/1, DATA on streams never opened,
    a connection window overflow, a frame far over the maximum size,
    HEADERS on an even (server) stream id: the connections that break the
    protocol badly are closed, the rest do no harm."""
    rng = random.Random(8)
    request = h2.grpc_request_headers(h2.CLASSIFY)
    # name: (bytes, whether to send the preface first, whether the server
    # must close the connection (or GOAWAY) within 3 s: only where the
    # bytes cannot be HTTP/2 at all)
    attacks = {
        "truncated_headers": (h2.frame(h2.HEADERS, h2.END_HEADERS, 1, request[:20], length=1000),
                              True, False),
        "random_bytes": (rng.randbytes(65536), False, True),
        "http1_request": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", False, True),
        "data_unopened_stream": (h2.data(1, h2.grpc_message(b"\0" * 100)) + h2.data(2, b"x"),
                                 True, False),
        "window_overflow": (h2.window_update(0, 2 ** 31 - 1) * 2, True, False),
        "oversized_frame": (h2.frame(h2.DATA, 0, 1, b"\0" * 1000, length=(1 << 24) - 1)
                            + b"\0" * 65536, True, True),
        "headers_even_stream": (h2.headers(2, request, end_stream=True), True, False),
    }
    reactions = {}

    def attack(name, payload, preface, must_reject):
        sock = ctx.raw_socket(preface=preface)
        if preface:
            h2.handshake(sock)
        sent, why = h2.send_for(sock, [payload], 3)
        frames, state = h2.read_frames(sock, 3 if must_reject else 1)
        reaction = h2.describe_reaction(frames, state)
        reactions[name] = f"{name}: sent {sent / 1024:.0f} KiB ({why}) -> {reaction}"
        if must_reject:
            rejected = state != "open" or any(f[0] == h2.GOAWAY for f in frames)
            ctx.check(f"{name} rejected", rejected, reaction)

    def all_at_once():
        threads = [ctx.spawn(attack, name, *spec) for name, spec in attacks.items()]
        ctx.join(threads, timeout=10)

    ctx.number(f"{for_at_least(ctx, 3, all_at_once)} rounds")
    for name in attacks:
        ctx.note(reactions.get(name, f"{name}: did not finish"))


@case(9, rss_mb=64)
def huge_metadata(ctx):
    """Classify calls with 1 MB of metadata (one header) and with 2000
    headers of 500 bytes, each on a new connection, for 3 s: a clear error
    (or an answer) within 5 s (for 2000 headers the connection may be
    closed instead: UNAVAILABLE); then 20 1 MB calls at once on one
    connection: at least one clear error, the rest may see the connection
    closed."""
    request = ctx.normal
    inputs = {"one_1MB_header": [("x-junk", "a" * 1_000_000)],
              "2000_headers": [(f"x-h{i}", "b" * 500) for i in range(2000)]}
    clear = ["OK", "RESOURCE_EXHAUSTED", "INVALID_ARGUMENT"]
    outcomes = {name: [] for name in inputs}

    def one_round():
        for name, metadata in inputs.items():
            stub = ctx.pb_grpc.EmotionServiceStub(ctx.channel(separate_connection=True))
            outcomes[name].append(timed(stub.Classify, request, timeout=5, metadata=metadata))

    ctx.number(f"{for_at_least(ctx, 3, one_round)} rounds")
    for name, got in outcomes.items():
        ctx.number(f"{name}: {summarize_codes(got)}")
        # A server may close a connection that floods it with headers while
        # the client is still writing them: the client then sees the reset
        # (UNAVAILABLE) rather than the status. Fair for 2000 headers.
        expect_every(ctx, name, got, clear + (["UNAVAILABLE"] if name == "2000_headers" else []), 5)
    stub = ctx.pb_grpc.EmotionServiceStub(ctx.channel(separate_connection=True))
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        together = list(pool.map(lambda _: timed(stub.Classify, request, timeout=5,
                                                 metadata=inputs["one_1MB_header"]), range(20)))
    ctx.number(f"20 at once: {summarize_codes(together)}")
    ctx.check("20 at once: one clear error at least, all within 5 s",
              any(acceptable(o, clear, 5) for o in together)
              and all(acceptable(o, clear + ["UNAVAILABLE"], 5) for o in together),
              summarize_codes(together))


@case(10, rss_mb=FULL_BOUND_MB)
def big_messages(ctx):
    """40 concurrent Classify calls of 32 MiB - 64 KiB of LINEAR16 at 48 kHz
    (349 s each): each answered or refused (RESOURCE_EXHAUSTED: the memory
    for messages being received, or for audio in flight, is full) within
    30 s, memory bounded."""
    size = 32 * MiB - 64 * 1024
    pcm = audio.tiled_bytes(audio.linear16(audio.speech_like(5.0, rate=48000)), size)
    request = pb.ClassifyRequest(audio=pcm, format=raw_format(48000))
    start = time.monotonic()
    futures = [ctx.stub.Classify.future(request, timeout=30) for _ in range(40)]
    outcomes = []
    for future in futures:
        try:
            future.result(timeout=max(0.1, start + 40 - time.monotonic()))
            code, details = "OK", ""
        except grpc.RpcError as error:
            code, details = error.code().name, error.details() or ""
        except concurrent.futures.TimeoutError:
            code, details = "NO_ANSWER", ""
        outcomes.append(Outcome(code, details, time.monotonic() - start))
    ctx.number(f"calls {summarize_codes(outcomes)}")
    reasons = {}
    for o in outcomes:
        if o.code != "OK":
            reason = o.details.split(" is full")[0]
            reasons[reason] = reasons.get(reason, 0) + 1
    ctx.number("refused by: " + "; ".join(f"{r} x{n}" for r, n in reasons.items()))
    bad = [o for o in outcomes
           if o.code not in ("OK", "RESOURCE_EXHAUSTED")
           or (o.code == "RESOURCE_EXHAUSTED" and "is full" not in o.details)]
    ctx.check("each answered, or refused with a clear RESOURCE_EXHAUSTED, within 30 s", not bad,
              f"{len(bad)} of 40 not: {summarize_codes(bad)}, e.g. {bad[0].details if bad else ''}")


REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"


def reflection_request(symbol=None):
    """ServerReflectionRequest, hand-encoded: list_services (field 7) or
    file_containing_symbol (field 4)."""
    if symbol is None:
        return b"\x3a\x00"
    raw = symbol.encode()
    return b"\x22" + bytes([len(raw)]) + raw


@case(11, rss_mb=256, threads=64)
def reflection_streams(ctx):
    """500 concurrent ServerReflectionInfo streams held open (5 connections
    x 100), and 20 that send requests without reading the replies: bounded,
    normal calls fine (or reflection is off: UNIMPLEMENTED)."""
    first = ctx.channel().stream_stream(REFLECTION)
    probe = timed(lambda: next(first(iter([reflection_request()]), timeout=5)))
    if probe.code == "UNIMPLEMENTED":
        ctx.note("reflection is off (UNIMPLEMENTED): nothing to hold open")
        return
    ctx.expect("reflection answers list_services", probe, ["OK"], 5)
    symbol = reflection_request("emoserve.v1.EmotionService")
    outcomes = []
    lock = threading.Lock()

    def hold(channel, count):
        info = channel.stream_stream(REFLECTION)

        def requests():
            yield symbol
            while not ctx.stop.wait(0.1):
                pass

        calls = [info(requests(), timeout=30) for _ in range(count)]
        for call in calls:
            outcome = timed(next, call)
            with lock:
                outcomes.append(outcome)
            if ctx.stop.is_set():
                return
        # (grpc cancels a call whose object is garbage-collected: `calls`
        # must live until the end of the case)
        ctx.stop.wait(30)

    def flood(channel):
        info = channel.stream_stream(REFLECTION)
        call = info(forever_until(ctx, symbol), timeout=30)  # never read
        ctx.stop.wait(30)
        call.cancel()

    for _ in range(5):
        ctx.spawn(hold, ctx.channel(separate_connection=True), 100)
    flood_channel = ctx.channel(separate_connection=True)
    for _ in range(20):
        ctx.spawn(flood, flood_channel)
    until = time.monotonic() + 20
    while len(outcomes) < 500 and time.monotonic() < until:
        time.sleep(0.05)
    time.sleep(2)  # all held open while the prober runs
    ctx.number(f"streams {summarize_codes(outcomes)}")
    good = [o for o in outcomes if o.code in ("OK", "RESOURCE_EXHAUSTED", "UNAVAILABLE")]
    ctx.check("every stream answered or refused", len(good) == 500, f"{len(good)} of 500")


def forever_until(ctx, item):
    while not ctx.stop.is_set():
        yield item


@case(12, rss_mb=128)
def bad_audio(ctx):
    """Containers the server does not take (AU, CAF, AIFF), garbage, lying
    WAV headers, FLAC claiming 2^36 samples, NaN/inf/1e30 samples:
    INVALID_ARGUMENT with a clear message (a well-formed AU/CAF/AIFF may
    instead be decoded); repeated for 3 s."""
    pcm = audio.linear16(audio.speech_like(2.0))
    nan = np.full(16000, np.nan, dtype=np.float32)
    huge = np.full(16000, 1e30, dtype=np.float32)
    inf = np.full(16000, np.inf, dtype=np.float32)
    flac = audio.flac(np.frombuffer(pcm, "<i2"), 16000)
    lying_flac = bytearray(flac)
    # STREAMINFO's 36-bit total samples: all ones.
    lying_flac[8 + 13] |= 0x0F
    lying_flac[8 + 14:8 + 18] = b"\xff\xff\xff\xff"
    file_inputs = {
        "au": (audio.au(pcm, 16000), True),
        "caf": (audio.caf(pcm, 16000), True),
        "aiff": (audio.aiff(pcm, 16000), True),
        "random_garbage": (random.Random(12).randbytes(65536), False),
        "wav_huge_data_size": (audio.wav(pcm, 16000, data_size=0xFFFFFFF0, riff_size=0xFFFFFFF8),
                               True),
        "wav_65535_channels": (audio.wav(pcm, 16000, channels=65535), False),
        "wav_4ghz_rate": (audio.wav(pcm, 4_000_000_000), False),
        "wav_zero_channels": (audio.wav(pcm, 16000, channels=0), False),
        "wav_header_only": (audio.wav(b"", 16000)[:44], False),
        "wav_float_nan": (audio.wav(audio.float32le(nan), 16000, bits=32, float_format=True),
                          False),
        "wav_float_1e30": (audio.wav(audio.float32le(huge), 16000, bits=32, float_format=True),
                           False),
        "flac_header_only": (flac[:42], False),
        "flac_2^36_samples": (bytes(lying_flac), True),
        "ogg_garbage": (b"OggS" + random.Random(1).randbytes(10000), False),
        "id3_huge_tag": (b"ID3\x04\x00\x00\x7f\x7f\x7f\x7f" + b"\0" * 1000, False),
        "mp3_sync_garbage": (b"\xff\xfb\x90\x64" * 10000, False),
    }
    raw_inputs = {
        "raw_float_nan": (audio.float32le(nan), FLOAT32),
        "raw_float_inf": (audio.float32le(inf), FLOAT32),
        "raw_float_1e30": (audio.float32le(huge), FLOAT32),
        "raw_odd_bytes": (b"\x01\x02\x03", LINEAR16),
    }
    requests = {name: (pb.ClassifyRequest(audio=data), may_decode)
                for name, (data, may_decode) in file_inputs.items()}
    requests.update({name: (pb.ClassifyRequest(audio=data, format=raw_format(encoding=encoding)),
                            name == "raw_odd_bytes")
                     for name, (data, encoding) in raw_inputs.items()})
    words = ["audio", "format", "sample", "wav", "flac", "container", "channel", "rate",
             "decode", "header", "finite", "nan"]
    outcomes = {name: [] for name in requests}

    def one_round():
        for name, (request, _) in requests.items():
            outcomes[name].append(timed(ctx.stub.Classify, request, timeout=5))

    ctx.number(f"{for_at_least(ctx, 3, one_round)} rounds of {len(requests)} inputs")
    for name, (request, may_decode) in requests.items():
        codes = ["INVALID_ARGUMENT", "OK"] if may_decode else ["INVALID_ARGUMENT"]
        if name == "flac_2^36_samples":
            codes.append("RESOURCE_EXHAUSTED")  # the header says it is too long: fair
        expect_every(ctx, name, outcomes[name], codes, 2, words)


@case(13, rss_mb=64)
def idle_stream(ctx):
    """20 streams that send a config and then nothing: the server ends each
    after its idle timeout (--stream-idle-seconds)."""
    config = pb.StreamingConfig(format=raw_format())
    outcomes = []
    lock = threading.Lock()

    def idle():
        outcome = run_stream(ctx, config, timeout=30, keep_open=True)
        with lock:
            outcomes.append(outcome)

    threads = [ctx.spawn(idle) for _ in range(20)]
    ctx.join(threads, timeout=STREAM_IDLE_SECONDS + 5)
    ctx.number(f"streams {summarize_codes(outcomes)}; {20 - len(outcomes)} still open")
    ended = [o for o in outcomes if o.seconds <= STREAM_IDLE_SECONDS + 3]
    ctx.check("every idle stream ended by the server in time", len(ended) == 20,
              f"{len(ended)} of 20 within {STREAM_IDLE_SECONDS + 3:g}s")


@case(14, rss_mb=128)
def sigterm_with_streams(ctx):
    """SIGTERM while 3 streams send audio at 10x real time and read, and 2
    (raw HTTP/2 with a zero window) never read: the reading streams end OK
    after their final results within --grace-seconds; the process exits 0
    within grace + 3 s."""
    grace = 3.0
    ctx.expects_exit = True
    config = pb.StreamingConfig(format=raw_format(), interim_results=True)
    chunk = audio.linear16(audio.speech_like(0.1))
    results = {}

    def reader(i):
        responses = []
        outcome = run_stream(ctx, config, forever(chunk), timeout=30, responses=responses,
                             pause=0.01)
        results[i] = (outcome, responses, time.monotonic())

    # The non-readers, on raw HTTP/2 connections whose SETTINGS give the
    # server a zero stream window: not one response can be written to them.
    # Each sends its config and ~1.8 s of audio (within the server's
    # initial window), then nothing, and never closes.
    unread = b"".join(h2.grpc_message(r.SerializeToString()) for r in stream_requests(
        ctx, pb.StreamingConfig(format=raw_format(), hop_seconds=0.25, interim_results=True),
        [chunk] * 18))
    for _ in range(2):
        sock = ctx.raw_socket(settings_pairs=[(h2.SETTINGS_INITIAL_WINDOW_SIZE, 0)])
        h2.handshake(sock)
        sock.sendall(h2.headers(1, h2.grpc_request_headers(h2.STREAM_CLASSIFY))
                     + h2.data_frames(1, unread))
    threads = [ctx.spawn(reader, i) for i in range(3)]
    time.sleep(3)
    ctx.stop_probing()
    sigterm = time.monotonic()
    ctx.server.process.send_signal(signal.SIGTERM)
    ctx.join(threads, timeout=grace + 5)
    try:
        code = ctx.server.process.wait(timeout=max(0.1, sigterm + grace + 3 - time.monotonic()))
        exit_s = time.monotonic() - sigterm
    except Exception:  # noqa: BLE001 (subprocess.TimeoutExpired)
        code, exit_s = "still running", time.monotonic() - sigterm
    ctx.number(f"exit {code} after {exit_s:.2f}s")
    ctx.check("exits 0 within grace + 3 s", code == 0 and exit_s <= grace + 3,
              f"exit {code} after {exit_s:.2f}s")
    for i in range(3):
        if i not in results:
            ctx.check(f"reading stream {i} ended", False, "no end")
            continue
        outcome, responses, ended = results[i]
        finals = [r for r in responses if r.WhichOneof("result") == "utterance"]
        after = ended - sigterm
        ctx.number(f"stream {i}: {outcome.code} {after:.2f}s after SIGTERM, "
                   f"{len(finals)} utterances")
        ctx.check(f"stream {i} ends OK with its final result within grace",
                  outcome.code == "OK" and finals and 0 <= after <= grace,
                  f"{outcome!r}, {len(finals)} utterance results, {after:.2f}s after SIGTERM")


@case(15, rss_mb=64)
def bad_stream_configs(ctx):
    """Streams with bad first messages (audio first, config twice, bad rate,
    NaN/inf/negative hop, NaN VAD threshold, unknown encoding, FILE
    encoding, a chunk over --max-chunk-bytes): INVALID_ARGUMENT (or
    RESOURCE_EXHAUSTED for the chunk) within 2 s."""
    good = raw_format()
    cfg = pb.StreamingConfig
    bad = {
        "audio_first": [pb.StreamClassifyRequest(audio=b"\0\0")],
        "config_twice": [pb.StreamClassifyRequest(config=cfg(format=good))] * 2,
        "rate_zero": [pb.StreamClassifyRequest(config=cfg(format=raw_format(0)))],
        "rate_2^31-1": [pb.StreamClassifyRequest(config=cfg(format=raw_format(2 ** 31 - 1)))],
        "channels_negative": [pb.StreamClassifyRequest(config=cfg(format=raw_format(channels=-1)))],
        "hop_nan": [pb.StreamClassifyRequest(config=cfg(format=good, hop_seconds=float("nan")))],
        "hop_inf": [pb.StreamClassifyRequest(config=cfg(format=good, hop_seconds=float("inf")))],
        "hop_negative": [pb.StreamClassifyRequest(config=cfg(format=good, hop_seconds=-1))],
        "hop_1e300": [pb.StreamClassifyRequest(config=cfg(format=good, hop_seconds=1e300))],
        "vad_nan": [pb.StreamClassifyRequest(config=cfg(
            format=good, voice_activity=pb.VoiceActivityConfig(threshold_dbfs=float("nan"))))],
        "encoding_99": [pb.StreamClassifyRequest(config=cfg(
            format=pb.AudioFormat(encoding=99, sample_rate_hertz=16000)))],
        "file_encoding": [pb.StreamClassifyRequest(config=cfg())],
        "chunk_over_limit": [pb.StreamClassifyRequest(config=cfg(format=good)),
                             pb.StreamClassifyRequest(audio=b"\0" * (MiB + 2))],
    }
    outcomes = {name: [] for name in bad}

    def one_round():
        for name, messages in bad.items():
            # Kept open after the messages: the server must end the stream.
            outcomes[name].append(run_stream(ctx, messages, timeout=10, keep_open=True))

    ctx.number(f"{for_at_least(ctx, 3, one_round)} rounds of {len(bad)} streams")
    for name in bad:
        codes = ["RESOURCE_EXHAUSTED"] if name == "chunk_over_limit" else ["INVALID_ARGUMENT"]
        expect_every(ctx, name, outcomes[name], codes, 2)


@case(16, rss_mb=64)
def tiny_chunks(ctx):
    """3 streams sending 1-byte audio messages as fast as they can for 4 s,
    reading responses, then half-closing: each ends OK within 5 s."""
    config = pb.StreamingConfig(format=raw_format(), interim_results=True)
    outcomes, sent = [], [[0] for _ in range(3)]

    def one(i):
        outcomes.append(run_stream(ctx, config, forever(b"\x01"), timeout=9, seconds=4,
                                   counter=sent[i]))

    ctx.join([ctx.spawn(one, i) for i in range(3)], timeout=15)
    ctx.number(f"{sum(s[0] for s in sent)} one-byte messages; {summarize_codes(outcomes)}")
    ctx.check("every stream ends OK", len(outcomes) == 3 and all(o.code == "OK" for o in outcomes),
              summarize_codes(outcomes))


@case(17, rss_mb=64, threads=64)
def stream_admission(ctx):
    """40 streams held open against --max-streams 16: 16 admitted, the rest
    RESOURCE_EXHAUSTED within 2 s."""
    config = pb.StreamingConfig(format=raw_format())
    outcomes = []
    lock = threading.Lock()

    def hold():
        outcome = run_stream(ctx, config, timeout=6, keep_open=True)
        with lock:
            outcomes.append(outcome)

    threads = [ctx.spawn(hold) for _ in range(40)]
    ctx.join(threads, timeout=10)
    refused = [o for o in outcomes if o.code == "RESOURCE_EXHAUSTED" and o.seconds <= 2]
    ctx.number(f"streams {summarize_codes(outcomes)}")
    ctx.check("24 refused within 2 s", len(refused) == 24, f"{len(refused)} refused")


@case(18, rss_mb=FULL_BOUND_MB)
def cancel_storm(ctx):
    """8 callers for 4 s: Classify of 60 s of speech with a 100 ms deadline:
    DEADLINE_EXCEEDED (or RESOURCE_EXHAUSTED) promptly, or OK when the
    engine was that fast, abandoned work dropped (queue empty within 3 s)."""
    request = pb.ClassifyRequest(audio=audio.linear16(audio.speech_like(60.0)), format=raw_format())
    outcomes = []

    def caller():
        end = time.monotonic() + 4
        while time.monotonic() < end and not ctx.stop.is_set():
            outcomes.append(timed(ctx.stub.Classify, request, timeout=0.1))

    ctx.join([ctx.spawn(caller) for _ in range(8)], timeout=15)
    ctx.number(f"calls {summarize_codes(outcomes)}")
    bad = [o for o in outcomes if o.code not in ("DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "OK")
           or o.seconds > 0.6]
    ctx.check("every call ends by its deadline", outcomes and not bad,
              f"{len(bad)} not: {summarize_codes(bad)}")
    depth, start = None, time.monotonic()
    while time.monotonic() - start < 3:
        depth = metric(ctx, "emoserve_queue_depth")
        if depth == 0:
            break
        time.sleep(0.1)
    ctx.number(f"queue depth {depth} {time.monotonic() - start:.1f}s after")
    ctx.check("abandoned work dropped", depth == 0, f"emoserve_queue_depth {depth}")


def metric(ctx, name):
    """A metric's value from /metrics (None when unreadable)."""
    try:
        connection = http.client.HTTPConnection("127.0.0.1", ctx.server.metrics_port, timeout=2)
        connection.request("GET", "/metrics")
        body = connection.getresponse().read().decode()
        connection.close()
    except (OSError, http.client.HTTPException):
        return None
    for line in body.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


@case(19, rss_mb=128)
def oversized_messages(ctx):
    """A 33 MiB Classify (over --max-message-bytes) and a gzip bomb (256 MiB
    of zeros compressed to ~256 KiB): RESOURCE_EXHAUSTED (or UNIMPLEMENTED
    for a refused compression) within 5 s, without inflating it."""
    big = pb.ClassifyRequest(audio=b"\0" * (33 * MiB), format=raw_format())
    outcome = timed(ctx.stub.Classify, big, timeout=5)
    ctx.number(f"33 MiB: {outcome.code} in {outcome.seconds:.2f}s")
    ctx.expect("33 MiB message", outcome, ["RESOURCE_EXHAUSTED"], 5)
    bomb = pb.ClassifyRequest(audio=bytes(256 * MiB), format=raw_format())
    outcome = timed(ctx.stub.Classify, bomb, timeout=10, compression=grpc.Compression.Gzip)
    ctx.number(f"gzip bomb: {outcome.code} in {outcome.seconds:.2f}s")
    ctx.expect("gzip bomb", outcome, ["RESOURCE_EXHAUSTED", "UNIMPLEMENTED"], 10)


@case(20, rss_mb=256, threads=64)
def grpc_slowloris(ctx):
    """20 raw HTTP/2 connections x 50 Classify streams, each declaring a
    32 MiB message and sending one byte every 0.5 s for 4 s: no memory reserved
    for declared sizes, normal calls fine."""
    sockets = []
    for _ in range(20):
        sock = ctx.raw_socket()
        h2.handshake(sock)
        burst = b""
        for i in range(50):
            stream = 2 * i + 1
            burst += h2.headers(stream, h2.grpc_request_headers(h2.CLASSIFY))
            burst += h2.data(stream, h2.grpc_message(b"\x0a", declared_length=32 * MiB - 16))
        sock.sendall(burst)
        sockets.append(sock)
    end = time.monotonic() + 4
    sent, closed = 0, set()
    while time.monotonic() < end:
        for n, sock in enumerate(sockets):
            if n in closed:
                continue
            try:
                sock.sendall(b"".join(h2.data(2 * i + 1, b"\0") for i in range(50)))
                sent += 50
            except OSError:
                closed.add(n)
        time.sleep(0.5)
    reactions = {}
    for sock in sockets:
        frames, state = h2.read_frames(sock, 0.05)
        reaction = h2.describe_reaction(frames, state)
        reactions[reaction] = reactions.get(reaction, 0) + 1
    ctx.number(f"{sent} trickled bytes, {len(closed)}/20 connections closed by server")
    for reaction, count in reactions.items():
        ctx.note(f"{count} connections: {reaction[:150]}")


@case(21, rss_mb=128, threads=64)
def http2_floods(ctx):
    """HTTP/2 floods on raw sockets, one after another for 2 s each, never
    reading what the server sends: SETTINGS, PING, rapid reset
    (HEADERS + RST_STREAM), CONTINUATION without end, HPACK bombs (a 4 KB
    header referenced 12000 times), unknown frame types. Memory bounded
    (each flood's RSS growth is noted), normal calls fine."""
    request = h2.grpc_request_headers(h2.CLASSIFY)

    def settings_flood():
        return forever(h2.settings([(1, 4096), (2, 0), (3, 100), (4, 65535), (5, 16384)] * 4))

    def ping_flood():
        return forever(h2.ping() * 256)

    def rapid_reset():
        stream = 1
        while stream < 2 ** 31 - 200:
            burst = []
            for _ in range(64):
                burst.append(h2.headers(stream, request) + h2.rst_stream(stream))
                stream += 2
            yield b"".join(burst)

    def continuation_flood():
        yield h2.headers(1, request, end_headers=False)
        yield from forever(h2.continuation(1, h2.literal("x-flood", "a" * 16000)))

    def hpack_bomb():
        stream = 1
        while stream < 2 ** 31 - 2:
            # A 4 KB header into the dynamic table, then referenced 12000
            # times: 48 MB of header list from a 16 KB frame.
            block = request + h2.literal_indexed("x-bomb", "b" * 4000) + h2.indexed(62) * 12000
            yield h2.headers(stream, block, end_stream=True)
            stream += 2

    def unknown_frames():
        return forever(h2.frame(0xFA, 0, 0, b"\0" * 16000))

    floods = {"settings": settings_flood, "ping": ping_flood, "rapid_reset": rapid_reset,
              "continuation": continuation_flood, "hpack_bomb": hpack_bomb,
              "unknown_frames": unknown_frames}
    for name, flood in floods.items():
        before = read_status(ctx.server.pid)
        sock = ctx.raw_socket()
        h2.handshake(sock)
        sent, why = h2.send_for(sock, flood(), 2)
        frames, state = h2.read_frames(sock, 0.5)
        after = read_status(ctx.server.pid)
        grew = f"rss +{after['rss'] - before['rss']:.0f} MB" if before and after else "server gone"
        ctx.note(f"{name}: sent {sent / MiB:.1f} MiB ({why}), {grew} -> "
                 f"{h2.describe_reaction(frames, state)[:120]}")
        sock.close()


# ==========================================================================
# The runner
# ==========================================================================

class Result:
    def __init__(self, case):
        self.case = case
        self.verdict = "FAIL"
        self.line = ""
        self.details = []


@case(22, rss_mb=128, threads=320)
def http_port_abuse(ctx):
    """The HTTP port with --http-threads 4 (64 connections): 150 idle
    connections, 8 sending their head a byte at a time, 4 heads of
    100 KiB, 4 bodies declaring 1 GiB, 4 WebSocket frames declaring 1 GiB
    then sending 1 MiB: /readyz and an HTTP classify still answer within
    2 s, each abuse gets its refusal, memory bounded."""
    port = http_port(ctx)
    for _ in range(150):
        try:
            ctx.tcp(port)  # idle: at the limit the longest waiting make room
        except OSError:
            pass

    slow_header_clients(ctx, port, "/readyz", 8)

    def first_line(sock):
        try:
            sock.settimeout(10)
            return sock.recv(4096).split(b"\r\n")[0].decode(errors="replace")
        except OSError as error:
            return type(error).__name__

    def big_head():
        sock = ctx.tcp(port)
        try:
            sock.sendall(b"GET /readyz HTTP/1.1\r\nX: " + b"a" * (100 << 10) + b"\r\n\r\n")
        except OSError:
            pass
        return first_line(sock)

    def big_body():
        sock = ctx.tcp(port)
        sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: "
                     + str(1 << 30).encode() + b"\r\n\r\n" + b"\0" * 65536)
        return first_line(sock)

    def big_frame():
        sock = ctx.tcp(port)
        sock.sendall(b"GET /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     b"Sec-WebSocket-Version: 13\r\n\r\n")
        upgraded = first_line(sock)
        try:
            sock.sendall(bytes([0x82, 0xFF]) + (1 << 30).to_bytes(8, "big") + b"mask")
            for _ in range(16):
                sock.sendall(b"\0" * 65536)
            sock.settimeout(10)
            while sock.recv(65536):  # the rest of the 101 answer may come late
                pass
            return upgraded, True
        except socket.timeout:
            return upgraded, False  # still open
        except OSError:
            return upgraded, True

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        heads = [pool.submit(big_head) for _ in range(4)]
        bodies = [pool.submit(big_body) for _ in range(4)]
        frames = [pool.submit(big_frame) for _ in range(4)]
        heads = [f.result() for f in heads]
        bodies = [f.result() for f in bodies]
        frames = [f.result() for f in frames]
    ctx.check("100 KiB heads get 431", all(" 431 " in h for h in heads), "; ".join(heads))
    ctx.check("1 GiB bodies get 413 unread", all(" 413 " in b for b in bodies), "; ".join(bodies))
    ctx.check("1 GiB WebSocket frames: upgraded, then closed",
              all(" 101 " in up and closed for up, closed in frames), str(frames))
    latencies = []
    for path, body in [("/readyz", None), ("/v1/classify", ctx.normal)] * 2:
        start = time.monotonic()
        query = ""
        if body is not None and body.HasField("format"):
            query = f"?encoding=linear16&sample_rate_hertz={body.format.sample_rate_hertz}"
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("POST" if body is not None else "GET", path + query,
                               body=body.audio if body is not None else None)
            response = connection.getresponse()
            response.read()
            connection.close()
            ok, result = response.status == 200, f"HTTP {response.status}"
        except (OSError, http.client.HTTPException) as error:
            ok, result = False, type(error).__name__
        elapsed = time.monotonic() - start
        latencies.append(elapsed)
        ctx.check(f"{path} within 2 s", ok and elapsed <= 2.0, f"{result} in {elapsed:.2f}s")
    ctx.number(f"HTTP max {max(latencies):.2f}s")


def server_args(case):
    """The server flags of a case (a case's flag replaces a common one)."""
    by_name = dict(COMMON_FLAGS + CASE_FLAGS.get(case.name, []))
    return [item for name, value in by_name.items()
            for item in (name, str(harness.free_port()) if value == FREE_PORT else value)]


def http_port(ctx):
    args = ctx.server.args
    return int(args[args.index("--http-port") + 1])


def normal_clip(scratch):
    """(path, rate, ClassifyRequest): a RAVDESS clip when --shared has one,
    else 3 s of generated speech as LINEAR16."""
    if ARGS.shared:
        clip = pathlib.Path(ARGS.shared) / "datasets/ravdess/Actor_21/03-01-05-02-01-01-21.flac"
        if clip.is_file():
            return clip, 0, pb.ClassifyRequest(audio=clip.read_bytes())
    path = pathlib.Path(scratch) / "normal.s16le"
    path.write_bytes(audio.linear16(audio.speech_like(3.0)))
    return path, 16000, pb.ClassifyRequest(audio=path.read_bytes(), format=raw_format())


def run_case(case, scratch, clip):
    result = Result(case)
    log_path = pathlib.Path(scratch) / f"{case.number:02d}_{case.name}.log"
    try:
        server = Server(ARGS.server, server_args(case), log_path)
    except RuntimeError as error:
        result.line = "server did not start"
        result.details = str(error).splitlines()[-5:]
        return result
    bound = ARGS.rss_bound_mb if ARGS.rss_bound_mb is not None else case.rss_mb
    prober = Prober(server.port, ARGS.stubs, clip[0], clip[1])
    ctx = Context(server, pb, pb_grpc, clip[2], scratch)
    ctx._stop_probes = prober.stop
    try:
        if not prober.wait_ready():
            result.line = "the normal call failed before any abuse"
            result.details = [str(r) for r in prober.records[-3:]] + server.log().splitlines()[-5:]
            return result
        time.sleep(0.2)
        base = read_status(server.pid)
        baseline, baseline_threads = base["rss"], base["threads"]
        sampler = MemorySampler(server, ARGS.rss_kill_mb)
        sampler.start()
        t0 = time.monotonic()

        def run():
            try:
                case.fn(ctx)
            except Exception:  # noqa: BLE001 (a broken case is a failed case)
                ctx.check("the case ran", False, traceback.format_exc().strip().splitlines()[-1])
                result.details.append(traceback.format_exc())

        # In a thread, so that a case that hangs is abandoned (its channels
        # and sockets are closed below, which ends its calls).
        runner = threading.Thread(target=run, daemon=True)
        runner.start()
        runner.join(timeout=CASE_TIMEOUT_S)
        if runner.is_alive():
            ctx.check("the case finished", False, f"still running after {CASE_TIMEOUT_S}s")
        t1 = time.monotonic()
        alive_after = ctx.expects_exit or server.alive()
        sampler.stop()
        elapsed = t1 - t0
        probes = prober.since(t0, min(t1, ctx.probing_stopped_at or t1))

        def probed_both(records):
            kinds = {p["kind"] for p in records}
            return "classify" in kinds and bool(kinds & {"health", "fresh_health"})

        if not probed_both(probes) and ctx.probing_stopped_at is None:
            # A case over before the prober's round was through (a Classify
            # and a health check): take the rounds that follow it at once
            # (the server has had the abuse).
            until = time.monotonic() + 2
            while not probed_both(prober.since(t0)) and time.monotonic() < until:
                time.sleep(0.02)
            probes = prober.since(t0, t1 + 2)
            ctx.note("the case ended before the prober's round was through: "
                     "counted the rounds just after it")
        prober.stop()
        final = None if ctx.expects_exit else server.health()

        # Memory.
        peak = sampler.peak()
        over = peak - baseline
        if sampler.killed_at_mb is not None:
            ctx.check("memory", False, f"killed at {sampler.killed_at_mb:.0f} MB RSS "
                                       f"(--rss-kill-mb {ARGS.rss_kill_mb:g})")
        ctx.check("peak RSS over baseline", over <= bound,
                  f"+{over:.1f} MB (bound {bound:g} MB)")
        if case.threads is not None:
            extra = sampler.peak_threads - baseline_threads
            ctx.check("peak threads over baseline", extra <= case.threads,
                      f"+{extra} threads (bound {case.threads})")
        # The prober.
        classify = [p for p in probes if p["kind"] == "classify"]
        health = [p for p in probes if p["kind"] in ("health", "fresh_health")]
        bad_classify = [p for p in classify if not p["ok"]]
        bad_health = [p for p in health if not p["ok"]]
        ctx.check("normal Classify (1 s deadline) during the abuse", classify and not bad_classify,
                  f"{len(bad_classify)}/{len(classify)} failed"
                  + (f", e.g. {bad_classify[0]['code']} in {bad_classify[0]['ms']:.0f} ms: "
                     f"{bad_classify[0]['detail'][:80]}" if bad_classify else ""))
        ctx.check("health SERVING during the abuse", health and not bad_health,
                  f"{len(bad_health)}/{len(health)} failed"
                  + (f", e.g. {bad_health[0]['kind']} {bad_health[0]['code']}" if bad_health else ""))
        if not ctx.expects_exit:
            ctx.check("alive after the abuse", alive_after,
                      f"exited {server.process.returncode}")
            ctx.check("SERVING after the abuse", final == "SERVING", f"{final}")

        failed = [c for c in ctx.checks if not c[1]]
        result.verdict = "PASS" if not failed else "FAIL"
        latencies = sorted(p["ms"] for p in classify)
        p50 = latencies[len(latencies) // 2] if latencies else 0
        max_ms = latencies[-1] if latencies else 0
        parts = [f"rss +{over:.0f}MB/{bound:g} (base {baseline:.0f}MB, threads "
                 f"{baseline_threads}->{sampler.peak_threads})",
                 *ctx.numbers,
                 f"normal {len(classify) - len(bad_classify)}/{len(classify)} ok "
                 f"p50 {p50:.0f}ms max {max_ms:.0f}ms",
                 f"health {len(health) - len(bad_health)}/{len(health)}",
                 f"{elapsed:.1f}s"]
        if not ctx.expects_exit:
            parts.append("alive" if alive_after and final == "SERVING" else f"DOWN ({final})")
        result.line = " | ".join(parts)
        result.details += [f"FAILED {label}: {detail}" for label, ok, detail in failed]
        result.details += [f"note: {n}" for n in ctx.notes]
    finally:
        prober.stop()
        ctx.stop.set()
        if ctx.expects_exit:
            server.kill()
        else:
            code = server.terminate(wait_s=3 + 5)
            if code != 0:
                result.details.append(f"note: exit status after SIGTERM at the end: {code}")
        crash = [line for line in server.log().splitlines()
                 if "level=error" in line or "terminate called" in line or "Sanitizer" in line]
        result.details += [f"server log: {line[:200]}" for line in crash[:3]]
    return result


def suite_timed_out():
    print(f"\nthe suite ran past {SUITE_TIMEOUT_S}s: killing everything", flush=True)
    harness.kill_children()
    os._exit(1)


def main():
    if ARGS.list:
        for c in sorted(CASES, key=lambda c: c.number):
            print(f"{c.number:2d} {c.name:24s} rss<={c.rss_mb}MB  {c.title}")
        return 0
    for path, what in ((ARGS.server, "server binary"), (ARGS.stubs, "stubs"),
                       (ARGS.model, "model directory")):
        if not path or not os.path.exists(path):
            print(f"SKIP: no {what} at {path}")
            return SKIP
    if not os.access(ARGS.server, os.X_OK):
        print(f"SKIP: {ARGS.server} is not executable")
        return SKIP
    selected = sorted(CASES, key=lambda c: c.number)
    if ARGS.only:
        wanted = {w.strip() for w in ARGS.only.split(",") if w.strip()}
        selected = [c for c in selected if c.name in wanted or str(c.number) in wanted]
        unknown = wanted - {c.name for c in selected} - {str(c.number) for c in selected}
        if unknown:
            print(f"unknown cases: {', '.join(sorted(unknown))} (see --list)")
            return 2
    watchdog = threading.Timer(SUITE_TIMEOUT_S, suite_timed_out)
    watchdog.daemon = True
    watchdog.start()
    scratch = ARGS.logs or tempfile.mkdtemp(prefix="emoserve_abuse_")
    os.makedirs(scratch, exist_ok=True)
    clip = normal_clip(scratch)
    print(f"emoserve abuse suite: {len(selected)} cases against {ARGS.server}; "
          f"normal call: {clip[0]}", flush=True)
    results = []
    start = time.monotonic()
    for c in selected:
        result = run_case(c, scratch, clip)
        results.append(result)
        print(f"{result.verdict:7s} {c.number:2d} {c.name:22s} {result.line}", flush=True)
        if result.verdict != "PASS":
            for detail in result.details:
                print(f"{'':11s}{detail}", flush=True)
    failed = [r for r in results if r.verdict == "FAIL"]
    print(f"\n{len(results) - len(failed)} passed, {len(failed)} failed in "
          f"{time.monotonic() - start:.0f}s; server logs in {scratch}")
    if not failed and not ARGS.logs:
        shutil.rmtree(scratch, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        code = main()
    except KeyboardInterrupt:
        code = 1
    finally:
        harness.kill_children()
    sys.stdout.flush()
    os._exit(code)  # skips grpc's teardown of whatever abusive calls are left
