// Writes the fuzz targets' seed corpora (tests/fuzz/corpus/<target>/):
// short, valid inputs of every kind each target takes, so that fuzzing
// starts from the interesting paths. Run from the repository root:
//   build/release/tests/write_fuzz_seeds tests/fuzz/corpus
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "core/model_config.h"
#include "emoserve/v1/emoserve.pb.h"
#include "tests/test_support.h"

namespace {

using emoserve::testing::FileFormat;
namespace v1 = emoserve::v1;

// Speech-like: a wandering tone with noise, and a quiet stretch.
std::vector<float> Signal(int rate, double seconds, int channels) {
  std::mt19937 rng(7);
  std::normal_distribution<float> noise(0.0f, 0.02f);
  std::vector<float> out;
  const int n = static_cast<int>(rate * seconds);
  for (int i = 0; i < n; ++i) {
    const double t = static_cast<double>(i) / rate;
    const float level = t < seconds * 0.7 ? 0.3f : 0.001f;
    const float x = level * std::sin(2 * M_PI * (150 + 60 * std::sin(3 * t)) * t) + noise(rng);
    for (int c = 0; c < channels; ++c) out.push_back(x);
  }
  return out;
}

std::string S16(const std::vector<float>& samples) {
  std::string out;
  for (float x : samples) {
    const int v = static_cast<int>(std::lround(std::max(-1.0f, std::min(1.0f, x)) * 32767));
    out.push_back(static_cast<char>(v & 0xFF));
    out.push_back(static_cast<char>((v >> 8) & 0xFF));
  }
  return out;
}

std::string F32(const std::vector<float>& samples) {
  return std::string(reinterpret_cast<const char*>(samples.data()), samples.size() * 4);
}

void Write(const std::filesystem::path& path, const std::string& bytes) {
  std::filesystem::create_directories(path.parent_path());
  std::ofstream(path, std::ios::binary) << bytes;
}

std::string Encode(int rate, double seconds, int channels, FileFormat format) {
  absl::StatusOr<std::string> bytes =
      emoserve::testing::EncodeAudio(Signal(rate, seconds, channels), channels, rate, format);
  if (!bytes.ok()) {
    std::fprintf(stderr, "%s\n", std::string(bytes.status().message()).c_str());
    std::exit(1);
  }
  return *bytes;
}

v1::AudioFormat Raw(v1::AudioEncoding encoding, int rate, int channels) {
  v1::AudioFormat format;
  format.set_encoding(encoding);
  format.set_sample_rate_hertz(rate);
  format.set_channel_count(channels);
  return format;
}

// A stream input: 2-byte little-endian lengths before each message.
std::string StreamInput(const std::vector<v1::StreamClassifyRequest>& messages) {
  std::string out;
  for (const v1::StreamClassifyRequest& message : messages) {
    const std::string bytes = message.SerializeAsString();
    out.push_back(static_cast<char>(bytes.size() & 0xFF));
    out.push_back(static_cast<char>(bytes.size() >> 8));
    out += bytes;
  }
  return out;
}

// http2_guard_fuzzer's chunks: a byte (bit 7: from gRPC; bits 0-6: length)
// before each piece of at most 127 bytes. (An input starts with a byte
// whose bit 0 says the server is shutting down.)
std::string Chunks(bool from_grpc, const std::string& bytes) {
  std::string out;
  for (size_t i = 0; i < bytes.size(); i += 127) {
    const std::string piece = bytes.substr(i, 127);
    out.push_back(static_cast<char>((from_grpc ? 0x80 : 0) | piece.size()));
    out += piece;
  }
  return out;
}

std::string Http2Frame(uint8_t type, uint8_t flags, uint32_t stream, const std::string& payload) {
  std::string frame = {static_cast<char>(payload.size() >> 16),
                       static_cast<char>(payload.size() >> 8),
                       static_cast<char>(payload.size()),
                       static_cast<char>(type),
                       static_cast<char>(flags),
                       static_cast<char>(stream >> 24),
                       static_cast<char>(stream >> 16),
                       static_cast<char>(stream >> 8),
                       static_cast<char>(stream)};
  return frame + payload;
}

// A gRPC message: no compression, its length, its bytes.
std::string GrpcMessage(uint32_t declared, const std::string& bytes) {
  return std::string{0, static_cast<char>(declared >> 24), static_cast<char>(declared >> 16),
                     static_cast<char>(declared >> 8), static_cast<char>(declared)} +
         bytes;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s CORPUS_DIR\n", argv[0]);
    return 2;
  }
  const std::filesystem::path root = argv[1];

  // decode_fuzzer: a mode byte, then the bytes.
  const struct {
    const char* name;
    FileFormat format;
    int rate;
    int channels;
  } kFiles[] = {{"wav16", FileFormat::kWavPcm16, 16000, 1},
                {"wav24_stereo", FileFormat::kWavPcm24, 48000, 2},
                {"wavfloat", FileFormat::kWavFloat, 22050, 1},
                {"wav_mulaw", FileFormat::kWavMuLaw, 8000, 1},
                {"flac", FileFormat::kFlac, 44100, 1},
                {"ogg", FileFormat::kOggVorbis, 16000, 1},
                {"mp3", FileFormat::kMp3, 16000, 1},
                {"au", FileFormat::kAu, 16000, 1}};
  for (const auto& file : kFiles) {
    const std::string bytes = Encode(file.rate, 0.25, file.channels, file.format);
    Write(root / "decode_fuzzer" / file.name, std::string(1, '\x00') + bytes);
    Write(root / "decode_fuzzer" / (std::string(file.name) + "_to16k"),
          std::string(1, '\x80') + bytes);
  }
  Write(root / "decode_fuzzer" / "raw_s16_16k", std::string(1, '\x42') + S16(Signal(16000, 0.3, 1)));
  Write(root / "decode_fuzzer" / "raw_f32_44k_stereo_to16k",
        std::string(1, '\xCD') + F32(Signal(44100, 0.2, 2)));

  // classify_fuzzer: serialized ClassifyRequests.
  const auto classify = [&](const std::string& name, const std::string& audio,
                            const v1::AudioFormat* format, bool timeline, double hop) {
    v1::ClassifyRequest request;
    request.set_audio(audio);
    if (format != nullptr) *request.mutable_format() = *format;
    request.set_include_timeline(timeline);
    request.set_hop_seconds(hop);
    Write(root / "classify_fuzzer" / name, request.SerializeAsString());
  };
  classify("wav", Encode(16000, 1.5, 1, FileFormat::kWavPcm16), nullptr, true, 0);
  classify("flac_48k", Encode(48000, 1.2, 1, FileFormat::kFlac), nullptr, false, 1.0);
  classify("mp3", Encode(16000, 1.2, 1, FileFormat::kMp3), nullptr, true, 0);
  const v1::AudioFormat s16 = Raw(v1::AUDIO_ENCODING_LINEAR16, 16000, 1);
  classify("raw_s16", S16(Signal(16000, 2.0, 1)), &s16, true, 0.5);
  const v1::AudioFormat f32 = Raw(v1::AUDIO_ENCODING_FLOAT32, 8000, 2);
  classify("raw_f32_stereo_8k", F32(Signal(8000, 1.5, 2)), &f32, false, 0);

  // stream_fuzzer: a config, then audio in chunks (one straddles a frame).
  const auto stream = [&](const std::string& name, const v1::AudioFormat& format,
                          const std::string& pcm, size_t chunk, bool interim, double hop) {
    std::vector<v1::StreamClassifyRequest> messages(1);
    v1::StreamingConfig* config = messages[0].mutable_config();
    *config->mutable_format() = format;
    config->set_interim_results(interim);
    config->set_hop_seconds(hop);
    for (size_t i = 0; i < pcm.size(); i += chunk) {
      messages.emplace_back().set_audio(pcm.substr(i, chunk));
    }
    Write(root / "stream_fuzzer" / name, StreamInput(messages));
  };
  stream("s16_16k", s16, S16(Signal(16000, 2.0, 1)), 3201, true, 0);
  stream("f32_stereo_8k", f32, F32(Signal(8000, 1.5, 2)), 4000, false, 0.75);
  stream("s16_48k", Raw(v1::AUDIO_ENCODING_LINEAR16, 48000, 1), S16(Signal(48000, 1.2, 1)), 9601,
         true, 0.5);

  // model_json_fuzzer: the bundled model's model.json and a minimal one.
  absl::StatusOr<emoserve::ModelConfig> bundled = emoserve::LoadModelConfig("models/default/model.json");
  if (!bundled.ok()) {
    std::fprintf(stderr, "run from the repository root: %s\n",
                 std::string(bundled.status().message()).c_str());
    return 1;
  }
  bundled->architecture = nlohmann::json::object();
  bundled->provenance = nlohmann::json::object();
  Write(root / "model_json_fuzzer" / "bundled", emoserve::ModelConfigToJson(*bundled).dump(1));
  emoserve::ModelConfig small = *bundled;
  small.name = "small";
  small.labels = {"a", "b"};
  small.window_seconds = 0.5;
  small.features = emoserve::FeatureParams();
  Write(root / "model_json_fuzzer" / "small", emoserve::ModelConfigToJson(small).dump());

  // http2_guard_fuzzer: a Classify call (HEADERS, a padded DATA frame and
  // one that ends the stream) and its answer; a call whose message is too
  // large for the budget, with data after the refusal; a call gRPC cancels
  // as the server shuts down (trailers-only, HPACK literals).
  const std::string preface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
  const std::string settings = Http2Frame(0x4, 0, 0, "");
  const std::string request = GrpcMessage(300, std::string(300, 'a'));
  const std::string call =
      Http2Frame(0x1, 0x4, 1, "hpack-block") +
      Http2Frame(0x0, 0x8, 1, std::string(1, 4) + request.substr(0, 100) + "pppp") +
      Http2Frame(0x0, 0x1, 1, request.substr(100));
  const std::string answer = Http2Frame(0x1, 0x4, 1, "response-headers") +
                             Http2Frame(0x0, 0, 1, GrpcMessage(20, std::string(20, 'r'))) +
                             Http2Frame(0x1, 0x5, 1, "trailers");
  const std::string running(1, 0), shutting_down(1, 1);
  Write(root / "http2_guard_fuzzer" / "classify",
        running + Chunks(false, preface + settings) + Chunks(true, settings) + Chunks(false, call) +
            Chunks(true, answer));
  const std::string big = Http2Frame(0x1, 0x4, 3, "hpack-block") +
                          Http2Frame(0x0, 0, 3, GrpcMessage(1 << 20, std::string(100, 'b'))) +
                          Http2Frame(0x0, 0x1, 3, std::string(200, 'b'));
  Write(root / "http2_guard_fuzzer" / "refused",
        running + Chunks(false, preface + settings) + Chunks(true, settings) +
            Chunks(false, big) + Chunks(true, Http2Frame(0x6, 0x1, 0, std::string(8, 0))));
  std::string cancelled_block;
  for (const auto& [name, value] : {std::pair<std::string, std::string>{":status", "200"},
                                    {"content-type", "application/grpc"},
                                    {"grpc-status", "1"},
                                    {"grpc-message", "CANCELLED"}}) {
    cancelled_block += std::string(1, 0) + static_cast<char>(name.size()) + name +
                       static_cast<char>(value.size()) + value;
  }
  Write(root / "http2_guard_fuzzer" / "cancelled_at_shutdown",
        shutting_down + Chunks(false, preface + settings) + Chunks(true, settings) +
            Chunks(false, call) + Chunks(true, Http2Frame(0x1, 0x5, 1, cancelled_block)));
  return 0;
}
