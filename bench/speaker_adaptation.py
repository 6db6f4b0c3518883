#!/usr/bin/python3
"""What speaker adaptation costs a served call, measured side by side.

Starts emoserve-server with models/speaker-adaptive and, for each RAVDESS
clip of actors 21-24 in turn, makes three Classify calls one after another
(so that load and noise hit all three alike):

  plain       no speaker statistics
  returning   return_speaker_statistics (the batch also runs summary())
  adapted     the speaker's statistics from the actor's other clips, and
              returning them (summary() and adapted() in the batch)

Then streams each actor's clips joined (60 clips, about 3.5 minutes, sent
as fast as the server takes them) with adaptation off and on, alternately,
three times. Reports medians and their ratios to the unadapted call, as a
markdown table and its JSON. Needs python3-grpcio, python3-protobuf and
python3-soundfile.

  bench/speaker_adaptation.py --server build/release/server/emoserve-server \\
      --data ../shared/datasets/ravdess --out bench/results/speaker_adaptation
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy
import soundfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "clients", "python"))
sys.path.insert(0, os.path.join(ROOT, "tests", "python"))
from emoserve import EmoserveClient  # noqa: E402
from support import ServerProcess, stop_and_clean  # noqa: E402

RATE = 16000
CHUNK = RATE * 2 // 10  # 100 ms of LINEAR16


def clips_by_actor(data, actors):
    out = {actor: [] for actor in actors}
    with open(os.path.join(data, "manifest.tsv")) as manifest:
        header = manifest.readline().rstrip("\n").split("\t")
        for line in manifest:
            row = dict(zip(header, line.rstrip("\n").split("\t")))
            actor = int(row["actor"])
            if actor in out:
                out[actor].append(os.path.join(data, row["path"]))
    return out


def linear16(path):
    samples, rate = soundfile.read(path, dtype="float32")
    assert rate == RATE, f"{path}: {rate} Hz"
    return (numpy.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


def timed(call):
    start = time.perf_counter()
    result = call()
    return time.perf_counter() - start, result


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True, help="path without extension")
    parser.add_argument("--model", default=os.path.join(ROOT, "models", "speaker-adaptive"))
    args = parser.parse_args()

    actors = clips_by_actor(args.data, [21, 22, 23, 24])
    scratch = tempfile.mkdtemp(prefix="emoserve_adaptation_bench_")
    server = ServerProcess(args.server, scratch, ["--model", args.model, "--feature-threads", "2"])
    calls = {"plain": [], "returning": [], "adapted": []}
    streams = {"off": [], "on": []}
    stream_seconds = 0.0
    try:
        with EmoserveClient(server.address, timeout=300) as client:
            for actor, paths in actors.items():
                # The actor's statistics from the first 20 clips (about 70 s).
                statistics_blob = b""
                for path in paths[:20]:
                    statistics_blob = client.classify(
                        path, speaker_statistics=statistics_blob,
                        return_speaker_statistics=True).speaker_statistics
                for i, path in enumerate(paths):
                    audio = open(path, "rb").read()
                    seconds, _ = timed(lambda: client.classify(audio))
                    calls["plain"].append(seconds)
                    seconds, _ = timed(lambda: client.classify(audio, return_speaker_statistics=True))
                    calls["returning"].append(seconds)
                    seconds, result = timed(lambda: client.classify(
                        audio, speaker_statistics=statistics_blob, return_speaker_statistics=True))
                    assert result.speaker_adapted
                    calls["adapted"].append(seconds)
                print(f"actor {actor}: {len(paths)} clips x 3 calls", file=sys.stderr, flush=True)
            pcm = b"".join(linear16(path) for path in actors[21])
            stream_seconds = len(pcm) / 2 / RATE
            for repeat in range(3):
                for mode in ("off", "on"):
                    chunks = (pcm[i:i + CHUNK] for i in range(0, len(pcm), CHUNK))
                    seconds, results = timed(lambda: list(client.stream(
                        chunks, interim_results=True, speaker_adaptation=(mode == "on"))))
                    adapted = sum(getattr(r, "speaker_adapted", False) for r in results)
                    assert (adapted > 0) == (mode == "on"), (mode, adapted)
                    streams[mode].append(seconds)
                print(f"stream round {repeat + 1}/3", file=sys.stderr, flush=True)
    finally:
        stop_and_clean(server, scratch)

    base = statistics.median(calls["plain"])
    report = {"model": os.path.relpath(args.model, ROOT), "clips": len(calls["plain"]),
              "classify_median_ms": {k: 1000 * statistics.median(v) for k, v in calls.items()},
              "classify_ratio": {k: statistics.median(v) / base for k, v in calls.items()},
              "stream_audio_seconds": stream_seconds,
              "stream_median_seconds": {k: statistics.median(v) for k, v in streams.items()}}
    off, on = (report["stream_median_seconds"][k] for k in ("off", "on"))
    lines = [
        "# Speaker adaptation: what it costs a call",
        "",
        f"`bench/speaker_adaptation.py`, {report['model']}, one call at a time, "
        f"{report['clips']} clips of actors 21-24 (medians; each clip's three calls back to back).",
        "",
        "| Classify | median ms | vs plain |",
        "|---|---|---|",
    ]
    for name in ("plain", "returning", "adapted"):
        lines.append(f"| {name} | {report['classify_median_ms'][name]:.2f} | "
                     f"{report['classify_ratio'][name]:.2f}x |")
    lines += [
        "",
        f"| StreamClassify, {stream_seconds:.0f} s of actor 21 as fast as taken | median s | "
        "x real time |",
        "|---|---|---|",
        f"| adaptation off | {off:.2f} | {stream_seconds / off:.0f} |",
        f"| adaptation on | {on:.2f} | {stream_seconds / on:.0f} |",
        "",
    ]
    with open(args.out + ".json", "w") as out:
        json.dump(report, out, indent=1)
    with open(args.out + ".md", "w") as out:
        out.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
