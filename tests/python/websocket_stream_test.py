#!/usr/bin/python3
"""The WebSocket /v1/stream of the real emoserve-server on 127.0.0.1: a
RAVDESS clip streamed over it gives StreamClassify's windows, speech events
and utterance (within 1e-5); each kind of bad message ends the stream with
its error and close code; the stream limit is shared with gRPC; a client
that leaves is counted as cancelled; shutdown flushes an open stream.

  websocket_stream_test.py --server BIN --model DIR

RAVDESS comes from $EMOSERVE_SHARED_DIR; without it the repository's
synthetic sample (examples/hello.wav) is streamed instead.
Exit code 77 (ctest: skipped) when a prerequisite is missing.
"""
import json
import pathlib
import socket
import sys
import tempfile
import time
import unittest
import urllib.request
import wave

from support import (SKIP, ServerProcess, free_port, parse_test_args, ravdess_clip,
                     stop_and_clean)

ROOT = pathlib.Path(__file__).resolve().parents[2]


ARGS = parse_test_args(__doc__, required=("--server", "--model"))
try:
    import grpc  # noqa: E402
    import soundfile  # noqa: E402
    import websocket  # noqa: E402  (python3-websocket)
    from google.protobuf import json_format  # noqa: E402
    sys.path.insert(0, str(ROOT / "clients" / "python"))
    from emoserve.v1 import emoserve_pb2 as pb, emoserve_pb2_grpc as pb_grpc  # noqa: E402
except ImportError as error:
    print(f"SKIP: {error} (python3-grpcio, python3-soundfile and python3-websocket are needed)")
    sys.exit(SKIP)

MAX_CHUNK = 64 << 10  # --max-chunk-bytes: a stream's largest audio message
MAX_STREAMS = 3
CHUNK_BYTES = 6400  # 200 ms at 16 kHz
SCRATCH = SERVER = HTTP_PORT = METRICS_PORT = None


def clip_pcm():
    """(16-bit PCM bytes, rate, name) of a RAVDESS clip, or of the sample."""
    clip = ravdess_clip()
    if clip is not None:
        samples, rate = soundfile.read(str(clip), dtype="int16")
        return samples.tobytes(), rate, clip.name
    with wave.open(str(ROOT / "examples" / "hello.wav")) as sample:
        return sample.readframes(sample.getnframes()), sample.getframerate(), "hello.wav"


def config(rate, **extra):
    body = {"format": {"encoding": "AUDIO_ENCODING_LINEAR16", "sampleRateHertz": rate,
                       "channelCount": 1},
            "interimResults": True}
    body.update(extra)
    return json.dumps(body)


def connect():
    return websocket.create_connection(f"ws://127.0.0.1:{HTTP_PORT}/v1/stream", timeout=60)


def receive_all(ws):
    """The JSON text messages until the server's close: (messages, close code)."""
    messages = []
    while True:
        frame = ws.recv_frame()  # no automatic replies: the server may be gone
        if frame.opcode == websocket.ABNF.OPCODE_CLOSE:
            code = int.from_bytes(frame.data[:2], "big") if len(frame.data) >= 2 else None
            try:
                ws.send_close()
            except OSError:
                pass  # the server has exited (SIGTERM)
            ws.shutdown()
            return messages, code
        if frame.opcode == websocket.ABNF.OPCODE_TEXT:
            messages.append(json.loads(frame.data))


def send_audio(ws, pcm, chunk=CHUNK_BYTES):
    for i in range(0, len(pcm), chunk):
        ws.send_binary(pcm[i:i + chunk])


def stream_over_websocket(pcm, rate, chunk=CHUNK_BYTES):
    ws = connect()
    ws.send(config(rate))
    send_audio(ws, pcm, chunk)
    ws.send(json.dumps({"end": True}))
    return receive_all(ws)


def stream_over_grpc(pcm, rate, chunk=CHUNK_BYTES):
    def requests():
        yield pb.StreamClassifyRequest(config=json_format.Parse(config(rate), pb.StreamingConfig()))
        for i in range(0, len(pcm), chunk):
            yield pb.StreamClassifyRequest(audio=pcm[i:i + chunk])
    with grpc.insecure_channel(SERVER.address) as channel:
        replies = pb_grpc.EmotionServiceStub(channel).StreamClassify(requests(), timeout=120)
        return [json_format.MessageToDict(r, including_default_value_fields=True)
                for r in replies]


def metrics():
    url = f"http://127.0.0.1:{METRICS_PORT}/metrics"
    with urllib.request.urlopen(url, timeout=30) as reply:
        return reply.read().decode()


def count(text, method, code):
    needle = f'emoserve_requests_total{{code="{code}",method="{method}"'
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(needle))


def setUpModule():
    global SCRATCH, SERVER, HTTP_PORT, METRICS_PORT
    SCRATCH = tempfile.mkdtemp(prefix="emoserve_ws_")
    HTTP_PORT, METRICS_PORT = free_port(), free_port()
    SERVER = ServerProcess(ARGS.server, SCRATCH,
                           ["--model", ARGS.model, "--http-port", str(HTTP_PORT),
                            "--metrics-port", str(METRICS_PORT),
                            "--max-chunk-bytes", str(MAX_CHUNK),
                            "--max-streams", str(MAX_STREAMS)])


def tearDownModule():
    stop_and_clean(SERVER, SCRATCH)


class WebSocketStreamTest(unittest.TestCase):
    def assert_same(self, got, want, path="response"):
        """Equal JSON values, numbers within 1e-5."""
        if isinstance(want, float) or isinstance(got, float):
            self.assertAlmostEqual(got, want, delta=1e-5, msg=path)
        elif isinstance(want, dict):
            self.assertEqual(sorted(got), sorted(want), path)
            for key in want:
                self.assert_same(got[key], want[key], f"{path}.{key}")
        elif isinstance(want, list):
            self.assertEqual(len(got), len(want), path)
            for i, (g, w) in enumerate(zip(got, want)):
                self.assert_same(g, w, f"{path}[{i}]")
        else:
            self.assertEqual(got, want, path)

    def test_a_clip_gives_the_grpc_streams_windows_events_and_utterance(self):
        pcm, rate, name = clip_pcm()
        got, code = stream_over_websocket(pcm, rate)
        want = stream_over_grpc(pcm, rate)
        self.assertEqual(code, 1000, got[-1:])
        kinds = [next(iter(m)) for m in got]
        self.assertIn("window", kinds, name)
        self.assertIn("utterance", kinds, name)
        self.assertEqual(kinds.count("speechEvent"), 2, name)
        # Message by message, in the same order: JSON of every field.
        want = [json.loads(json_format.MessageToJson(
            json_format.ParseDict(m, pb.StreamClassifyResponse()),
            including_default_value_fields=True)) for m in want]
        self.assert_same(got, want)

    def test_messages_in_any_fragments_and_sizes_give_the_same_results(self):
        pcm, rate, _ = clip_pcm()
        whole, _ = stream_over_websocket(pcm, rate, chunk=len(pcm) // 3 + 1)
        ws = connect()
        ws.send(config(rate))
        # One message in three fragments; then 10 ms messages.
        first = pcm[:9600]
        ws.send_frame(websocket.ABNF.create_frame(first[:1000], websocket.ABNF.OPCODE_BINARY, 0))
        ws.send_frame(websocket.ABNF.create_frame(first[1000:5000], websocket.ABNF.OPCODE_CONT, 0))
        ws.send_frame(websocket.ABNF.create_frame(first[5000:], websocket.ABNF.OPCODE_CONT, 1))
        for i in range(9600, len(pcm), 320):
            ws.send_binary(pcm[i:i + 320])
        ws.ping(b"still there?")
        ws.send(json.dumps({"end": True}))
        pieces, code = receive_all(ws)
        self.assertEqual(code, 1000)
        self.assert_same(pieces, whole)

    def test_each_bad_message_ends_the_stream_with_its_error(self):
        _, rate, _ = clip_pcm()

        def ends_with(messages, code, fragment):
            ws = connect()
            for message in messages:
                if isinstance(message, bytes):
                    ws.send_binary(message)
                else:
                    ws.send(message)
            got, close = receive_all(ws)
            self.assertEqual(got[-1]["error"]["code"], code, got)
            self.assertIn(fragment, got[-1]["error"]["message"])
            numbers = {"INVALID_ARGUMENT": 3, "NOT_FOUND": 5, "RESOURCE_EXHAUSTED": 8,
                       "FAILED_PRECONDITION": 9}
            self.assertEqual(close, 4000 + numbers[code])

        ends_with([b"\0" * 3200], "INVALID_ARGUMENT", "first message is the StreamingConfig")
        ends_with(["{not json"], "INVALID_ARGUMENT", "not a StreamingConfig in JSON")
        ends_with([json.dumps({"format": {"sampleRateHertz": rate}, "bogus": 1})],
                  "INVALID_ARGUMENT", "bogus")
        ends_with([config(rate, modelName="nope")], "NOT_FOUND", "nope")
        # This server's model does not adapt to speakers; the field is the proto's.
        ends_with([config(rate, speakerAdaptation={"speakerStatistics": "RVNQSw=="})],
                  "FAILED_PRECONDITION", "does not adapt to speakers")
        ends_with([config(rate), b"\0" * 3200, "hello"], "INVALID_ARGUMENT", '{"end": true}')
        ends_with([config(rate), b"\0" * (MAX_CHUNK + 2)], "RESOURCE_EXHAUSTED",
                  "--max-chunk-bytes): send smaller chunks")
        ends_with([config(rate), b"\0" * (MAX_CHUNK + (64 << 10) + 2)], "RESOURCE_EXHAUSTED",
                  "a message over this server's limit")
        # A frame far over the limit is not read: the connection is closed
        # as soon as its header arrives.
        ws = connect()
        ws.send(config(rate))
        ws.sock.sendall(bytes([0x82, 0xFF]) + (1 << 40).to_bytes(8, "big") + b"mask")
        with self.assertRaises((websocket.WebSocketConnectionClosedException, OSError)):
            while True:
                ws.recv_frame()
        ws.shutdown()
        # A message need not hold whole 16-bit samples: the server keeps
        # the partial one for the next message.
        ws = connect()
        ws.send(config(rate))
        ws.send_binary(b"\0" * 3201)
        ws.send_binary(b"\0" * 3199)
        ws.send(json.dumps({"end": True}))
        self.assertEqual(receive_all(ws)[1], 1000)
        # A plain GET is told to upgrade.
        with self.assertRaises(urllib.error.HTTPError) as plain:
            urllib.request.urlopen(f"http://127.0.0.1:{HTTP_PORT}/v1/stream", timeout=30)
        self.assertEqual(plain.exception.code, 426)

    def test_streams_share_the_limit_with_grpc_and_a_client_that_leaves_is_cancelled(self):
        pcm, rate, _ = clip_pcm()
        before = metrics()
        open_streams = []
        for _ in range(MAX_STREAMS):
            ws = connect()
            ws.send(config(rate))
            send_audio(ws, pcm * 2)
            open_streams.append(ws)
        # A first result (twice the clip: at least one whole window) shows
        # each stream is admitted and configured.
        for ws in open_streams:
            self.assertIn("speechEvent", json.loads(ws.recv()))
        refused, close = receive_all(connect())
        self.assertEqual(refused[-1]["error"]["code"], "RESOURCE_EXHAUSTED")
        self.assertIn("--max-streams", refused[-1]["error"]["message"])
        self.assertEqual(close, 4008)
        for ws in open_streams:
            ws.sock.shutdown(socket.SHUT_RDWR)  # gone, without a close frame
            ws.sock.close()
        method = "WebSocket /v1/stream"
        # A call is counted when its outcome is known and gives its slot
        # back only when its transport is done, a moment later: wait for both.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            after = metrics()
            if (count(after, method, "CANCELLED") - count(before, method, "CANCELLED")
                    >= MAX_STREAMS and "emoserve_active_streams 0" in after):
                break
            time.sleep(0.1)
        self.assertEqual(count(after, method, "CANCELLED") - count(before, method, "CANCELLED"),
                         MAX_STREAMS)
        self.assertIn("emoserve_active_streams 0", after)
        # The slots are free again.
        got, code = stream_over_websocket(pcm[:32000], rate)
        self.assertEqual(code, 1000, got)


class ShutdownTest(unittest.TestCase):
    def test_sigterm_flushes_an_open_stream(self):
        pcm, rate, _ = clip_pcm()
        port = free_port()
        scratch = tempfile.mkdtemp(prefix="emoserve_ws_stop_")
        server = ServerProcess(ARGS.server, scratch,
                               ["--model", ARGS.model, "--http-port", str(port)], name="stopping")
        try:
            ws = websocket.create_connection(f"ws://127.0.0.1:{port}/v1/stream", timeout=60)
            ws.send(config(rate))
            send_audio(ws, pcm * 2)  # no end message
            self.assertIn("speechEvent", json.loads(ws.recv()))
            self.assertEqual(server.stop(), 0)
            got, code = receive_all(ws)
            self.assertEqual(code, 1000, got)
            self.assertIn("utterance", [next(iter(m)) for m in got])
        finally:
            stop_and_clean(server, scratch)


if __name__ == "__main__":
    unittest.main(verbosity=2)
