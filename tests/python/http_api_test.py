#!/usr/bin/python3
"""The HTTP/JSON API (--http-port) of the real emoserve-server on 127.0.0.1,
as curl would call it: every endpoint, every class of error with its HTTP
status, the same answers as gRPC, the method label in the metrics; HTTPS (and client
certificates) with the gRPC port's TLS flags.

  http_api_test.py --server BIN (--model DIR | --model-writer BIN)

Exit code 77 (ctest: skipped) when a prerequisite is missing.
"""
import http.client
import json
import pathlib
import ssl
import sys
import tempfile
import unittest
import urllib.request

from support import (LABELS, SKIP, ServerProcess, free_port, linear16, model_dir, parse_test_args,
                     self_signed_certificate, stop_and_clean, tone, wav_bytes)

ROOT = pathlib.Path(__file__).resolve().parents[2]


ARGS = parse_test_args(__doc__, required=("--server",), optional=("--model", "--model-writer"))
try:
    sys.path.insert(0, str(ROOT / "clients" / "python"))
    from emoserve import EmoserveClient  # noqa: E402
except ImportError as error:
    print(f"SKIP: {error} (python3-grpcio and python3-protobuf are needed)")
    sys.exit(SKIP)

RATE = 16000
# Small enough to reach: 1 MiB bodies, and 2 MiB of audio in flight.
MAX_BODY = 1 << 20
SCRATCH = SERVER = HTTP_PORT = METRICS_PORT = MODEL = None


def setUpModule():
    global SCRATCH, SERVER, HTTP_PORT, METRICS_PORT, MODEL
    SCRATCH = tempfile.mkdtemp(prefix="emoserve_http_")
    MODEL = model_dir(SCRATCH, ARGS.model, ARGS.model_writer)
    HTTP_PORT, METRICS_PORT = free_port(), free_port()
    SERVER = ServerProcess(ARGS.server, SCRATCH,
                           ["--model", MODEL, "--http-port", str(HTTP_PORT),
                            "--metrics-port", str(METRICS_PORT),
                            "--max-message-bytes", str(MAX_BODY), "--max-audio-memory-mb", "2"])


def tearDownModule():
    stop_and_clean(SERVER, SCRATCH)


def call(method, path, body=None, headers=None, port=None, context=None):
    """(HTTP status, parsed JSON body, headers)."""
    port = port or HTTP_PORT
    connection = (http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=60)
                  if context else http.client.HTTPConnection("127.0.0.1", port, timeout=60))
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        data = response.read()
        return response.status, json.loads(data) if data else None, dict(response.getheaders())
    finally:
        connection.close()


class HttpApiTest(unittest.TestCase):
    def assert_error(self, result, status, code, fragment):
        got_status, body, headers = result
        self.assertEqual(got_status, status, body)
        self.assertEqual(headers.get("Content-Type"), "application/json")
        self.assertEqual(body["error"]["code"], code, body)
        self.assertIn(fragment, body["error"]["message"])

    def test_health_and_readiness(self):
        self.assertEqual(call("GET", "/healthz")[:2], (200, {"status": "live"}))
        self.assertEqual(call("GET", "/readyz")[:2], (200, {"status": "SERVING"}))

    def test_model_and_models_are_the_grpc_answers_in_json(self):
        status, model, _ = call("GET", "/v1/model")
        self.assertEqual(status, 200)
        with EmoserveClient(SERVER.address) as client:
            info = client.info()
        self.assertEqual(model["labels"], LABELS)
        self.assertEqual(model["name"], info.name)
        self.assertEqual(model["sampleRateHertz"], info.sample_rate_hertz)
        self.assertEqual(model["windowSeconds"], info.window_seconds)
        self.assertEqual(model["features"], info.features)
        self.assertEqual(call("GET", f"/v1/model?model={info.name}:1")[1], model)
        status, models, _ = call("GET", "/v1/models")
        self.assertEqual(status, 200)
        self.assertEqual(models["models"][0]["name"], info.name)
        self.assertEqual(models["models"][0]["versions"][0]["state"], "MODEL_STATE_READY")

    def test_classify_a_file_and_raw_pcm_as_grpc_does(self):
        samples = tone(4.0, RATE)
        status, result, headers = call("POST", "/v1/classify?timeline=true", wav_bytes(samples, RATE))
        self.assertEqual(status, 200, result)
        self.assertEqual(headers.get("Content-Type"), "application/json")
        with EmoserveClient(SERVER.address) as client:
            want = client.classify(wav_bytes(samples, RATE), timeline=True)
        self.assertEqual(result["topLabel"], want.top_label)
        self.assertEqual([s["label"] for s in result["scores"]], [s.label for s in want.scores])
        for got, expected in zip(result["scores"], want.scores):
            self.assertAlmostEqual(got["probability"], expected.probability, delta=1e-5)
        self.assertEqual(len(result["timeline"]), len(want.timeline))
        self.assertEqual(result["windowCount"], 2)
        self.assertAlmostEqual(result["audioDurationSeconds"], 4.0, places=3)
        raw = call("POST", f"/v1/classify?encoding=linear16&sample_rate_hertz={RATE}",
                   linear16(samples))
        self.assertEqual(raw[0], 200, raw[1])
        self.assertEqual(raw[1]["timeline"], [])  # not asked for
        for got, expected in zip(raw[1]["scores"], result["scores"]):
            self.assertAlmostEqual(got["probability"], expected["probability"], delta=1e-5)

    def test_each_error_has_its_code_and_status(self):
        audio = wav_bytes(tone(1.0, RATE), RATE)
        self.assert_error(call("POST", "/v1/classify", b"definitely not audio"), 400,
                          "INVALID_ARGUMENT", "could not decode")
        self.assert_error(call("POST", "/v1/classify?bogus=1", audio), 400, "INVALID_ARGUMENT",
                          "unknown query parameter \"bogus\"")
        self.assert_error(call("POST", "/v1/classify?hop_seconds=x", audio), 400,
                          "INVALID_ARGUMENT", "hop_seconds")
        self.assert_error(call("POST", "/v1/classify?model=nope", audio), 404, "NOT_FOUND",
                          "no model named \"nope\"")
        self.assert_error(call("GET", "/v1/model?model=nope:2"), 404, "NOT_FOUND", "nope")
        self.assert_error(call("POST", "/v1/classify?speaker_statistics=%25%25", audio), 400,
                          "INVALID_ARGUMENT", "base64")
        # This server's model does not adapt to speakers.
        self.assert_error(call("POST", "/v1/classify?return_speaker_statistics=true", audio), 400,
                          "FAILED_PRECONDITION", "does not adapt to speakers")
        self.assert_error(call("POST", "/v1/classify?speaker_statistics=RVNQSw", audio), 400,
                          "FAILED_PRECONDITION", "speaker_statistics")
        self.assert_error(call("POST", "/v1/classify", b"\0" * (MAX_BODY + 1)), 413,
                          "RESOURCE_EXHAUSTED", "--max-message-bytes")
        # A body under the limit whose decoded samples (twice its size as
        # floats) the 2 MiB budget of audio in flight cannot hold.
        self.assert_error(call("POST", f"/v1/classify?encoding=linear16&sample_rate_hertz={RATE}",
                               b"\x10\x00" * (MAX_BODY // 2)), 429, "RESOURCE_EXHAUSTED",
                          "memory")
        self.assert_error(call("POST", "/v1/classify?timeout_seconds=0.001",
                               wav_bytes(tone(6.0, RATE), RATE)), 504, "DEADLINE_EXCEEDED", "deadline")
        self.assert_error(call("POST", "/v1/classify", iter([audio]),
                               {"Transfer-Encoding": "chunked"}), 411, "INVALID_ARGUMENT",
                          "Content-Length")
        self.assert_error(call("GET", "/v1/classify"), 405, "INVALID_ARGUMENT", "takes POST")
        self.assert_error(call("POST", "/v1/models"), 405, "INVALID_ARGUMENT", "takes GET")
        self.assert_error(call("GET", "/v2/nothing"), 404, "NOT_FOUND", "POST /v1/classify")
        # The server is fine after all of that.
        self.assertEqual(call("POST", "/v1/classify", audio)[0], 200)

    def test_http_calls_are_counted_by_method(self):
        call("POST", "/v1/classify", wav_bytes(tone(1.0, RATE), RATE))
        call("GET", "/v1/model?model=nope")
        with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=30) as r:
            text = r.read().decode()
        lines = [l for l in text.splitlines() if l.startswith("emoserve_requests_total{")]
        self.assertTrue(any('method="POST /v1/classify"' in l and 'code="OK"' in l for l in lines),
                        "\n".join(lines))
        self.assertTrue(any('method="GET /v1/model"' in l and 'code="NOT_FOUND"' in l
                            for l in lines), "\n".join(lines))


class TlsTest(unittest.TestCase):
    def test_https_with_the_grpc_certificate_and_client_certificates(self):
        made = self_signed_certificate(SCRATCH)
        if isinstance(made, str):
            self.skipTest(made)
        cert, key = made
        trusting = ssl.create_default_context(cafile=str(cert))
        audio = wav_bytes(tone(4.0, RATE), RATE)
        for mutual in (False, True):
            port = free_port()
            args = ["--model", MODEL, "--http-port", str(port), "--tls-cert", str(cert),
                    "--tls-key", str(key)] + (["--tls-client-ca", str(cert)] if mutual else [])
            server = ServerProcess(ARGS.server, SCRATCH, args, name=f"tls-server-{mutual}")
            try:
                self.assertIn(f" http_port={port} ", server.log())
                context = trusting
                if mutual:
                    # Without a client certificate the handshake fails.
                    with self.assertRaises((ssl.SSLError, OSError)):
                        call("GET", "/readyz", port=port, context=trusting)
                    context = ssl.create_default_context(cafile=str(cert))
                    context.load_cert_chain(str(cert), str(key))
                self.assertEqual(call("GET", "/readyz", port=port, context=context)[:2],
                                 (200, {"status": "SERVING"}))
                status, result, _ = call("POST", "/v1/classify", audio, port=port,
                                         context=context)
                self.assertEqual(status, 200, result)
                self.assertIn(result["topLabel"], LABELS)
                # Never plaintext on a TLS port.
                with self.assertRaises((http.client.HTTPException, OSError)):
                    call("GET", "/readyz", port=port)
            finally:
                self.assertEqual(server.stop(), 0, server.log())


if __name__ == "__main__":
    unittest.main(verbosity=2)
