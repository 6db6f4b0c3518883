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
#include <system_error>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace emoserve {
namespace {

// More channels than this is almost certainly a corrupt header; real
// recordings have 1-8 and ambisonics/mic arrays stay well below 64.
constexpr int kMaxChannels = 64;

// Frames decoded per libsndfile call: bounds the interleaved scratch buffer
// (at most 4096 * 64 floats = 1 MiB) whatever the file declares.
constexpr sf_count_t kChunkFrames = 4096;

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

// Checks `interleaved` (whole frames) for NaN/Inf and appends the channel
// average of each frame to `mono`. `first_frame` is the index of the first
// frame in the whole stream, for error messages.
absl::Status AppendMono(absl::Span<const float> interleaved, int channels,
                        size_t first_frame, std::vector<float>* mono) {
  const size_t frames = interleaved.size() / channels;
  for (size_t f = 0; f < frames; ++f) {
    const float* frame = interleaved.data() + f * channels;
    double sum = 0.0;  // Cannot overflow, unlike float near FLT_MAX.
    for (int c = 0; c < channels; ++c) {
      if (!std::isfinite(frame[c])) {
        return absl::InvalidArgumentError(absl::StrCat(
            "audio contains a non-finite sample (",
            std::isnan(frame[c]) ? "NaN" : "Inf", ") at sample index ",
            first_frame + f, " (channel ", c, "); the data is corrupt"));
      }
      sum += frame[c];
    }
    mono->push_back(static_cast<float>(sum / channels));
  }
  return absl::OkStatus();
}

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
                                   double max_duration_seconds) {
  if (absl::Status s = ValidateSampleRate(format.sample_rate); !s.ok()) {
    return s;
  }
  if (absl::Status s = ValidateChannels(format.channels, "raw PCM"); !s.ok()) {
    return s;
  }
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
  if (absl::Status s = CheckDuration(static_cast<double>(frames),
                                     format.sample_rate, max_duration_seconds);
      !s.ok()) {
    return s;
  }

  Audio audio;
  audio.sample_rate = format.sample_rate;
  audio.samples.reserve(frames);
  const auto* data = reinterpret_cast<const unsigned char*>(bytes.data());
  std::vector<float> chunk;
  for (size_t start = 0; start < frames; start += kChunkFrames) {
    const size_t n = std::min<size_t>(kChunkFrames, frames - start);
    chunk.resize(n * format.channels);
    for (size_t i = 0; i < chunk.size(); ++i) {
      chunk[i] = SampleFromLe(
          data + (start * format.channels + i) * sample_bytes, format.encoding);
    }
    if (absl::Status s =
            AppendMono(chunk, format.channels, start, &audio.samples);
        !s.ok()) {
      return s;
    }
  }
  return audio;
}

// ---------------------------------------------------------------------------
// RIFF/WAVE header. libsndfile silently shrinks the frame count of a WAV
// whose data chunk runs past the end of the file, so a truncated upload
// would decode "successfully"; we read the declared sizes ourselves.

struct WavHeader {
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

absl::Status CheckWavHeader(const WavHeader& header,
                            double max_duration_seconds) {
  if (header.has_fmt) {
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
// headers) are complete, on intact consecutive pages, and well-formed.
// Streams that are not Vorbis are left to libsndfile.
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
        return absl::OkStatus();  // Opus, FLAC, ... in Ogg.
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
                                        double max_duration_seconds) {
  if (std::optional<WavHeader> wav = ParseWavHeader(bytes)) {
    if (absl::Status s = CheckWavHeader(*wav, max_duration_seconds); !s.ok()) {
      return s;
    }
  }
  if (bytes.substr(0, 4) == "OggS") {
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
  if (absl::Status s = ValidateChannels(info.channels, "audio"); !s.ok()) {
    return s;
  }
  if (absl::Status s = ValidateSampleRate(info.samplerate); !s.ok()) return s;

  const int major = info.format & SF_FORMAT_TYPEMASK;
  // libsndfile reports an unknown length when it cannot find a valid final
  // Ogg page, i.e. the stream was cut off; it then decodes unreliably.
  const bool length_known = info.frames != SF_COUNT_MAX;
  if (major == SF_FORMAT_OGG && !length_known) {
    return absl::InvalidArgumentError(
        "truncated or corrupt OGG: no valid final page; send the complete "
        "file");
  }
  // Refuse from the header before decoding, so that a small file declaring
  // hours of audio costs nothing.
  if (length_known) {
    if (absl::Status s = CheckDuration(static_cast<double>(info.frames),
                                       info.samplerate, max_duration_seconds);
        !s.ok()) {
      return s;
    }
  }

  Audio audio;
  audio.sample_rate = info.samplerate;
  // Reserve no more than the input size: a lying header must not make us
  // allocate, and decoded audio that outgrows it just reallocates.
  if (length_known) {
    audio.samples.reserve(static_cast<size_t>(std::min<sf_count_t>(
        info.frames, static_cast<sf_count_t>(bytes.size()))));
  }
  std::vector<float> chunk(static_cast<size_t>(kChunkFrames) * info.channels);
  size_t frames_read = 0;
  while (true) {
    const sf_count_t n = sf_readf_float(file.get(), chunk.data(), kChunkFrames);
    if (n <= 0) break;
    if (absl::Status s = AppendMono(
            absl::MakeConstSpan(chunk.data(),
                                static_cast<size_t>(n) * info.channels),
            info.channels, frames_read, &audio.samples);
        !s.ok()) {
      return s;
    }
    frames_read += static_cast<size_t>(n);
    // Also enforced while decoding: the length may be unknown or a lie.
    if (static_cast<double>(frames_read) / info.samplerate >
        max_duration_seconds) {
      return absl::OutOfRangeError(
          absl::StrCat("audio is longer than the limit of ",
                       max_duration_seconds, " s (send a shorter clip)"));
    }
  }
  const bool read_error = sf_error(file.get()) != SF_ERR_NO_ERROR;
  const std::string error_detail =
      read_error ? absl::StrCat(" (libsndfile: ", sf_strerror(file.get()), ")")
                 : "";
  // MP3 lengths can be estimates from the file size (mpg123 without a
  // Xing/LAME tag), so a shortfall there does not prove truncation; for
  // other formats the header's count is exact.
  if (length_known && major != SF_FORMAT_MPEG &&
      static_cast<sf_count_t>(frames_read) < info.frames) {
    return absl::InvalidArgumentError(
        absl::StrCat("truncated or corrupt audio: the header declares ",
                     info.frames, " frames but only ", frames_read,
                     " are present", error_detail, "; send the complete file"));
  }
  // Once every declared frame is in, a decoder error can only come from
  // trailing bytes (e.g. an appended tag), which we ignore.
  if (read_error && !(length_known && major != SF_FORMAT_MPEG)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "corrupt audio after ", frames_read, " frames", error_detail));
  }
  if (frames_read == 0) {
    return absl::InvalidArgumentError(
        "the audio contains no samples (or its data is corrupt)");
  }
  return audio;
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

absl::StatusOr<Audio> DecodeAudio(std::string_view bytes,
                                  const DecodeOptions& options) {
  if (absl::Status s = ValidateMaxDuration(options.max_duration_seconds);
      !s.ok()) {
    return s;
  }
  if (bytes.empty()) {
    return absl::InvalidArgumentError("the audio is empty (0 bytes)");
  }
  if (options.raw.has_value()) {
    return DecodeRawPcm(bytes, *options.raw, options.max_duration_seconds);
  }
  return DecodeWithSndfile(bytes, options.max_duration_seconds);
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
