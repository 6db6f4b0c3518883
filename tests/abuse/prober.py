#!/usr/bin/python3
"""The well-behaved client of the abuse suite, in its own process (so that
the abusers' Python threads and GIL do not slow it down):

  prober.py --port N --stubs DIR --clip FILE [--rate HZ] [--interval S] [--deadline S]

Until its stdin closes, it makes rounds of: a Classify of the clip on a
long-lived channel, grpc.health.v1.Health/Check (service "") on that
channel, and every fourth round a Health/Check on a new connection (the
server must still accept). Every call has a `--deadline` (1 s). One JSON
line per call on stdout: {"t", "kind", "ok", "ms", "code", "detail"}.
`--rate 0` (default) sends the clip as a file; otherwise as LINEAR16 at
that rate.
"""
import argparse
import json
import os
import sys
import threading
import time

SERVING = b"\x08\x01"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--stubs", required=True)
    parser.add_argument("--clip", required=True)
    parser.add_argument("--rate", type=int, default=0)
    parser.add_argument("--interval", type=float, default=0.25)
    parser.add_argument("--deadline", type=float, default=1.0)
    args = parser.parse_args()

    import grpc
    sys.path.insert(0, args.stubs)
    from emoserve.v1 import emoserve_pb2 as pb
    from emoserve.v1 import emoserve_pb2_grpc as pb_grpc

    with open(args.clip, "rb") as f:
        audio = f.read()
    request = pb.ClassifyRequest(audio=audio)
    if args.rate:
        request.format.encoding = pb.AUDIO_ENCODING_LINEAR16
        request.format.sample_rate_hertz = args.rate

    target = f"127.0.0.1:{args.port}"
    channel = grpc.insecure_channel(target)
    stub = pb_grpc.EmotionServiceStub(channel)
    check = channel.unary_unary("/grpc.health.v1.Health/Check")

    stop = threading.Event()

    def watch_stdin():
        try:
            while sys.stdin.buffer.read(1):
                pass
        finally:
            stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()

    def emit(kind, start, ok, code="OK", detail=""):
        line = {"t": start, "kind": kind, "ok": ok, "ms": round((time.monotonic() - start) * 1000, 1),
                "code": code, "detail": detail[:200]}
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()

    def call(kind, fn, verify):
        start = time.monotonic()
        try:
            reply = fn()
        except grpc.RpcError as error:
            emit(kind, start, False, error.code().name, error.details() or "")
            return
        except Exception as error:  # noqa: BLE001 (anything else is a failure too)
            emit(kind, start, False, type(error).__name__, str(error))
            return
        problem = verify(reply)
        emit(kind, start, problem is None, "OK" if problem is None else "BAD_REPLY", problem or "")

    def classify_ok(reply):
        return None if reply.top_label and len(reply.scores) > 1 else f"no scores: {reply}"

    def serving(reply):
        return None if reply == SERVING else f"health reply {reply!r} is not SERVING"

    def fresh_health():
        with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as fresh:
            return fresh.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=args.deadline)

    rounds = 0
    while not stop.is_set():
        began = time.monotonic()
        call("classify", lambda: stub.Classify(request, timeout=args.deadline), classify_ok)
        call("health", lambda: check(b"", timeout=args.deadline), serving)
        if rounds % 4 == 3:
            call("fresh_health", fresh_health, serving)
        rounds += 1
        stop.wait(max(0.0, args.interval - (time.monotonic() - began)))
    channel.close()
    os._exit(0)  # skips grpc's slow teardown


if __name__ == "__main__":
    main()
