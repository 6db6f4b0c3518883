#!/usr/bin/python3
"""An independent client in another language: Python's grpcio (Debian's
python3-grpcio) with stubs generated from proto/emoserve/v1 at build time,
against the real emoserve-server binary on 127.0.0.1.

  server_client_test.py --server BIN --stubs DIR (--model DIR | --model-writer BIN)

Exit code 77 (ctest: skipped) when a prerequisite is missing.
"""
import argparse
import os
import pathlib
import sys
import tempfile
import unittest

from support import (LABELS, PATIENCE_S, SKIP, ServerProcess, linear16, model_dir,
                     stop_and_clean, tone)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--server", required=True)
    parser.add_argument("--stubs", required=True)
    parser.add_argument("--model", help="a model directory (else one is written)")
    parser.add_argument("--model-writer", help="writes a model directory: BIN DIR")
    args, rest = parser.parse_known_args()
    sys.argv = [sys.argv[0]] + rest
    return args


ARGS = parse_args()
try:
    import grpc  # noqa: E402

    sys.path.insert(0, ARGS.stubs)
    from emoserve.v1 import emoserve_pb2 as pb  # noqa: E402
    from emoserve.v1 import emoserve_pb2_grpc as pb_grpc  # noqa: E402
except ImportError as error:
    print(f"SKIP: {error} (python3-grpcio, python3-protobuf and the generated stubs are needed)")
    sys.exit(SKIP)


class Server(ServerProcess):
    """The server on a model, with a channel and a stub."""

    def __init__(self, scratch):
        super().__init__(ARGS.server, scratch,
                         ["--model", model_dir(scratch, ARGS.model, ARGS.model_writer)])
        self.channel = grpc.insecure_channel(self.address)
        self.stub = pb_grpc.EmotionServiceStub(self.channel)

    def stop(self):
        self.channel.close()
        return super().stop()


SERVER = None
SCRATCH = None


def setUpModule():
    global SERVER, SCRATCH
    SCRATCH = tempfile.mkdtemp(prefix="emoserve_python_client_")
    SERVER = Server(SCRATCH)


def tearDownModule():
    stop_and_clean(SERVER, SCRATCH)


def max_difference(a, b):
    """Relative to the probabilities (float rounding is), those under 0.01
    counted as 0.01."""
    return max(abs(x - y) / max(abs(x), abs(y), 0.01) for x, y in zip(a, b))


def in_label_order(scores):
    by_label = {s.label: s.probability for s in scores}
    return [by_label.get(label, float("nan")) for label in LABELS]


class ClientTest(unittest.TestCase):
    def assert_well_formed(self, scores):
        self.assertEqual(sorted(s.label for s in scores), sorted(LABELS))
        probabilities = [s.probability for s in scores]
        self.assertEqual(probabilities, sorted(probabilities, reverse=True))
        self.assertAlmostEqual(sum(probabilities), 1.0, places=4)

    def assert_close(self, a, b, tolerance):
        self.assertEqual(len(a), len(b))
        self.assertLessEqual(max_difference(a, b), tolerance, f"{a} vs {b}")

    def test_model_info(self):
        info = SERVER.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=PATIENCE_S)
        self.assertEqual(list(info.labels), LABELS)
        self.assertEqual(info.sample_rate_hertz, 16000)
        self.assertAlmostEqual(info.window_seconds, 3.0)
        self.assertAlmostEqual(info.default_hop_seconds, 1.5)
        self.assertEqual(info.device, "cpu")
        self.assertEqual(info.features["n_mfcc"], 40)
        self.assertEqual(info.features["kind"], "mfcc")

    def test_health_with_hand_encoded_messages(self):
        # grpc.health.v1.Health/Check: an empty request (service ""); the
        # reply's field 1 (status) is 1, SERVING: bytes 08 01.
        check = SERVER.channel.unary_unary("/grpc.health.v1.Health/Check")
        self.assertEqual(check(b"", timeout=PATIENCE_S), b"\x08\x01")

    def test_classify_ravdess_flac(self):
        shared = os.environ.get("EMOSERVE_SHARED_DIR", "")
        clip = pathlib.Path(shared) / "datasets/ravdess/Actor_01/03-01-01-01-01-01-01.flac"
        if not shared or not pathlib.Path(shared).is_dir():
            self.skipTest("no shared data folder (EMOSERVE_SHARED_DIR)")
        self.assertTrue(clip.is_file(), f"{clip} is missing")
        audio = clip.read_bytes()
        reply = SERVER.stub.Classify(pb.ClassifyRequest(audio=audio), timeout=PATIENCE_S)
        self.assert_well_formed(reply.scores)
        self.assertEqual(reply.top_label, reply.scores[0].label)
        self.assertGreater(reply.audio_duration_seconds, 2.0)
        self.assertGreaterEqual(reply.window_count, 1)
        self.assertEqual(reply.model_name, "test-default-architecture")

    def test_classify_raw_pcm_at_another_rate(self):
        rate = 22050
        request = pb.ClassifyRequest(
            audio=linear16(tone(2.0, rate)),
            format=pb.AudioFormat(encoding=pb.AUDIO_ENCODING_LINEAR16, sample_rate_hertz=rate))
        reply = SERVER.stub.Classify(request, timeout=PATIENCE_S)
        self.assert_well_formed(reply.scores)
        self.assertAlmostEqual(reply.audio_duration_seconds, 2.0, places=3)
        self.assertEqual(reply.window_count, 1)

    def test_stream_gives_the_unary_timeline(self):
        rate = 16000
        pcm = linear16(tone(8.0, rate))
        raw = pb.AudioFormat(encoding=pb.AUDIO_ENCODING_LINEAR16, sample_rate_hertz=rate)
        unary = SERVER.stub.Classify(pb.ClassifyRequest(audio=pcm, format=raw, include_timeline=True),
                                     timeout=PATIENCE_S)
        chunk = rate * 2 // 10  # 100 ms

        def requests():
            yield pb.StreamClassifyRequest(config=pb.StreamingConfig(format=raw, interim_results=True))
            for i in range(0, len(pcm), chunk):
                yield pb.StreamClassifyRequest(audio=pcm[i:i + chunk])

        responses = list(SERVER.stub.StreamClassify(requests(), timeout=PATIENCE_S))
        windows = [r.window for r in responses if r.WhichOneof("result") == "window"]
        utterances = [r.utterance for r in responses if r.WhichOneof("result") == "utterance"]
        events = [r.speech_event for r in responses if r.WhichOneof("result") == "speech_event"]
        self.assertEqual(len(windows), len(unary.timeline))
        self.assertEqual(len(windows), 5)  # 8 s: windows at 0, 1.5, 3, 4.5 and 6 s
        # The same samples give the same probabilities to float rounding in
        # batching (seen up to 1.1e-5 with the bundled model), while
        # neighbouring windows differ by far more.
        tolerance = 5e-5
        for a, b in zip(unary.timeline, unary.timeline[1:]):
            self.assertGreater(max_difference(in_label_order(a.scores), in_label_order(b.scores)),
                               5 * tolerance)
        for got, want in zip(windows, unary.timeline):
            self.assertAlmostEqual(got.start_seconds, want.start_seconds, places=6)
            self.assertAlmostEqual(got.end_seconds, want.end_seconds, places=3)
            self.assertTrue(got.speech and want.speech)
            self.assert_close(in_label_order(got.scores), in_label_order(want.scores), tolerance)
        # The tone is never silent: one utterance, the mean of all windows,
        # which is also the unary result.
        self.assertEqual(len(utterances), 1)
        self.assertEqual(utterances[0].window_count, 5)
        self.assert_close(in_label_order(utterances[0].scores), in_label_order(unary.scores), tolerance)
        self.assertEqual([e.type for e in events],
                         [pb.SpeechEvent.SPEECH_STARTED, pb.SpeechEvent.SPEECH_ENDED])

    def test_errors_carry_the_right_codes(self):
        with self.assertRaises(grpc.RpcError) as bad_audio:
            SERVER.stub.Classify(pb.ClassifyRequest(audio=b"definitely not audio"), timeout=PATIENCE_S)
        self.assertEqual(bad_audio.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("audio", bad_audio.exception.details())

        with self.assertRaises(grpc.RpcError) as audio_first:
            list(SERVER.stub.StreamClassify(iter([pb.StreamClassifyRequest(audio=b"\0\0")]),
                                            timeout=PATIENCE_S))
        self.assertEqual(audio_first.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("config", audio_first.exception.details())

        long_audio = pb.ClassifyRequest(
            audio=linear16(tone(60.0, 16000)),
            format=pb.AudioFormat(encoding=pb.AUDIO_ENCODING_LINEAR16, sample_rate_hertz=16000))
        with self.assertRaises(grpc.RpcError) as late:
            SERVER.stub.Classify(long_audio, timeout=0.05)
        self.assertEqual(late.exception.code(), grpc.StatusCode.DEADLINE_EXCEEDED)


if __name__ == "__main__":
    unittest.main(verbosity=2)
