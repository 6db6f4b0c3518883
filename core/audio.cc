#include "core/audio.h"

#include <sndfile.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <optional>
#include <string_view>
#include <system_error>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "core/resampler.h"

// Here a frame is a PCM frame, libsndfile's term: one sample of every
// channel (an MP3 frame is named as such). Features' frames are STFT frames.

namespace emoserve {
namespace {

// Frames decoded per libsndfile call: bounds the interleaved scratch buffer
// (at most 4096 * 64 floats = 1 MiB) whatever the file declares.
constexpr sf_count_t kChunkFrames = 4096;

// The most source frames per input byte that a compressed file's declared
// length may reserve up front (16 frames a byte: 8 kbit/s MP3 at 8 kHz, or
// FLAC at 16:1); longer audio grows the buffer as it decodes.
constexpr double kMaxExpectedCompression = 16.0;

// A WAV data-chunk size of 0xFFFFFFFF means "unknown length" (written by
// streaming encoders that cannot seek back); the data runs to end of file.
constexpr uint32_t kWavStreamingDataSize = 0xFFFFFFFF;

constexpr char kSupportedFormats[] =
    "expected WAV, FLAC, OGG/Vorbis or MP3, or raw PCM with its encoding, "
    "sample rate and channel count declared";

// An unsigned little-endian integer of `bytes` (<= 4) bytes.
uint32_t LoadLe(const unsigned char* p, int bytes) {
  uint32_t v = 0;
  for (int i = bytes - 1; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

// ValidateSampleRate for rates read from headers, which may exceed int.
absl::Status CheckSampleRate(int64_t sample_rate) {
  if (sample_rate < kMinSampleRate || sample_rate > kMaxSampleRate) {
    return absl::InvalidArgumentError(absl::StrCat(
        "sample rate ", sample_rate, " Hz is not supported; it must be in ",
        kMinSampleRate, "..", kMaxSampleRate, " Hz"));
  }
  return absl::OkStatus();
}

absl::Status ValidateChannels(int channels, const char* what) {
  if (channels < 1 || channels > kMaxChannels) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " has ", channels,
                     " channels; the supported range is 1..", kMaxChannels));
  }
  return absl::OkStatus();
}

absl::Status ValidateMaxDuration(double max_duration_seconds) {
  // !(x > 0) also rejects NaN; +inf is allowed and means "no limit".
  if (!(max_duration_seconds > 0)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max_duration_seconds must be positive, got ", max_duration_seconds));
  }
  return absl::OkStatus();
}

// kOutOfRange when `frames` at `sample_rate` exceed the duration limit.
absl::Status CheckDuration(double frames, int sample_rate,
                           double max_duration_seconds) {
  const double seconds = frames / sample_rate;
  if (seconds > max_duration_seconds) {
    return absl::OutOfRangeError(
        absl::StrCat("audio is ", seconds, " s long; the limit is ",
                     max_duration_seconds, " s (send a shorter clip)"));
  }
  return absl::OkStatus();
}

// Why `value` is not an acceptable sample, or null when it is.
const char* SampleProblem(float value) {
  if (std::isnan(value)) return "NaN";
  if (std::isinf(value)) return "Inf";
  if (std::fabs(value) > kMaxSampleMagnitude) return "absurd";
  return nullptr;
}

absl::Status SampleError(const char* problem, float value, size_t index,
                         std::optional<int> channel) {
  const std::string where = absl::StrCat(
      "at sample index ", index,
      channel.has_value() ? absl::StrCat(" (channel ", *channel, ")") : "");
  if (std::string_view(problem) == "absurd") {
    return absl::InvalidArgumentError(absl::StrCat(
        "audio contains a sample of ", value, " ", where, ", beyond +-",
        kMaxSampleMagnitude,
        " (60 dB over full scale, which is +-1); the data is corrupt or not "
        "normalised"));
  }
  return absl::InvalidArgumentError(
      absl::StrCat("audio contains a non-finite sample (", problem, ") ",
                   where, "; the data is corrupt"));
}

// Checks `interleaved` (whole frames) and writes the channel average of each
// frame to `mono` (replacing its contents). `first_frame` is the index of the
// first frame in the whole stream, for error messages.
absl::Status MixToMono(absl::Span<const float> interleaved, int channels,
                       size_t first_frame, std::vector<float>* mono) {
  const size_t frames = interleaved.size() / channels;
  mono->resize(frames);
  for (size_t f = 0; f < frames; ++f) {
    const float* frame = interleaved.data() + f * channels;
    double sum = 0.0;
    for (int c = 0; c < channels; ++c) {
      if (const char* problem = SampleProblem(frame[c])) {
        return SampleError(problem, frame[c], first_frame + f, c);
      }
      sum += frame[c];
    }
    (*mono)[f] = static_cast<float>(sum / channels);
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------
// The result: mono blocks at the source rate in, the decoded (and resampled)
// signal out, its buffer grown only through options.reserve.

class AudioBuilder {
 public:
  static absl::StatusOr<AudioBuilder> Create(int source_rate,
                                             const DecodeOptions& options) {
    if (absl::Status s = ValidateSampleRate(source_rate); !s.ok()) return s;
    AudioBuilder builder(source_rate, options);
    if (builder.audio_.sample_rate != source_rate) {
      absl::StatusOr<std::unique_ptr<StreamResampler>> resampler =
          StreamResampler::Create(source_rate, builder.audio_.sample_rate);
      if (!resampler.ok()) return resampler.status();
      builder.resampler_ = *std::move(resampler);
    }
    return builder;
  }

  // Reserves room for the output of `frames` source frames (a header's
  // count or an estimate; never more than the duration limit allows).
  absl::Status Expect(double frames) {
    frames = std::min(frames, max_frames_);
    if (!(frames > 0)) return absl::OkStatus();
    return Grow(static_cast<size_t>(std::ceil(frames * ratio_)) + Slack(),
                /*exact=*/true);
  }

  // Appends a block of mono samples at the source rate.
  absl::Status Append(absl::Span<const float> block) {
    if (options_->keep_going) {
      if (absl::Status s = options_->keep_going(); !s.ok()) return s;
    }
    frames_ += block.size();
    if (static_cast<double>(frames_) > max_frames_) {
      return absl::OutOfRangeError(absl::StrCat(
          "audio is longer than the limit of ", options_->max_duration_seconds,
          " s (send a shorter clip)"));
    }
    if (resampler_ == nullptr) return Put(block);
    resampled_.clear();
    if (absl::Status s = resampler_->Process(block, &resampled_); !s.ok()) {
      return s;
    }
    return Put(resampled_);
  }

  int64_t frames() const { return static_cast<int64_t>(frames_); }

  absl::StatusOr<Audio> Finish() && {
    if (resampler_ != nullptr) {
      resampled_.clear();
      if (absl::Status s = resampler_->Flush(&resampled_); !s.ok()) return s;
      if (absl::Status s = Put(resampled_); !s.ok()) return s;
    }
    audio_.source_samples = static_cast<int64_t>(frames_);
    if (audio_.samples.empty() && frames_ > 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "the audio is too short: ", frames_, " samples at ", audio_.source_sample_rate,
          " Hz make none at ", audio_.sample_rate, " Hz"));
    }
    return std::move(audio_);
  }

 private:
  AudioBuilder(int source_rate, const DecodeOptions& options)
      : options_(&options),
        max_frames_(options.max_duration_seconds * source_rate) {
    audio_.source_sample_rate = source_rate;
    audio_.sample_rate = options.output_sample_rate > 0
                             ? options.output_sample_rate
                             : source_rate;
    ratio_ = static_cast<double>(audio_.sample_rate) / source_rate;
  }

  // Output beyond frames * ratio: resampling rounds, and its filter's tail
  // comes out at the end.
  size_t Slack() const { return resampler_ == nullptr ? 0 : 64; }

  absl::Status Put(absl::Span<const float> samples) {
    const size_t needed = audio_.samples.size() + samples.size();
    if (absl::Status s = Grow(needed, /*exact=*/false); !s.ok()) return s;
    audio_.samples.insert(audio_.samples.end(), samples.begin(), samples.end());
    return absl::OkStatus();
  }

  // Makes room for `needed` samples: exactly, or with half the current
  // capacity again when the length was not known, but never more than the
  // duration limit allows.
  absl::Status Grow(size_t needed, bool exact) {
    const size_t capacity = audio_.samples.capacity();
    if (needed <= capacity) return absl::OkStatus();
    size_t target = needed;
    if (!exact) {
      const double most = std::ceil(max_frames_ * ratio_) + Slack();
      target = std::max(needed, static_cast<size_t>(std::min<double>(
                                    capacity + capacity / 2, most)));
    }
    if (options_->reserve) {
      if (absl::Status s = options_->reserve(target); !s.ok()) return s;
    }
    audio_.samples.reserve(target);
    return absl::OkStatus();
  }

  const DecodeOptions* options_;
  double max_frames_;  // the duration limit in source frames
  double ratio_ = 1.0;
  Audio audio_;
  std::unique_ptr<StreamResampler> resampler_;  // null when rates match
  std::vector<float> resampled_;                // one block's output
  size_t frames_ = 0;                           // source frames so far
};

// ---------------------------------------------------------------------------
// Raw PCM.

// Little-endian bytes to float, independent of the host byte order.
float SampleFromLe(const unsigned char* p, PcmEncoding encoding) {
  switch (encoding) {
    case PcmEncoding::kS16LE:
      return static_cast<int16_t>(LoadLe(p, 2)) / 32768.0f;
    case PcmEncoding::kF32LE: {
      const uint32_t bits = LoadLe(p, 4);
      float value;
      std::memcpy(&value, &bits, sizeof(value));
      return value;
    }
  }
  return 0.0f;
}

absl::StatusOr<Audio> DecodeRawPcm(std::string_view bytes,
                                   const RawPcmFormat& format,
                                   const DecodeOptions& options) {
  if (absl::Status s = ValidateRawPcmFormat(format); !s.ok()) return s;
  const bool is_s16 = format.encoding == PcmEncoding::kS16LE;
  const int sample_bytes = is_s16 ? 2 : 4;
  const size_t frame_bytes =
      static_cast<size_t>(sample_bytes) * format.channels;
  if (bytes.size() % frame_bytes != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("raw ", is_s16 ? "s16le" : "f32le", " PCM with ",
                     format.channels, " channel(s) needs a multiple of ",
                     frame_bytes, " bytes (one frame); got ", bytes.size(),
                     " bytes, so the last frame is incomplete"));
  }
  const size_t frames = bytes.size() / frame_bytes;
  // From the byte count alone, before converting anything.
  if (absl::Status s =
          CheckDuration(static_cast<double>(frames), format.sample_rate,
                        options.max_duration_seconds);
      !s.ok()) {
    return s;
  }
  absl::StatusOr<AudioBuilder> builder =
      AudioBuilder::Create(format.sample_rate, options);
  if (!builder.ok()) return builder.status();
  if (absl::Status s = builder->Expect(static_cast<double>(frames)); !s.ok()) {
    return s;
  }
  const auto* data = reinterpret_cast<const unsigned char*>(bytes.data());
  std::vector<float> chunk;
  std::vector<float> mono;
  for (size_t start = 0; start < frames; start += kChunkFrames) {
    const size_t n = std::min<size_t>(kChunkFrames, frames - start);
    chunk.resize(n * format.channels);
    for (size_t i = 0; i < chunk.size(); ++i) {
      chunk[i] = SampleFromLe(
          data + (start * format.channels + i) * sample_bytes, format.encoding);
    }
    if (absl::Status s = MixToMono(chunk, format.channels, start, &mono);
        !s.ok()) {
      return s;
    }
    if (absl::Status s = builder->Append(mono); !s.ok()) return s;
  }
  return std::move(*builder).Finish();
}

// ---------------------------------------------------------------------------
// RIFF/WAVE header. libsndfile silently shrinks the frame count of a WAV
// whose data chunk runs past the end of the file, so a truncated upload
// would decode "successfully"; we read the declared sizes ourselves.

struct WavHeader {
  uint16_t format_tag = 0;  // WAVE_FORMAT_*; the sub-format's for EXTENSIBLE
  int channels = 0;
  uint32_t sample_rate = 0;
  uint32_t block_align = 0;
  bool has_fmt = false;
  uint32_t data_size = 0;       // As declared.
  uint64_t data_available = 0;  // Bytes actually present after the header.
  bool has_data = false;
};

// Returns nullopt unless `bytes` is a little-endian RIFF/WAVE file; then
// walks the chunk list up to the data chunk. Anything it cannot follow is
// left for libsndfile to judge.
std::optional<WavHeader> ParseWavHeader(std::string_view bytes) {
  if (bytes.size() < 12 || bytes.substr(0, 4) != "RIFF" ||
      bytes.substr(8, 4) != "WAVE") {
    return std::nullopt;
  }
  const auto* data = reinterpret_cast<const unsigned char*>(bytes.data());
  WavHeader header;
  uint64_t pos = 12;
  while (pos + 8 <= bytes.size()) {
    const std::string_view id = bytes.substr(pos, 4);
    const uint32_t size = LoadLe(data + pos + 4, 4);
    const uint64_t body = pos + 8;
    if (id == "fmt " && size >= 16 && body + 16 <= bytes.size()) {
      header.has_fmt = true;
      header.format_tag = static_cast<uint16_t>(LoadLe(data + body, 2));
      // WAVE_FORMAT_EXTENSIBLE names the encoding in its sub-format GUID,
      // whose first two bytes are the plain format tag.
      if (header.format_tag == 0xFFFE && size >= 40 &&
          body + 26 <= bytes.size()) {
        header.format_tag = static_cast<uint16_t>(LoadLe(data + body + 24, 2));
      }
      header.channels = static_cast<int>(LoadLe(data + body + 2, 2));
      header.sample_rate = LoadLe(data + body + 4, 4);
      header.block_align = LoadLe(data + body + 12, 2);
    } else if (id == "data") {
      header.has_data = true;
      header.data_size = size;
      header.data_available = bytes.size() - body;
      break;
    }
    pos = body + size + (size & 1);  // Chunks are padded to even length.
  }
  return header;
}

// WAV encodings that reach libsndfile: PCM, float, A-law and mu-law. ADPCM,
// GSM and the other codecs are rare in uploads and each is decoder code an
// attacker could aim at.
absl::Status CheckWavEncoding(uint16_t format_tag) {
  switch (format_tag) {
    case 0x0001:  // PCM
    case 0x0003:  // IEEE float
    case 0x0006:  // A-law
    case 0x0007:  // mu-law
      return absl::OkStatus();
    default:
      return absl::InvalidArgumentError(absl::StrFormat(
          "WAV encoding 0x%04x is not supported; WAV must hold PCM, float, "
          "A-law or mu-law samples (convert ADPCM, GSM and other codecs to "
          "PCM, FLAC or MP3)",
          format_tag));
  }
}

absl::Status CheckWavHeader(const WavHeader& header,
                            double max_duration_seconds) {
  if (header.has_fmt) {
    if (absl::Status s = CheckWavEncoding(header.format_tag); !s.ok()) {
      return s;
    }
    if (absl::Status s = ValidateChannels(header.channels, "WAV header");
        !s.ok()) {
      return s;
    }
    if (absl::Status s = CheckSampleRate(header.sample_rate); !s.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("WAV header: ", s.message()));
    }
  }
  if (!header.has_data || header.data_size == kWavStreamingDataSize) {
    return absl::OkStatus();
  }
  const uint64_t frame_bytes =
      header.has_fmt && header.block_align > 0 ? header.block_align : 1;
  const uint64_t declared = header.data_size / frame_bytes;
  const uint64_t present =
      std::min<uint64_t>(header.data_size, header.data_available) / frame_bytes;
  if (present < declared) {
    return absl::InvalidArgumentError(absl::StrCat(
        "truncated WAV: the header declares ", declared, " frames but only ",
        present, " are present; send the complete file"));
  }
  if (header.has_fmt) {
    return CheckDuration(static_cast<double>(declared),
                         static_cast<int>(header.sample_rate),
                         max_duration_seconds);
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------
// Ogg/Vorbis headers. libsndfile 1.2.0 leaks libvorbis's codec setup (~6 KB)
// when a Vorbis stream's three header packets are incomplete or corrupt:
// ogg_vorbis_open returns before it registers its close function. A client
// could repeat that at will, so such streams are rejected here first, with
// the checks that libsndfile/libvorbis would fail on.

constexpr size_t kOggPageHeaderBytes = 27;
constexpr size_t kVorbisIdHeaderBytes = 30;

// The CRC-32 of an Ogg page (polynomial 0x04c11db7, MSB first, initial 0),
// computed with its own CRC field taken as zero.
uint32_t OggPageCrc(std::string_view page) {
  uint32_t crc = 0;
  for (size_t i = 0; i < page.size(); ++i) {
    const bool in_crc_field = i >= 22 && i < 26;
    crc ^= static_cast<uint32_t>(
               in_crc_field ? 0 : static_cast<unsigned char>(page[i]))
           << 24;
    for (int bit = 0; bit < 8; ++bit) {
      crc = (crc & 0x80000000u) ? (crc << 1) ^ 0x04c11db7u : crc << 1;
    }
  }
  return crc;
}

// The fields of the Vorbis identification header that libvorbis rejects.
bool IsValidVorbisIdHeader(std::string_view packet) {
  if (packet.size() < kVorbisIdHeaderBytes) return false;
  const auto* p = reinterpret_cast<const unsigned char*>(packet.data());
  const int small_block = p[28] & 0x0F;  // log2 of the block sizes.
  const int large_block = p[28] >> 4;
  return LoadLe(p + 7, 4) == 0 /* version */ && p[11] > 0 /* channels */ &&
         LoadLe(p + 12, 4) > 0 /* rate */ && small_block >= 6 &&
         large_block >= small_block && large_block <= 13 &&
         (p[29] & 1) != 0 /* framing */;
}

absl::Status OggError(std::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(
      "truncated or corrupt OGG/Vorbis: ",
      absl::string_view(what.data(), what.size()), "; send the complete file"));
}

// Checks that the first logical stream's first three packets (the Vorbis
// headers) are complete, on intact consecutive pages, and well-formed;
// streams of other codecs are refused.
absl::Status CheckOggVorbisHeaders(std::string_view bytes) {
  const auto* data = reinterpret_cast<const unsigned char*>(bytes.data());
  std::optional<uint32_t> serial;
  uint32_t next_sequence = 0;
  int packets = 0;
  std::string packet;
  static constexpr const char* kHeaderMagic[] = {"\x01vorbis", "\x03vorbis",
                                                 "\x05vorbis"};
  for (size_t pos = 0; packets < 3;) {
    if (pos + kOggPageHeaderBytes > bytes.size()) {
      return OggError("the file ends inside the header pages");
    }
    const unsigned char* header = data + pos;
    if (bytes.substr(pos, 4) != "OggS" || header[4] != 0 /* version */) {
      return OggError("a header page is damaged");
    }
    const size_t segments = header[26];
    const unsigned char* lacing = header + kOggPageHeaderBytes;
    if (pos + kOggPageHeaderBytes + segments > bytes.size()) {
      return OggError("the file ends inside the header pages");
    }
    size_t body_size = 0;
    for (size_t i = 0; i < segments; ++i) body_size += lacing[i];
    const size_t page_size = kOggPageHeaderBytes + segments + body_size;
    if (pos + page_size > bytes.size()) {
      return OggError("the file ends inside the header pages");
    }
    const std::string_view page = bytes.substr(pos, page_size);
    pos += page_size;
    if (OggPageCrc(page) != LoadLe(header + 22, 4)) {
      return OggError("a header page fails its checksum");
    }
    const uint32_t page_serial = LoadLe(header + 14, 4);
    if (!serial.has_value()) {
      if ((header[5] & 0x02) == 0) {
        return OggError("the first page does not begin a stream");
      }
      serial = page_serial;
    }
    if (page_serial != *serial) continue;  // Another multiplexed stream.
    if (LoadLe(header + 18, 4) != next_sequence++) {
      return OggError("a header page is missing");
    }
    size_t offset = kOggPageHeaderBytes + segments;
    for (size_t i = 0; i < segments && packets < 3; ++i) {
      // The checks need only the start of a packet; comment packets can be
      // large (cover art).
      packet.append(page.substr(offset, lacing[i]));
      packet.resize(std::min<size_t>(packet.size(), kVorbisIdHeaderBytes));
      offset += lacing[i];
      if (lacing[i] == 255) continue;  // The packet goes on.
      if (packets == 0 && packet.substr(0, 7) != kHeaderMagic[0]) {
        return absl::InvalidArgumentError(absl::StrCat(
            "could not decode audio: this OGG file holds another codec than "
            "Vorbis (Opus, FLAC, Speex, ...), which is not accepted; ",
            kSupportedFormats));
      }
      if (packet.substr(0, 7) != kHeaderMagic[packets] ||
          (packets == 0 && !IsValidVorbisIdHeader(packet))) {
        return OggError("a Vorbis header is invalid");
      }
      ++packets;
      packet.clear();
    }
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------
// The allow-list: only WAV, FLAC, OGG/Vorbis and MP3 reach libsndfile, which
// knows two dozen other containers (AU, CAF, PAF, MAT, IRCAM, ...) whose
// parsers a client could otherwise aim at. Detected from the first bytes.

enum class Container { kWav, kFlac, kOggVorbis, kMp3 };

// The size of an ID3v2 tag at the start of `bytes` (0 when there is none):
// MP3 and FLAC files may begin with one.
size_t Id3TagSize(std::string_view bytes) {
  if (bytes.size() < 10 || bytes.substr(0, 3) != "ID3") return 0;
  const auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
  size_t size = 0;
  for (int i = 6; i < 10; ++i) {
    if (p[i] & 0x80) return 0;  // Not a syncsafe size: not a tag.
    size = (size << 7) | p[i];
  }
  const bool has_footer = (p[5] & 0x10) != 0;
  return 10 + size + (has_footer ? 10 : 0);
}

// An MPEG-1/2/2.5 Layer III frame header (what libsndfile's mpg123 decodes
// as MP3) at `p` (4 bytes).
bool IsMp3FrameHeader(const unsigned char* p) {
  const int version = (p[1] >> 3) & 3;  // 1 is reserved
  const int layer = (p[1] >> 1) & 3;    // 1 is Layer III
  const int bitrate = p[2] >> 4;        // 15 is invalid
  const int rate = (p[2] >> 2) & 3;     // 3 is reserved
  return p[0] == 0xFF && (p[1] & 0xE0) == 0xE0 && version != 1 && layer == 1 &&
         bitrate != 15 && rate != 3;
}

// Containers that libsndfile would open, named so that the refusal says
// what the client sent.
const char* RefusedContainerName(std::string_view bytes) {
  using namespace std::string_view_literals;  // NOLINT: magics hold NULs
  struct Magic {
    size_t offset;
    std::string_view bytes;
    const char* name;
  };
  static constexpr Magic kMagics[] = {
      {0, ".snd", "AU (Sun/NeXT)"},   {0, "dns.", "AU (Sun/NeXT)"},
      {8, "AIFF", "AIFF"},            {8, "AIFC", "AIFF-C"},
      {0, "caff", "CAF"},             {0, "RF64", "RF64"},
      {0, "BW64", "BW64"},            {0, "RIFX", "big-endian WAV (RIFX)"},
      {0, "riff", "Sony Wave64"},     {0, "MATLAB", "MAT5 (MATLAB)"},
      {0, " paf", "PAF"},             {0, "fap ", "PAF"},
      {0, "Creative Voice File", "VOC"},
      {0, "NIST_1A", "NIST SPHERE"},  {0, "2BIT", "AVR"},
      {0, "wvpk", "WavPack"},         {0, "#!AMR", "AMR"},
      {0, "SDS", "MIDI sample dump"}, {0, "Extended Instrument", "XI"},
      {0, "ajkg", "Shorten"},         {0, "MThd", "MIDI"},
      // IRCAM's four magics, each in both byte orders.
      {0, "\x64\xa3\x01\x00"sv, "IRCAM"}, {0, "\x00\x01\xa3\x64"sv, "IRCAM"},
      {0, "\x64\xa3\x02\x00"sv, "IRCAM"}, {0, "\x00\x02\xa3\x64"sv, "IRCAM"},
      {0, "\x64\xa3\x03\x00"sv, "IRCAM"}, {0, "\x00\x03\xa3\x64"sv, "IRCAM"},
      {0, "\x64\xa3\x04\x00"sv, "IRCAM"}, {0, "\x00\x04\xa3\x64"sv, "IRCAM"},
  };
  for (const Magic& magic : kMagics) {
    if (bytes.size() >= magic.offset + magic.bytes.size() &&
        bytes.substr(magic.offset, magic.bytes.size()) == magic.bytes) {
      return magic.name;
    }
  }
  if (bytes.substr(0, 4) == "RIFF") return "RIFF that is not WAVE";
  return nullptr;
}

absl::StatusOr<Container> DetectContainer(std::string_view bytes) {
  if (bytes.size() >= 12 && bytes.substr(0, 4) == "RIFF" &&
      bytes.substr(8, 4) == "WAVE") {
    return Container::kWav;
  }
  if (bytes.substr(0, 4) == "OggS") return Container::kOggVorbis;
  const size_t tag = Id3TagSize(bytes);
  if (tag < bytes.size()) {
    const std::string_view rest = bytes.substr(tag);
    if (rest.substr(0, 4) == "fLaC") return Container::kFlac;
    if (rest.size() >= 4 &&
        IsMp3FrameHeader(reinterpret_cast<const unsigned char*>(rest.data()))) {
      return Container::kMp3;
    }
  }
  if (const char* name = RefusedContainerName(bytes)) {
    return absl::InvalidArgumentError(
        absl::StrCat("could not decode audio: ", name,
                     " files are not accepted; ", kSupportedFormats));
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "could not decode audio: unrecognised format; ", kSupportedFormats));
}

// What libsndfile opened must be what the first bytes announced.
absl::Status CheckOpenedFormat(Container container, int format) {
  const int major = format & SF_FORMAT_TYPEMASK;
  const int subtype = format & SF_FORMAT_SUBMASK;
  bool matches = false;
  switch (container) {
    case Container::kWav:
      matches = (major == SF_FORMAT_WAV || major == SF_FORMAT_WAVEX) &&
                (subtype == SF_FORMAT_PCM_U8 || subtype == SF_FORMAT_PCM_16 ||
                 subtype == SF_FORMAT_PCM_24 || subtype == SF_FORMAT_PCM_32 ||
                 subtype == SF_FORMAT_FLOAT || subtype == SF_FORMAT_DOUBLE ||
                 subtype == SF_FORMAT_ULAW || subtype == SF_FORMAT_ALAW);
      break;
    case Container::kFlac:
      matches = major == SF_FORMAT_FLAC;
      break;
    case Container::kOggVorbis:
      matches = major == SF_FORMAT_OGG && subtype == SF_FORMAT_VORBIS;
      break;
    case Container::kMp3:
      matches = major == SF_FORMAT_MPEG && subtype == SF_FORMAT_MPEG_LAYER_III;
      break;
  }
  if (matches) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrFormat(
      "could not decode audio: libsndfile read it as format 0x%06x, which is "
      "not accepted; %s",
      format, kSupportedFormats));
}

// ---------------------------------------------------------------------------
// libsndfile over a memory buffer (virtual I/O, read-only).

struct MemoryFile {
  std::string_view bytes;
  sf_count_t position = 0;
};

sf_count_t MemoryLength(void* user) {
  return static_cast<sf_count_t>(static_cast<MemoryFile*>(user)->bytes.size());
}

sf_count_t MemorySeek(sf_count_t offset, int whence, void* user) {
  auto* file = static_cast<MemoryFile*>(user);
  sf_count_t base = 0;
  switch (whence) {
    case SEEK_SET:
      base = 0;
      break;
    case SEEK_CUR:
      base = file->position;
      break;
    case SEEK_END:
      base = static_cast<sf_count_t>(file->bytes.size());
      break;
    default:
      return -1;
  }
  if (offset < -base) return -1;
  file->position = base + offset;  // Past the end is allowed; reads give 0.
  return file->position;
}

sf_count_t MemoryRead(void* ptr, sf_count_t count, void* user) {
  auto* file = static_cast<MemoryFile*>(user);
  const sf_count_t size = static_cast<sf_count_t>(file->bytes.size());
  if (count <= 0 || file->position >= size) return 0;
  const sf_count_t n = std::min(count, size - file->position);
  std::memcpy(ptr, file->bytes.data() + file->position, n);
  file->position += n;
  return n;
}

sf_count_t MemoryWrite(const void*, sf_count_t, void*) { return 0; }

sf_count_t MemoryTell(void* user) {
  return static_cast<MemoryFile*>(user)->position;
}

struct SndfileCloser {
  void operator()(SNDFILE* file) const { sf_close(file); }
};
using SndfilePtr = std::unique_ptr<SNDFILE, SndfileCloser>;

absl::StatusOr<Audio> DecodeWithSndfile(std::string_view bytes,
                                        const DecodeOptions& options) {
  absl::StatusOr<Container> container = DetectContainer(bytes);
  if (!container.ok()) return container.status();
  if (*container == Container::kWav) {
    if (std::optional<WavHeader> wav = ParseWavHeader(bytes)) {
      if (absl::Status s = CheckWavHeader(*wav, options.max_duration_seconds);
          !s.ok()) {
        return s;
      }
    }
  }
  if (*container == Container::kOggVorbis) {
    if (absl::Status s = CheckOggVorbisHeaders(bytes); !s.ok()) return s;
  }

  MemoryFile memory{bytes};
  SF_VIRTUAL_IO io{MemoryLength, MemorySeek, MemoryRead, MemoryWrite,
                   MemoryTell};
  SF_INFO info{};
  SndfilePtr file(sf_open_virtual(&io, SFM_READ, &info, &memory));
  if (file == nullptr) {
    // libsndfile's own wording can mislead (a cut MP3 reads "File does not
    // exist"), so say what it means for the caller and quote it after.
    const bool unrecognised = sf_error(nullptr) == SF_ERR_UNRECOGNISED_FORMAT;
    return absl::InvalidArgumentError(absl::StrCat(
        "could not decode audio: ",
        unrecognised ? "unrecognised format"
                     : "the file is truncated, corrupt or unsupported",
        " (libsndfile: ", sf_strerror(nullptr), "); ", kSupportedFormats));
  }
  if (absl::Status s = CheckOpenedFormat(*container, info.format); !s.ok()) {
    return s;
  }
  if (absl::Status s = ValidateChannels(info.channels, "audio"); !s.ok()) {
    return s;
  }
  if (absl::Status s = ValidateSampleRate(info.samplerate); !s.ok()) return s;

  // libsndfile reports an unknown length when it cannot find a valid final
  // Ogg page, i.e. the stream was cut off; it then decodes unreliably.
  const bool length_known = info.frames != SF_COUNT_MAX;
  if (*container == Container::kOggVorbis && !length_known) {
    return absl::InvalidArgumentError(
        "truncated or corrupt OGG: no valid final page; send the complete "
        "file");
  }
  // Refuse from the header before decoding, so that a small file declaring
  // hours of audio costs nothing.
  if (length_known) {
    if (absl::Status s =
            CheckDuration(static_cast<double>(info.frames), info.samplerate,
                          options.max_duration_seconds);
        !s.ok()) {
      return s;
    }
  }

  absl::StatusOr<AudioBuilder> builder =
      AudioBuilder::Create(info.samplerate, options);
  if (!builder.ok()) return builder.status();
  if (length_known) {
    // A WAV's count was checked against its data above. A compressed
    // file's header could lie, so it reserves no more than a generous
    // compression ratio of its size allows; longer audio grows the buffer.
    const double frames =
        *container == Container::kWav
            ? static_cast<double>(info.frames)
            : std::min<double>(static_cast<double>(info.frames),
                               kMaxExpectedCompression *
                                   static_cast<double>(bytes.size()) /
                                   info.channels);
    if (absl::Status s = builder->Expect(frames); !s.ok()) return s;
  }
  std::vector<float> chunk(static_cast<size_t>(kChunkFrames) * info.channels);
  std::vector<float> mono;
  size_t frames_read = 0;
  while (true) {
    const sf_count_t n = sf_readf_float(file.get(), chunk.data(), kChunkFrames);
    if (n <= 0) break;
    if (absl::Status s = MixToMono(
            absl::MakeConstSpan(chunk.data(),
                                static_cast<size_t>(n) * info.channels),
            info.channels, frames_read, &mono);
        !s.ok()) {
      return s;
    }
    frames_read += static_cast<size_t>(n);
    // Also enforces the duration while decoding: the length may be unknown
    // or a lie.
    if (absl::Status s = builder->Append(mono); !s.ok()) return s;
  }
  const bool read_error = sf_error(file.get()) != SF_ERR_NO_ERROR;
  const std::string error_detail =
      read_error ? absl::StrCat(" (libsndfile: ", sf_strerror(file.get()), ")")
                 : "";
  // MP3 lengths can be estimates from the file size (mpg123 without a
  // Xing/LAME tag), so a shortfall there does not prove truncation; for
  // other formats the header's count is exact.
  const bool exact_length = length_known && *container != Container::kMp3;
  if (exact_length && static_cast<sf_count_t>(frames_read) < info.frames) {
    return absl::InvalidArgumentError(
        absl::StrCat("truncated or corrupt audio: the header declares ",
                     info.frames, " frames but only ", frames_read,
                     " are present", error_detail, "; send the complete file"));
  }
  // Once every declared frame is in, a decoder error can only come from
  // trailing bytes (e.g. an appended tag), which we ignore.
  if (read_error && !exact_length) {
    return absl::InvalidArgumentError(absl::StrCat(
        "corrupt audio after ", frames_read, " frames", error_detail));
  }
  if (frames_read == 0) {
    return absl::InvalidArgumentError(
        "the audio contains no samples (or its data is corrupt)");
  }
  return std::move(*builder).Finish();
}

}  // namespace

absl::StatusOr<PcmEncoding> ParsePcmEncoding(std::string_view name) {
  // absl::string_view is not std::string_view in Debian's Abseil.
  const absl::string_view view(name.data(), name.size());
  const std::string lower = absl::AsciiStrToLower(view);
  if (lower == "s16le") return PcmEncoding::kS16LE;
  if (lower == "f32le") return PcmEncoding::kF32LE;
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown PCM encoding '", view, "'; expected 's16le' or 'f32le'"));
}

absl::Status ValidateSampleRate(int sample_rate) {
  return CheckSampleRate(sample_rate);
}

absl::Status ValidateRawPcmFormat(const RawPcmFormat& format) {
  if (absl::Status s = ValidateSampleRate(format.sample_rate); !s.ok()) return s;
  return ValidateChannels(format.channels, "raw PCM");
}

absl::Status CheckSamples(absl::Span<const float> samples, size_t first_index) {
  for (size_t i = 0; i < samples.size(); ++i) {
    if (const char* problem = SampleProblem(samples[i])) {
      return SampleError(problem, samples[i], first_index + i, std::nullopt);
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<Audio> DecodeAudio(std::string_view bytes,
                                  const DecodeOptions& options) {
  if (absl::Status s = ValidateMaxDuration(options.max_duration_seconds);
      !s.ok()) {
    return s;
  }
  if (bytes.empty()) {
    return absl::InvalidArgumentError("the audio is empty (0 bytes)");
  }
  if (options.output_sample_rate != 0) {
    if (absl::Status s = ValidateSampleRate(options.output_sample_rate);
        !s.ok()) {
      return s;
    }
  }
  if (options.raw.has_value()) {
    return DecodeRawPcm(bytes, *options.raw, options);
  }
  return DecodeWithSndfile(bytes, options);
}

absl::StatusOr<Audio> DecodeAudioFile(const std::string& path,
                                      const DecodeOptions& options) {
  absl::StatusOr<std::string> bytes = ReadFileBytes(path);
  if (!bytes.ok()) return bytes.status();
  absl::StatusOr<Audio> audio = DecodeAudio(*bytes, options);
  if (!audio.ok()) {
    return absl::Status(audio.status().code(),
                        absl::StrCat(path, ": ", audio.status().message()));
  }
  return audio;
}

absl::StatusOr<std::string> ReadFileBytes(const std::string& path) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) {
    return absl::InvalidArgumentError(
        absl::StrCat("'", path, "' is a directory, not a file"));
  }
  std::unique_ptr<FILE, int (*)(FILE*)> file(std::fopen(path.c_str(), "rb"),
                                             &std::fclose);
  if (file == nullptr) {
    const int error = errno;
    const std::string reason = std::generic_category().message(error);
    if (error == ENOENT) {
      return absl::NotFoundError(
          absl::StrCat("cannot open '", path, "': ", reason));
    }
    return absl::InvalidArgumentError(
        absl::StrCat("cannot open '", path, "': ", reason));
  }
  std::string bytes;
  char buffer[1 << 16];
  size_t n;
  while ((n = std::fread(buffer, 1, sizeof(buffer), file.get())) > 0) {
    bytes.append(buffer, n);
  }
  if (std::ferror(file.get())) {
    return absl::InvalidArgumentError(
        absl::StrCat("error reading '", path, "'"));
  }
  return bytes;
}

}  // namespace emoserve
