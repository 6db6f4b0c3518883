"""What the Python tests share: test audio and emoserve-server as a child
process on 127.0.0.1."""
import argparse
import array
import io
import math
import os
import shutil
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time
import wave

SKIP = 77  # ctest: skipped
PATIENCE_S = 120.0
LABELS = ["neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised"]


def parse_test_args(doc, required=(), optional=()):
    """The test's own flags (the rest stay in sys.argv for unittest)."""
    parser = argparse.ArgumentParser(description=doc)
    for name in required:
        parser.add_argument(name, required=True)
    for name in optional:
        parser.add_argument(name)
    args, rest = parser.parse_known_args()
    sys.argv = [sys.argv[0]] + rest
    return args


def ravdess_clip():
    """A RAVDESS test-actor clip from $EMOSERVE_SHARED_DIR, or None."""
    shared = os.environ.get("EMOSERVE_SHARED_DIR", "")
    clip = pathlib.Path(shared) / "datasets/ravdess/Actor_21/03-01-05-02-01-01-21.flac"
    return clip if shared and clip.is_file() else None


def linear16(samples):
    pcm = array.array("h", (max(-32768, min(32767, round(x * 32768))) for x in samples))
    if sys.byteorder != "little":
        pcm.byteswap()
    return pcm.tobytes()


def tone(seconds, rate, frequency=220.0, amplitude=0.3):
    """A tone whose loudness and pitch wander, so that windows differ."""
    out = []
    for i in range(int(seconds * rate)):
        t = i / rate
        level = amplitude * (0.6 + 0.4 * math.sin(2 * math.pi * 0.3 * t))
        out.append(level * math.sin(2 * math.pi * (frequency + 40 * math.sin(2 * math.pi * 0.5 * t)) * t))
    return out


def wav_bytes(samples, rate):
    """`samples` as a 16-bit mono WAV file."""
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(linear16(samples))
    return out.getvalue()


def self_signed_certificate(scratch):
    """(cert, key) paths for localhost and 127.0.0.1 in `scratch`, or the
    reason openssl failed as a string."""
    cert = pathlib.Path(scratch) / "cert.pem"
    key = pathlib.Path(scratch) / "key.pem"
    made = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)], capture_output=True)
    if made.returncode != 0:
        return "openssl failed: " + made.stderr.decode(errors="replace")
    return cert, key


def stop_and_clean(server, scratch):
    """Stops `server` (SIGTERM), removes `scratch`, and fails unless it
    exited 0: a module's tearDownModule."""
    code = server.stop()
    log = server.log()
    shutil.rmtree(scratch, ignore_errors=True)
    if code != 0:
        raise AssertionError(f"emoserve-server exited {code} on SIGTERM:\n{log}")


def free_port():
    """A port free now (the server binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_dir(scratch, model=None, model_writer=None):
    """`model`, or a test model written by `model_writer` into `scratch`;
    exits SKIP when there is neither."""
    if model:
        return model
    if not model_writer or not os.access(model_writer, os.X_OK):
        print(f"SKIP: no --model and no model writer at {model_writer}")
        sys.exit(SKIP)
    path = str(pathlib.Path(scratch) / "model")
    if not pathlib.Path(path).is_dir():
        subprocess.run([model_writer, path], check=True)
    return path


class ServerProcess:
    """emoserve-server as a child process on 127.0.0.1, with `args` and the
    test defaults for the flags they do not set (ports 0: any free gRPC
    port, no metrics, no HTTP; one thread each); up once its log says
    event=serving."""

    DEFAULTS = {"--port": "0", "--metrics-port": "0", "--http-port": "0", "--torch-threads": "1",
                "--feature-threads": "1", "--grace-seconds": "5"}

    def __init__(self, server, scratch, args, name="server"):
        self.log_path = pathlib.Path(scratch) / f"{name}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("EMOSERVE_")}
        defaults = [part for flag, value in self.DEFAULTS.items() if flag not in args
                    for part in (flag, value)]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [server, "--host", "127.0.0.1"] + defaults + list(args),
                stdout=log, stderr=subprocess.STDOUT, env=env)
        self.port = self._wait_until_serving()
        self.address = f"127.0.0.1:{self.port}"

    def log(self):
        return self.log_path.read_text(errors="replace")

    def _wait_until_serving(self):
        until = time.monotonic() + PATIENCE_S
        while time.monotonic() < until:
            log = self.log()
            match = re.search(r"event=startup .*? port=(\d+)", log)
            if match and "event=serving" in log:
                return int(match.group(1))
            if self.process.poll() is not None:
                raise RuntimeError("emoserve-server exited:\n" + log)
            time.sleep(0.02)
        raise RuntimeError("the server never reported serving:\n" + self.log())

    def stop(self):
        """SIGTERM; the exit code."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=PATIENCE_S)
