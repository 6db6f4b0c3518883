"""EmoserveClient: typed calls on emoserve.v1.EmotionService."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional, Tuple, Union

import grpc
from google.protobuf import json_format

from emoserve.v1 import emoserve_pb2 as pb
from emoserve.v1 import emoserve_pb2_grpc as pb_grpc

# The server's default --max-message-bytes.
DEFAULT_MAX_MESSAGE_BYTES = 32 << 20

ENCODINGS = {
    None: pb.AUDIO_ENCODING_UNSPECIFIED,
    "linear16": pb.AUDIO_ENCODING_LINEAR16,
    "float32": pb.AUDIO_ENCODING_FLOAT32,
}

Audio = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview]
# "NAME", "NAME:VERSION", or (NAME, VERSION); None: the server's default.
ModelSelector = Union[None, str, Tuple[str, int]]


class EmoserveError(Exception):
    """A call that failed: `code` is the gRPC status code's name
    ("NOT_FOUND", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", ...) and
    `message` the server's explanation."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    @classmethod
    def from_rpc(cls, error: grpc.RpcError) -> "EmoserveError":
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error.details() if hasattr(error, "details") else str(error)
        return cls(code.name, details or "")


@dataclass(frozen=True)
class Score:
    label: str
    probability: float


class _Scored:
    """`probabilities`: label -> probability, most probable first."""

    @property
    def probabilities(self) -> Dict[str, float]:
        return {s.label: s.probability for s in self.scores}


def _scores(scores) -> List[Score]:
    return [Score(s.label, s.probability) for s in scores]


@dataclass(frozen=True)
class Window(_Scored):
    """One window of audio (a timeline entry, or a stream's result)."""
    start_seconds: float
    end_seconds: float
    speech: bool
    scores: List[Score]  # most probable first; empty for a silent window
    speaker_adapted: bool = False  # adapted to the voice's statistics

    @property
    def top_label(self) -> Optional[str]:
        return self.scores[0].label if self.scores else None


@dataclass(frozen=True)
class SpeechEvent:
    kind: str  # "started" or "ended"
    time_seconds: float


@dataclass(frozen=True)
class Utterance(_Scored):
    """A stream's result for one stretch of speech: the mean of its windows."""
    start_seconds: float
    end_seconds: float
    top_label: str
    scores: List[Score]
    window_count: int
    speaker_adapted: bool = False  # at least one of its windows was
    # The voice's statistics after it (streams that adapt): pass them as
    # speaker_statistics to a later call of the same voice.
    speaker_statistics: bytes = b""


@dataclass(frozen=True)
class ClassifyResult(_Scored):
    top_label: str
    scores: List[Score]  # most probable first
    duration_seconds: float
    model_name: str
    model_version: str
    window_count: int
    speech_window_count: int
    timeline: List[Window] = field(default_factory=list)  # with timeline=True
    speaker_adapted: bool = False
    speaker_statistics: bytes = b""  # with return_speaker_statistics=True


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    labels: List[str]
    sample_rate_hertz: int
    window_seconds: float
    default_hop_seconds: float
    features: Dict[str, object]
    device: str
    max_batch_size: int
    speaker_adaptation: bool = False  # the model adapts to a voice's statistics


@dataclass(frozen=True)
class ModelVersion:
    version: int
    state: str  # "loading", "ready" or "failed"
    error: str
    reported_version: str  # what responses' model_version says


@dataclass(frozen=True)
class Model:
    name: str
    versions: List[ModelVersion]
    default_version: int  # the highest ready one; 0 when none is
    is_default: bool  # answers calls that name no model


def _window(w) -> Window:
    return Window(w.start_seconds, w.end_seconds, w.speech, _scores(w.scores), w.speaker_adapted)


def _model(selector: ModelSelector) -> Tuple[str, int]:
    if selector is None:
        return "", 0
    if isinstance(selector, tuple):
        name, version = selector
        return name, int(version)
    name, colon, version = selector.partition(":")
    if colon and not version.isdigit():
        raise ValueError(f"a model is NAME or NAME:VERSION (a positive integer); got {selector!r}")
    return name, int(version) if colon else 0


def _format(encoding: Optional[str], sample_rate_hertz: int, channel_count: int):
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding is one of {sorted(k for k in ENCODINGS if k)} or None "
                         f"(a container: WAV, FLAC, ...); got {encoding!r}")
    if encoding is None:
        return None
    return pb.AudioFormat(encoding=ENCODINGS[encoding], sample_rate_hertz=sample_rate_hertz,
                          channel_count=channel_count)


def _read(audio: Audio) -> bytes:
    if isinstance(audio, (bytes, bytearray, memoryview)):
        return bytes(audio)
    with open(audio, "rb") as f:
        return f.read()


class EmoserveClient:
    """A connection to an emoserve server.

    target: "host:port". TLS: tls=True (or any certificate argument); the
    server's certificate is checked against `root_certificates` (PEM bytes
    or a file; None: the system's roots); `certificate` and `private_key`
    (PEM bytes or files) are the client's, for a server that asks for one
    (--tls-client-ca). `timeout` (seconds) is every call's deadline unless
    a call gives its own.
    """

    def __init__(self, target: str = "localhost:50051", *, tls: bool = False,
                 root_certificates: Union[None, bytes, str] = None,
                 certificate: Union[None, bytes, str] = None,
                 private_key: Union[None, bytes, str] = None,
                 server_name: Optional[str] = None, timeout: float = 60.0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        options = [("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.max_receive_message_length", max_message_bytes)]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        if (certificate is None) != (private_key is None):
            raise ValueError("certificate and private_key go together")
        if tls or root_certificates is not None or certificate is not None:
            pem = lambda v: None if v is None else _read(v)  # noqa: E731
            credentials = grpc.ssl_channel_credentials(
                root_certificates=pem(root_certificates), private_key=pem(private_key),
                certificate_chain=pem(certificate))
            self._channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._stub = pb_grpc.EmotionServiceStub(self._channel)
        self.timeout = timeout

    def __enter__(self) -> "EmoserveClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def classify(self, audio: Audio, *, encoding: Optional[str] = None,
                 sample_rate_hertz: int = 0, channel_count: int = 1,
                 model: ModelSelector = None, hop_seconds: float = 0.0,
                 timeline: bool = False, speaker_statistics: bytes = b"",
                 return_speaker_statistics: bool = False,
                 timeout: Optional[float] = None) -> ClassifyResult:
        """Classifies one recording: a file's path, or its bytes (any
        container the server decodes: WAV, FLAC, Ogg, ...), or raw PCM with
        `encoding` ("linear16", "float32") and `sample_rate_hertz`. With a
        model that adapts (info().speaker_adaptation), `speaker_statistics`
        from an earlier call of the same voice adapt the answer, and
        `return_speaker_statistics` returns them with this recording added."""
        name, version = _model(model)
        request = pb.ClassifyRequest(audio=_read(audio), include_timeline=timeline,
                                     hop_seconds=hop_seconds, model_name=name,
                                     model_version=version,
                                     speaker_statistics=speaker_statistics,
                                     return_speaker_statistics=return_speaker_statistics)
        raw = _format(encoding, sample_rate_hertz, channel_count)
        if raw is not None:
            request.format.CopyFrom(raw)
        reply = self._call(self._stub.Classify, request, timeout)
        return ClassifyResult(
            top_label=reply.top_label, scores=_scores(reply.scores),
            duration_seconds=reply.audio_duration_seconds, model_name=reply.model_name,
            model_version=reply.model_version, window_count=reply.window_count,
            speech_window_count=reply.speech_window_count,
            timeline=[_window(w) for w in reply.timeline],
            speaker_adapted=reply.speaker_adapted,
            speaker_statistics=reply.speaker_statistics)

    def stream(self, chunks: Iterable[bytes], *, encoding: str = "linear16",
               sample_rate_hertz: int = 16000, channel_count: int = 1,
               interim_results: bool = True, hop_seconds: float = 0.0,
               vad_threshold_dbfs: Optional[float] = None, vad: bool = True,
               model: ModelSelector = None, speaker_adaptation: bool = True,
               speaker_statistics: bytes = b"",
               timeout: Optional[float] = None) -> Iterator[Union[Window, SpeechEvent, Utterance]]:
        """Classifies live audio: raw PCM `chunks` (each at most the
        server's --max-chunk-bytes, 64 KiB by default) as they come. Yields
        each window (with interim_results), speech start and end, and each
        utterance's result, in order; raises EmoserveError if the stream
        fails. A model that adapts learns the voice as it listens (unless
        speaker_adaptation=False), starting from `speaker_statistics` when
        given; each Utterance carries the statistics so far."""
        name, version = _model(model)
        config = pb.StreamingConfig(format=_format(encoding, sample_rate_hertz, channel_count),
                                    hop_seconds=hop_seconds, interim_results=interim_results,
                                    model_name=name, model_version=version)
        if vad_threshold_dbfs is not None:
            config.voice_activity.threshold_dbfs = vad_threshold_dbfs
        config.voice_activity.disabled = not vad
        config.speaker_adaptation.disabled = not speaker_adaptation
        config.speaker_adaptation.speaker_statistics = speaker_statistics

        def requests():
            yield pb.StreamClassifyRequest(config=config)
            for chunk in chunks:
                yield pb.StreamClassifyRequest(audio=bytes(chunk))

        try:
            for reply in self._stub.StreamClassify(requests(), timeout=self._timeout(timeout)):
                kind = reply.WhichOneof("result")
                if kind == "window":
                    yield _window(reply.window)
                elif kind == "speech_event":
                    started = reply.speech_event.type == pb.SpeechEvent.SPEECH_STARTED
                    yield SpeechEvent("started" if started else "ended",
                                      reply.speech_event.time_seconds)
                elif kind == "utterance":
                    u = reply.utterance
                    yield Utterance(u.start_seconds, u.end_seconds, u.top_label,
                                    _scores(u.scores), u.window_count, u.speaker_adapted,
                                    u.speaker_statistics)
        except grpc.RpcError as error:
            raise EmoserveError.from_rpc(error) from None

    def info(self, model: ModelSelector = None, *, timeout: Optional[float] = None) -> ModelInfo:
        """The model (by default the server's default model) and its input."""
        name, version = _model(model)
        reply = self._call(self._stub.GetModelInfo,
                           pb.GetModelInfoRequest(model_name=name, model_version=version),
                           timeout)
        return ModelInfo(name=reply.name, version=reply.version, labels=list(reply.labels),
                         sample_rate_hertz=reply.sample_rate_hertz,
                         window_seconds=reply.window_seconds,
                         default_hop_seconds=reply.default_hop_seconds,
                         features=json_format.MessageToDict(reply.features),
                         device=reply.device, max_batch_size=reply.max_batch_size,
                         speaker_adaptation=reply.speaker_adaptation)

    def models(self, *, timeout: Optional[float] = None) -> List[Model]:
        """Every model the server has, with its versions and their states."""
        reply = self._call(self._stub.ListModels, pb.ListModelsRequest(), timeout)
        state = {pb.MODEL_STATE_LOADING: "loading", pb.MODEL_STATE_READY: "ready",
                 pb.MODEL_STATE_FAILED: "failed"}
        return [Model(m.name,
                      [ModelVersion(v.version, state.get(v.state, "unknown"), v.error,
                                    v.reported_version) for v in m.versions],
                      m.default_version, m.is_default)
                for m in reply.models]

    def health(self, *, timeout: Optional[float] = None) -> str:
        """grpc.health.v1 Check: "SERVING" once the models are loaded,
        "NOT_SERVING" while loading or shutting down."""
        check = self._channel.unary_unary("/grpc.health.v1.Health/Check")
        # An empty request (every service); the reply's field 1 is the status.
        reply = self._call(check, b"", timeout)
        status = reply[1] if len(reply) >= 2 and reply[0] == 0x08 else 0
        return {1: "SERVING", 2: "NOT_SERVING"}.get(status, "UNKNOWN")

    def _timeout(self, timeout: Optional[float]) -> Optional[float]:
        return self.timeout if timeout is None else timeout

    def _call(self, method, request, timeout):
        try:
            return method(request, timeout=self._timeout(timeout))
        except grpc.RpcError as error:
            raise EmoserveError.from_rpc(error) from None
