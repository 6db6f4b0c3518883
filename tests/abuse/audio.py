"""Audio for the abuse suite, written in Python (numpy only): speech-like
PCM, and containers built byte by byte (WAV, FLAC, AU, CAF, AIFF) so that
headers can lie."""
import struct
import sys

import numpy as np


# --------------------------------------------------------------------------
# Signals

def speech_like(seconds, rate=16000, seed=1):
    """A voiced signal with a wandering pitch, formant-like harmonics and a
    syllabic (4 Hz) envelope: the model sees speech in every window."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    pitch = 140 + 30 * np.sin(2 * np.pi * 0.7 * t) + 10 * np.sin(2 * np.pi * 3.1 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    voice = sum(np.sin(k * phase) / k * (1.5 if 3 <= k <= 5 else 1.0) for k in range(1, 12))
    envelope = 0.35 + 0.65 * np.clip(np.sin(2 * np.pi * 4.0 * t), 0, None) ** 0.5
    signal = 0.15 * voice * envelope + 0.005 * rng.standard_normal(t.size)
    return np.clip(signal, -1, 1).astype(np.float32)


def noise(seconds, rate=16000, level=0.2, seed=2):
    rng = np.random.default_rng(seed)
    return np.clip(level * rng.standard_normal(int(seconds * rate)), -1, 1).astype(np.float32)


def linear16(samples):
    """float [-1, 1] -> raw s16le bytes."""
    return (np.clip(np.asarray(samples), -1, 1) * 32767).astype("<i2").tobytes()


def float32le(samples):
    return np.asarray(samples, dtype="<f4").tobytes()


def tiled_bytes(unit, size):
    """`size` bytes made by repeating `unit` (cheap for hundreds of MB)."""
    reps = size // len(unit) + 1
    return (unit * reps)[:size]


# --------------------------------------------------------------------------
# WAV

def wav(pcm, rate, channels=1, bits=16, float_format=False, riff_size=None,
        data_size=None, block_align=None, byte_rate=None):
    """A RIFF/WAVE file around `pcm`; any size field may be overridden to lie."""
    fmt_tag = 3 if float_format else 1
    block_align = block_align if block_align is not None else (channels * bits // 8) & 0xFFFF
    byte_rate = byte_rate if byte_rate is not None else (rate * channels * bits // 8) & 0xFFFFFFFF
    fmt = struct.pack("<HHIIHH", fmt_tag, channels & 0xFFFF, rate & 0xFFFFFFFF, byte_rate,
                      block_align, bits)
    data_size = len(pcm) if data_size is None else data_size
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"data" + struct.pack("<I", data_size & 0xFFFFFFFF) + pcm
    riff_size = len(body) if riff_size is None else riff_size
    return b"RIFF" + struct.pack("<I", riff_size & 0xFFFFFFFF) + body


# --------------------------------------------------------------------------
# Other containers the server is not documented to take (README: WAV, FLAC,
# OGG/Vorbis, MP3; nothing else)

def au(pcm_s16le, rate, channels=1):
    """Sun/NeXT .au: big-endian 16-bit linear PCM."""
    data = np.frombuffer(pcm_s16le, dtype="<i2").astype(">i2").tobytes()
    return struct.pack(">4sIIIII", b".snd", 24, len(data), 3, rate, channels) + data


def caf(pcm_s16le, rate, channels=1):
    """Apple Core Audio Format, lpcm little-endian 16-bit."""
    desc = struct.pack(">d4sIIIII", float(rate), b"lpcm", 2,  # kCAFLinearPCMFormatFlagIsLittleEndian
                       2 * channels, 1, channels, 16)
    data = struct.pack(">I", 0) + pcm_s16le
    return (b"caff" + struct.pack(">HH", 1, 0)
            + b"desc" + struct.pack(">q", len(desc)) + desc
            + b"data" + struct.pack(">q", len(data)) + data)


def _extended80(value):
    """IEEE 754 80-bit extended (AIFF's sample rate)."""
    exponent = 16383 + 63
    mantissa = int(value)
    while mantissa and not mantissa & (1 << 63):
        mantissa <<= 1
        exponent -= 1
    return struct.pack(">HQ", exponent, mantissa)


def aiff(pcm_s16le, rate, channels=1):
    data = np.frombuffer(pcm_s16le, dtype="<i2").astype(">i2").tobytes()
    frames = len(data) // (2 * channels)
    comm = struct.pack(">hIh", channels, frames, 16) + _extended80(rate)
    ssnd = struct.pack(">II", 0, 0) + data
    body = (b"AIFF" + b"COMM" + struct.pack(">I", len(comm)) + comm
            + b"SSND" + struct.pack(">I", len(ssnd)) + ssnd)
    return b"FORM" + struct.pack(">I", len(body)) + body


# --------------------------------------------------------------------------
# FLAC (fixed block size; CONSTANT subframes for constant blocks, VERBATIM
# otherwise): enough to make long silent files small without sox.

def _crc8(data):
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


_CRC16_TABLE = []
for _i in range(256):
    _c = _i << 8
    for _ in range(8):
        _c = ((_c << 1) ^ 0x8005) & 0xFFFF if _c & 0x8000 else (_c << 1) & 0xFFFF
    _CRC16_TABLE.append(_c)


def _crc16(data):
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC16_TABLE[(crc >> 8) ^ byte]
    return crc


def _utf8_number(n):
    """FLAC's UTF-8-like coding of the frame number."""
    if n < 0x80:
        return bytes([n])
    for length in range(2, 8):
        if n < (1 << (5 * length + 1)):
            break
    out = []
    for _ in range(length - 1):
        out.append(0x80 | (n & 0x3F))
        n >>= 6
    first = ((0xFF << (8 - length)) & 0xFF) | n
    return bytes([first] + out[::-1])


_RATE_CODES = {88200: 1, 176400: 2, 192000: 3, 8000: 4, 16000: 5, 22050: 6, 24000: 7,
               32000: 8, 44100: 9, 48000: 10, 96000: 11}


def _flac_frame(number, block, rate):
    """One mono 16-bit frame; `block` is an int16 array."""
    if block.size == 4608:
        size_code, size_extra = 5, b""
    else:
        size_code, size_extra = 7, struct.pack(">H", block.size - 1)
    rate_code = _RATE_CODES.get(rate, 0)
    header = bytes([0xFF, 0xF8, (size_code << 4) | rate_code, (0 << 4) | (4 << 1)])
    header += _utf8_number(number) + size_extra
    header += bytes([_crc8(header)])
    if (block == block[0]).all():
        subframe = b"\x00" + struct.pack(">h", int(block[0]))  # CONSTANT
    else:
        subframe = b"\x02" + block.astype(">i2").tobytes()  # VERBATIM
    frame = header + subframe
    return frame + struct.pack(">H", _crc16(frame))


def flac(samples_int16, rate, block_size=4608):
    """Mono 16-bit FLAC of `samples_int16`."""
    samples = np.asarray(samples_int16, dtype=np.int16)
    return _flac_write(rate, samples.size, block_size,
                       lambda start, n: samples[start:start + n])


def flac_silence(seconds, rate, block_size=4608):
    """Mono 16-bit FLAC of digital silence: ~12 bytes per 4608 samples."""
    total = int(round(seconds * rate))
    zeros = np.zeros(block_size, dtype=np.int16)
    return _flac_write(rate, total, block_size, lambda start, n: zeros[:n])


def _flac_write(rate, total, block_size, block_at):
    streaminfo = struct.pack(">HH", block_size, block_size) + b"\0" * 6
    # 20 bits rate, 3 bits channels-1, 5 bits bps-1, 36 bits total samples.
    packed = (rate << 44) | (0 << 41) | (15 << 36) | total
    streaminfo += packed.to_bytes(8, "big") + b"\0" * 16
    out = [b"fLaC", bytes([0x80]) + len(streaminfo).to_bytes(3, "big"), streaminfo]
    for number, start in enumerate(range(0, total, block_size)):
        out.append(_flac_frame(number, block_at(start, min(block_size, total - start)), rate))
    return b"".join(out)


if __name__ == "__main__":
    # Writes a sample of each container to the directory given (to check by
    # hand with other decoders).
    import pathlib
    where = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    pcm = linear16(speech_like(2.0))
    for name, data in {"speech.wav": wav(pcm, 16000), "speech.au": au(pcm, 16000),
                       "speech.caf": caf(pcm, 16000), "speech.aiff": aiff(pcm, 16000),
                       "speech.flac": flac(np.frombuffer(pcm, "<i2"), 16000),
                       "silence.flac": flac_silence(5.0, 192000)}.items():
        (where / name).write_bytes(data)
