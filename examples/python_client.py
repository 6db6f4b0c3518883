#!/usr/bin/python3
"""A first session with the Python client, cell by cell (paste the cells into
a notebook, or run the file against a running server):

    build/release/server/emoserve-server &      # or the container image
    PYTHONPATH=clients/python examples/python_client.py [HOST:PORT]

Needs Debian's python3-grpcio and python3-protobuf (or `pip install
clients/python`).
"""
import pathlib
import sys
import wave

from emoserve import EmoserveClient, SpeechEvent, Utterance, Window

target = sys.argv[1] if len(sys.argv) > 1 else "localhost:50051"
clip = pathlib.Path(__file__).with_name("hello.wav")

# %% Connect, and see what the server serves.
client = EmoserveClient(target)
print("health:", client.health())
info = client.info()
print(f"model {info.name} {info.version}: {info.labels}, "
      f"{info.window_seconds} s windows at {info.sample_rate_hertz} Hz")
for model in client.models():
    print("  ", model.name, [(v.version, v.state) for v in model.versions])

# %% One recording: the top emotion, every probability, and the timeline.
result = client.classify(clip, timeline=True)
print(f"{clip.name}: {result.top_label} ({result.scores[0].probability:.2f})")
for label, probability in result.probabilities.items():
    print(f"  {label:10s} {probability:.3f}")
for window in result.timeline:
    print(f"  {window.start_seconds:5.2f}-{window.end_seconds:5.2f} s  {window.top_label}")

# %% Live audio: raw 16-bit PCM in 100 ms chunks, results as they come.
with wave.open(str(clip), "rb") as w:
    rate, pcm = w.getframerate(), w.readframes(w.getnframes())
chunk = rate * 2 // 10
for event in client.stream((pcm[i:i + chunk] for i in range(0, len(pcm), chunk)),
                           sample_rate_hertz=rate):
    if isinstance(event, Window):
        print(f"window {event.start_seconds:5.2f} s: {event.top_label}")
    elif isinstance(event, SpeechEvent):
        print(f"speech {event.kind} at {event.time_seconds:.2f} s")
    elif isinstance(event, Utterance):
        print(f"utterance {event.start_seconds:.2f}-{event.end_seconds:.2f} s: {event.top_label}")

client.close()
