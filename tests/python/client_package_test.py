#!/usr/bin/python3
"""The Python client package (clients/python, `import emoserve`) against the
real emoserve-server on 127.0.0.1, plaintext and TLS; and its checked-in
stubs against the proto.

  client_package_test.py --server BIN (--model DIR | --model-writer BIN)
                         [--protoc BIN --grpc-python-plugin BIN]

Exit code 77 (ctest: skipped) when a prerequisite is missing.
"""
import filecmp
import pathlib
import subprocess
import sys
import tempfile
import unittest

from support import (LABELS, SKIP, ServerProcess, linear16, model_dir, parse_test_args,
                     self_signed_certificate, stop_and_clean, tone, wav_bytes)

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "clients" / "python"


ARGS = parse_test_args(__doc__, required=("--server",),
                       optional=("--model", "--model-writer", "--protoc", "--grpc-python-plugin"))
try:
    sys.path.insert(0, str(PACKAGE))
    import emoserve  # noqa: E402
    from emoserve import EmoserveClient, EmoserveError  # noqa: E402
except ImportError as error:
    print(f"SKIP: {error} (python3-grpcio and python3-protobuf are needed)")
    sys.exit(SKIP)

RATE = 16000
SCRATCH = None
SERVER = None
MODEL = None


def setUpModule():
    global SCRATCH, SERVER, MODEL
    SCRATCH = tempfile.mkdtemp(prefix="emoserve_client_package_")
    MODEL = model_dir(SCRATCH, ARGS.model, ARGS.model_writer)
    SERVER = ServerProcess(ARGS.server, SCRATCH, ["--model", MODEL])


def tearDownModule():
    stop_and_clean(SERVER, SCRATCH)


class ClientTest(unittest.TestCase):
    def setUp(self):
        self.client = EmoserveClient(SERVER.address, timeout=60)

    def tearDown(self):
        self.client.close()

    def assert_probabilities(self, scores):
        self.assertEqual(sorted(s.label for s in scores), sorted(LABELS))
        probabilities = [s.probability for s in scores]
        self.assertEqual(probabilities, sorted(probabilities, reverse=True))
        self.assertAlmostEqual(sum(probabilities), 1.0, places=4)

    def test_classify_a_file_its_bytes_and_raw_pcm_alike(self):
        samples = tone(4.0, RATE)
        path = pathlib.Path(SCRATCH) / "tone.wav"
        path.write_bytes(wav_bytes(samples, RATE))
        by_path = self.client.classify(str(path), timeline=True)
        by_bytes = self.client.classify(path.read_bytes())
        raw = self.client.classify(linear16(samples), encoding="linear16", sample_rate_hertz=RATE)
        self.assertIsInstance(by_path, emoserve.ClassifyResult)
        self.assert_probabilities(by_path.scores)
        self.assertEqual(by_path.top_label, by_path.scores[0].label)
        self.assertAlmostEqual(by_path.duration_seconds, 4.0, places=3)
        self.assertEqual(by_path.window_count, 2)  # 3 s windows every 1.5 s
        self.assertEqual(len(by_path.timeline), 2)
        self.assertEqual(by_path.timeline[1].start_seconds, 1.5)
        self.assertEqual(by_bytes.timeline, [])  # not asked for
        for other in (by_bytes, raw):
            for label, p in by_path.probabilities.items():
                self.assertAlmostEqual(other.probabilities[label], p, delta=5e-5)
        self.assertEqual(by_path.model_name, self.client.info().name)

    def test_stream_yields_typed_windows_events_and_the_utterance(self):
        pcm = linear16(tone(8.0, RATE))
        unary = self.client.classify(pcm, encoding="linear16", sample_rate_hertz=RATE,
                                     timeline=True)
        chunk = RATE * 2 // 10  # 100 ms
        results = list(self.client.stream(pcm[i:i + chunk] for i in range(0, len(pcm), chunk)))
        windows = [r for r in results if isinstance(r, emoserve.Window)]
        events = [r for r in results if isinstance(r, emoserve.SpeechEvent)]
        utterances = [r for r in results if isinstance(r, emoserve.Utterance)]
        self.assertEqual(len(windows), 5)
        self.assertEqual([e.kind for e in events], ["started", "ended"])
        self.assertEqual(len(utterances), 1)
        self.assertEqual(utterances[0].window_count, 5)
        for got, want in zip(windows, unary.timeline):
            self.assertAlmostEqual(got.start_seconds, want.start_seconds, places=6)
            for label, p in want.probabilities.items():
                self.assertAlmostEqual(got.probabilities[label], p, delta=5e-5)
        for label, p in unary.probabilities.items():
            self.assertAlmostEqual(utterances[0].probabilities[label], p, delta=5e-5)
        # Without interim results: only the events and the utterance.
        quiet = list(self.client.stream((pcm[i:i + 32000] for i in range(0, len(pcm), 32000)),
                                        interim_results=False))
        self.assertFalse(any(isinstance(r, emoserve.Window) for r in quiet))
        self.assertEqual(sum(isinstance(r, emoserve.Utterance) for r in quiet), 1)

    def test_info_models_and_health(self):
        info = self.client.info()
        self.assertEqual(info.labels, LABELS)
        self.assertEqual(info.sample_rate_hertz, RATE)
        self.assertAlmostEqual(info.window_seconds, 3.0)
        self.assertIn("n_mfcc", info.features)
        models = self.client.models()
        self.assertEqual([m.name for m in models], [info.name])
        self.assertTrue(models[0].is_default)
        self.assertEqual(models[0].versions[0].state, "ready")
        self.assertEqual(models[0].versions[0].reported_version, info.version)
        self.assertEqual(self.client.info(f"{info.name}:1").name, info.name)
        self.assertEqual(self.client.info((info.name, 1)).name, info.name)
        self.assertEqual(self.client.health(), "SERVING")

    def test_errors_are_typed_with_the_servers_reason(self):
        with self.assertRaises(EmoserveError) as unknown:
            self.client.classify(wav_bytes(tone(1.0, RATE), RATE), model="nope")
        self.assertEqual(unknown.exception.code, "NOT_FOUND")
        self.assertIn("no model named", unknown.exception.message)
        with self.assertRaises(EmoserveError) as bad:
            self.client.classify(b"definitely not audio")
        self.assertEqual(bad.exception.code, "INVALID_ARGUMENT")
        with self.assertRaises(EmoserveError) as stream_unknown:
            list(self.client.stream(iter([b"\0" * 3200]), model="nope"))
        self.assertEqual(stream_unknown.exception.code, "NOT_FOUND")
        with self.assertRaises(EmoserveError) as too_big:
            list(self.client.stream(iter([b"\0" * (1 << 20)])))
        self.assertEqual(too_big.exception.code, "RESOURCE_EXHAUSTED")
        self.assertIn("--max-chunk-bytes", too_big.exception.message)
        with self.assertRaises(ValueError):
            self.client.classify(b"", encoding="mp3")
        with self.assertRaises(ValueError):
            self.client.info("name:latest")
        unreachable = EmoserveClient("127.0.0.1:1", timeout=5)
        with self.assertRaises(EmoserveError) as down:
            unreachable.info()
        self.assertIn(down.exception.code, ("UNAVAILABLE", "DEADLINE_EXCEEDED"))
        unreachable.close()


class SpeakerAdaptationTest(unittest.TestCase):
    """The voice's statistics travel through the client: the bundled
    speaker-adaptive model, adapting after one speech window."""

    def test_statistics_from_one_call_adapt_the_next(self):
        scratch = tempfile.mkdtemp(prefix="emoserve_client_speaker_")
        server = ServerProcess(ARGS.server, scratch,
                               ["--model", str(ROOT / "models" / "speaker-adaptive"),
                                "--adaptation-min-speech-seconds", "1.5"], name="speaker")
        try:
            with EmoserveClient(server.address, timeout=60) as client:
                self.assertTrue(client.info().speaker_adaptation)
                first = client.classify(linear16(tone(4.0, RATE)), encoding="linear16",
                                        sample_rate_hertz=RATE, return_speaker_statistics=True)
                self.assertFalse(first.speaker_adapted)
                self.assertEqual(first.speaker_statistics[:4], b"ESPK")
                pcm = linear16(tone(4.0, RATE, frequency=180.0))
                alone = client.classify(pcm, encoding="linear16", sample_rate_hertz=RATE)
                adapted = client.classify(pcm, encoding="linear16", sample_rate_hertz=RATE,
                                          timeline=True,
                                          speaker_statistics=first.speaker_statistics)
                self.assertTrue(adapted.speaker_adapted)
                self.assertTrue(all(w.speaker_adapted for w in adapted.timeline))
                self.assertNotEqual(adapted.probabilities, alone.probabilities)
                chunk = RATE * 2 // 10
                results = list(client.stream((pcm[i:i + chunk] for i in range(0, len(pcm), chunk)),
                                             speaker_statistics=first.speaker_statistics))
                windows = [r for r in results if isinstance(r, emoserve.Window)]
                utterances = [r for r in results if isinstance(r, emoserve.Utterance)]
                self.assertTrue(windows and all(w.speaker_adapted for w in windows))
                self.assertTrue(utterances[-1].speaker_adapted)
                self.assertEqual(len(utterances[-1].speaker_statistics),
                                 len(first.speaker_statistics))
                plain = list(client.stream((pcm[i:i + chunk] for i in range(0, len(pcm), chunk)),
                                           speaker_adaptation=False))
                self.assertFalse(any(getattr(r, "speaker_adapted", False) for r in plain))
                with self.assertRaises(EmoserveError) as garbage:
                    client.classify(pcm, encoding="linear16", sample_rate_hertz=RATE,
                                    speaker_statistics=b"ESPK garbage")
                self.assertEqual(garbage.exception.code, "INVALID_ARGUMENT")
        finally:
            stop_and_clean(server, scratch)

    def test_a_model_that_does_not_adapt_says_so(self):
        with EmoserveClient(SERVER.address, timeout=60) as client:
            self.assertFalse(client.info().speaker_adaptation)
            with self.assertRaises(EmoserveError) as refused:
                client.classify(linear16(tone(1.0, RATE)), encoding="linear16",
                                sample_rate_hertz=RATE, return_speaker_statistics=True)
            self.assertEqual(refused.exception.code, "FAILED_PRECONDITION")


class ExampleTest(unittest.TestCase):
    def test_the_example_script_runs(self):
        run = subprocess.run([sys.executable, str(ROOT / "examples/python_client.py"), SERVER.address],
                             capture_output=True, text=True, timeout=120,
                             env={"PYTHONPATH": str(PACKAGE), "PATH": "/usr/bin:/bin"})
        self.assertEqual(run.returncode, 0, run.stderr)
        self.assertIn("health: SERVING", run.stdout)
        self.assertIn("hello.wav: ", run.stdout)
        self.assertIn("utterance 0.00-", run.stdout)


class TlsTest(unittest.TestCase):
    def test_tls_with_the_servers_certificate(self):
        made = self_signed_certificate(SCRATCH)
        if isinstance(made, str):
            self.skipTest(made)
        cert, key = made
        server = ServerProcess(ARGS.server, SCRATCH,
                               ["--model", MODEL, "--tls-cert", str(cert), "--tls-key", str(key)],
                               name="tls-server")
        try:
            with EmoserveClient(server.address, root_certificates=str(cert), timeout=60) as client:
                self.assertEqual(client.info().labels, LABELS)
                result = client.classify(wav_bytes(tone(2.0, RATE), RATE))
                self.assertEqual(len(result.scores), len(LABELS))
            with EmoserveClient(server.address, root_certificates=cert.read_bytes(),
                                timeout=60) as client:
                self.assertEqual(client.health(), "SERVING")
            with EmoserveClient(server.address, timeout=10) as plaintext:
                with self.assertRaises(EmoserveError) as refused:
                    plaintext.info()
                self.assertEqual(refused.exception.code, "UNAVAILABLE")
        finally:
            self.assertEqual(server.stop(), 0, server.log())


class StubsTest(unittest.TestCase):
    def test_checked_in_stubs_match_the_proto(self):
        if not ARGS.protoc or not ARGS.grpc_python_plugin:
            self.skipTest("no --protoc and --grpc-python-plugin")
        out = pathlib.Path(SCRATCH) / "stubs"
        out.mkdir()
        subprocess.run([ARGS.protoc, "-I", str(ROOT / "proto"), f"--python_out={out}",
                        f"--grpc_out={out}", f"--plugin=protoc-gen-grpc={ARGS.grpc_python_plugin}",
                        str(ROOT / "proto/emoserve/v1/emoserve.proto")], check=True)
        for name in ("emoserve_pb2.py", "emoserve_pb2_grpc.py"):
            self.assertTrue(
                filecmp.cmp(out / "emoserve/v1" / name, PACKAGE / "emoserve/v1" / name,
                            shallow=False),
                f"clients/python/emoserve/v1/{name} differs from the proto: run "
                "clients/python/generate_stubs.sh")


if __name__ == "__main__":
    unittest.main(verbosity=2)
