"""The abuse suite's harness: the server process, its memory, the prober
(a well-behaved client in another process), and one Context per case that
collects checks and measurements and cleans up everything a case opened.

Nothing here waits without a timeout: every gRPC call has a deadline,
every thread is joined with a timeout (and is a daemon), every child
process is killed at the end."""
import atexit
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback

import grpc

HERE = pathlib.Path(__file__).resolve().parent
SERVING = b"\x08\x01"
STARTUP_PATIENCE_S = 60.0

_children = []


@atexit.register
def kill_children():
    for process in _children:
        if process.poll() is None:
            process.kill()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_status(pid):
    """VmRSS, VmHWM (MiB) and Threads from /proc/PID/status, or None."""
    try:
        text = pathlib.Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    values = dict(re.findall(r"^(VmRSS|VmHWM|Threads):\s+(\d+)", text, re.M))
    if "VmRSS" not in values:
        return None  # a zombie
    return {"rss": int(values["VmRSS"]) / 1024, "hwm": int(values.get("VmHWM", 0)) / 1024,
            "threads": int(values.get("Threads", 0))}


class Server:
    """emoserve-server as a child process, started with `args`."""

    def __init__(self, binary, args, log_path):
        self.binary = binary
        self.args = list(args)
        self.log_path = pathlib.Path(log_path)
        self.metrics_port = free_port()
        self.port = None
        self.exit_code = None
        self.exit_seconds = None
        env = {k: v for k, v in os.environ.items() if not k.startswith("EMOSERVE_")}
        command = [binary, "--host", "127.0.0.1", "--port", "0",
                   "--metrics-port", str(self.metrics_port)] + self.args
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=env)
        _children.append(self.process)
        self.pid = self.process.pid
        self._wait_until_serving()

    def log(self):
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self):
        return self.process.poll() is None

    def _wait_until_serving(self):
        until = time.monotonic() + STARTUP_PATIENCE_S
        while time.monotonic() < until and self.port is None:
            match = re.search(r"event=startup .*?\bport=(\d+)", self.log())
            if match:
                self.port = int(match.group(1))
                break
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"emoserve-server exited {self.process.returncode}:\n{self.log()}")
            time.sleep(0.02)
        if self.port is None:
            raise RuntimeError("no startup line from emoserve-server:\n" + self.log())
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            check = channel.unary_unary("/grpc.health.v1.Health/Check")
            while time.monotonic() < until:
                try:
                    if check(b"", timeout=5) == SERVING:
                        return
                except grpc.RpcError:
                    pass
                if self.process.poll() is not None:
                    raise RuntimeError(f"emoserve-server exited:\n{self.log()}")
                time.sleep(0.05)
        raise RuntimeError("emoserve-server never became SERVING:\n" + self.log())

    def health(self, timeout=2.0):
        """'SERVING', another status, or the error's code, on a new connection."""
        try:
            with grpc.insecure_channel(f"127.0.0.1:{self.port}",
                                       options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
                reply = channel.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=timeout)
                return "SERVING" if reply == SERVING else f"reply {reply!r}"
        except grpc.RpcError as error:
            return error.code().name

    def terminate(self, wait_s):
        """SIGTERM; waits up to `wait_s`, then SIGKILL. Sets exit_code and
        exit_seconds (None when it had to be killed)."""
        if self.process.poll() is None:
            start = time.monotonic()
            self.process.send_signal(signal.SIGTERM)
            try:
                self.exit_code = self.process.wait(timeout=wait_s)
                self.exit_seconds = time.monotonic() - start
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
                self.exit_code = "killed (did not exit on SIGTERM)"
        elif self.exit_code is None:
            self.exit_code = self.process.returncode
        return self.exit_code

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


class MemorySampler(threading.Thread):
    """Samples the server's VmRSS and thread count every `period` seconds
    and resets VmHWM at the start (clear_refs 5), so that the peak counts
    spikes between samples too. Kills the server past `kill_mb` (to protect
    the machine; the case then fails)."""

    def __init__(self, server, kill_mb, period=0.02):
        super().__init__(daemon=True)
        self.server = server
        self.kill_mb = kill_mb
        self.period = period
        self.peak_rss = 0.0
        self.peak_threads = 0
        self.hwm = None
        self.killed_at_mb = None
        self._done = threading.Event()
        try:
            pathlib.Path(f"/proc/{server.pid}/clear_refs").write_text("5")
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False

    def run(self):
        while not self._done.is_set():
            status = read_status(self.server.pid)
            if status is None:
                return
            self.peak_rss = max(self.peak_rss, status["rss"])
            self.peak_threads = max(self.peak_threads, status["threads"])
            if status["rss"] > self.kill_mb and self.killed_at_mb is None:
                self.killed_at_mb = status["rss"]
                self.server.kill()
                return
            self._done.wait(self.period)

    def stop(self):
        status = read_status(self.server.pid)
        if status is not None:
            self.peak_rss = max(self.peak_rss, status["rss"])
            if self.hwm_reset:
                self.hwm = status["hwm"]
        self._done.set()
        self.join(timeout=2)

    def peak(self):
        return max(self.peak_rss, self.hwm or 0.0)


class Prober:
    """prober.py in a child process; its JSON lines are collected here."""

    def __init__(self, port, stubs, clip_path, clip_rate, deadline=1.0):
        command = [sys.executable, str(HERE / "prober.py"), "--port", str(port), "--stubs", stubs,
                   "--clip", str(clip_path), "--rate", str(clip_rate), "--deadline", str(deadline)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL)
        _children.append(self.process)
        self.records = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.process.stdout:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            with self._lock:
                self.records.append(record)

    def wait_ready(self, timeout=20.0):
        """Waits for a first good round; returns its records (or those that
        failed)."""
        until = time.monotonic() + timeout
        while time.monotonic() < until:
            with self._lock:
                kinds = {r["kind"] for r in self.records if r["ok"]}
                if {"classify", "health"} <= kinds:
                    return True
            if self.process.poll() is not None:
                return False
            time.sleep(0.02)
        return False

    def since(self, t0, t1=float("inf")):
        with self._lock:
            return [r for r in self.records if t0 <= r["t"] <= t1]

    def stop(self):
        try:
            self.process.stdin.close()
        except OSError:
            pass
        try:
            self.process.wait(timeout=3)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        self._reader.join(timeout=2)


class Outcome:
    """How one call ended: code name ('OK', 'INVALID_ARGUMENT', ...),
    details, seconds, and the reply (or None)."""

    def __init__(self, code, details, seconds, reply=None):
        self.code, self.details, self.seconds, self.reply = code, details, seconds, reply

    def __repr__(self):
        details = f" \"{self.details[:100]}\"" if self.details else ""
        return f"{self.code} in {self.seconds:.2f}s{details}"


def timed(fn, *args, **kwargs):
    """Runs a gRPC call and returns its Outcome (never raises RpcError)."""
    start = time.monotonic()
    try:
        reply = fn(*args, **kwargs)
        return Outcome("OK", "", time.monotonic() - start, reply)
    except grpc.RpcError as error:
        code = error.code() if callable(getattr(error, "code", None)) else None
        details = error.details() if callable(getattr(error, "details", None)) else str(error)
        return Outcome(code.name if code else "RPC_ERROR", details or "", time.monotonic() - start)


class Context:
    """What a case sees: the server, stubs, and the means to record checks,
    numbers and the resources to clean up."""

    def __init__(self, server, pb, pb_grpc, normal, scratch):
        self.server = server
        self.port = server.port
        self.target = f"127.0.0.1:{server.port}"
        self.pb = pb
        self.pb_grpc = pb_grpc
        self.normal = normal  # the prober's request (a ClassifyRequest)
        self.scratch = pathlib.Path(scratch)
        self.checks = []  # (label, ok, detail)
        self.numbers = []  # "label value" strings for the summary line
        self.notes = []
        self.expects_exit = False
        self.probing_stopped_at = None
        self._channels = []
        self._sockets = []
        self._threads = []
        self._stop_probes = None
        self.stop = threading.Event()  # set at cleanup: threads should return
        self._channel = None

    # -- recording

    def check(self, label, ok, detail=""):
        self.checks.append((label, bool(ok), detail))
        return ok

    def number(self, text):
        self.numbers.append(text)

    def note(self, text):
        self.notes.append(text)

    def expect(self, label, outcome, codes, within_s, message_words=()):
        """Checks that `outcome` has one of `codes` and came within
        `within_s`; with `message_words`, that the details name one."""
        ok = outcome.code in codes and outcome.seconds <= within_s
        if ok and message_words and outcome.code != "OK":
            ok = any(w.lower() in outcome.details.lower() for w in message_words)
        want = "/".join(codes) + f" within {within_s:g}s"
        return self.check(label, ok, f"{outcome!r} (want {want})")

    # -- resources

    def channel(self, options=(), separate_connection=False):
        """A channel that is closed at the end of the case (which cancels
        its calls). `separate_connection`: its own TCP connection."""
        options = list(options)
        if separate_connection:
            options.append(("grpc.use_local_subchannel_pool", 1))
        channel = grpc.insecure_channel(self.target, options=options)
        self._channels.append(channel)
        return channel

    @property
    def stub(self):
        if self._channel is None:
            self._channel = self.channel()
        return self.pb_grpc.EmotionServiceStub(self._channel)

    def raw_socket(self, port=None, **kwargs):
        from h2 import connect
        sock = connect(port or self.port, **kwargs)
        self._sockets.append(sock)
        return sock

    def tcp(self, port, timeout=2.0):
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self._sockets.append(sock)
        return sock

    def spawn(self, fn, *args):
        """A daemon thread, joined (with a timeout) at the end of the case."""
        thread = threading.Thread(target=self._guarded, args=(fn,) + args, daemon=True)
        self._threads.append(thread)
        thread.start()
        return thread

    def _guarded(self, fn, *args):
        try:
            fn(*args)
        except Exception:  # noqa: BLE001 (a thread's crash becomes a failed check)
            if not self.stop.is_set():
                self.check("thread " + getattr(fn, "__name__", "?"), False,
                           traceback.format_exc().strip().splitlines()[-1])

    def join(self, threads, timeout):
        """Joins `threads` within `timeout` overall; returns how many are
        still running."""
        until = time.monotonic() + timeout
        for thread in threads:
            thread.join(timeout=max(0.0, until - time.monotonic()))
        return sum(t.is_alive() for t in threads)

    def stop_probing(self):
        """For cases that take the server down on purpose."""
        if self._stop_probes is not None:
            self._stop_probes()
        self.probing_stopped_at = time.monotonic()

    def cleanup(self, timeout=8.0):
        self.stop.set()
        for channel in self._channels:
            try:
                channel.close()
            except Exception:  # noqa: BLE001
                pass
        for sock in self._sockets:
            try:
                sock.close()
            except OSError:
                pass
        stragglers = self.join(self._threads, timeout)
        if stragglers:
            self.note(f"{stragglers} client threads still running after cleanup (abandoned)")
