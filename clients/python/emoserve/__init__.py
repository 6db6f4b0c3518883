"""Python client of emoserve: speech emotion recognition over gRPC.

    from emoserve import EmoserveClient
    with EmoserveClient("localhost:50051") as client:
        result = client.classify("clip.wav")
        print(result.top_label, result.probabilities)
"""
from emoserve.client import (
    ClassifyResult,
    EmoserveClient,
    EmoserveError,
    Model,
    ModelInfo,
    ModelVersion,
    Score,
    SpeechEvent,
    Utterance,
    Window,
)

__all__ = [
    "ClassifyResult",
    "EmoserveClient",
    "EmoserveError",
    "Model",
    "ModelInfo",
    "ModelVersion",
    "Score",
    "SpeechEvent",
    "Utterance",
    "Window",
]
