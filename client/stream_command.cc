// `emoserve stream FILE|-`: live audio to the server in chunks, results
// printed as they arrive.
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "client/calls.h"
#include "client/commands.h"
#include "client/format.h"
#include "client/speaker_file.h"
#include "core/audio.h"

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "emoserve stream sends host floats as little-endian PCM"
#endif

namespace emoserve::client {
namespace {

// Set by the first Ctrl-C: stop sending, then wait for the final results.
std::atomic<bool> interrupted{false};

extern "C" void OnInterrupt(int) {
  interrupted.store(true);
  std::signal(SIGINT, SIG_DFL);  // a second Ctrl-C ends the process
}

// Fills `chunk` with the next piece of PCM; false at the end of the audio.
using ChunkSource = std::function<bool(std::string* chunk)>;

// Where the audio comes from and how it is described to the server.
struct PcmInput {
  v1::AudioFormat format;
  ChunkSource next_chunk;
};

int BytesPerSample(PcmEncoding format) {
  return format == PcmEncoding::kS16LE ? 2 : 4;
}

size_t SamplesPerChunk(int rate, double chunk_ms) {
  return std::max<size_t>(1, static_cast<size_t>(rate * chunk_ms / 1000.0));
}

// A file decoded here to mono float PCM at its own rate (the server
// resamples), sent as FLOAT32.
absl::StatusOr<PcmInput> FileInput(const StreamCommandOptions& options) {
  DecodeOptions decode;
  decode.max_duration_seconds = 24 * 3600.0;
  absl::StatusOr<Audio> audio = DecodeAudioFile(options.input, decode);
  if (!audio.ok()) return audio.status();
  PcmInput input;
  input.format.set_encoding(v1::AUDIO_ENCODING_FLOAT32);
  input.format.set_sample_rate_hertz(audio->sample_rate);
  input.format.set_channel_count(1);
  const size_t frames = SamplesPerChunk(audio->sample_rate, options.chunk_ms);
  auto samples = std::make_shared<std::vector<float>>(
      std::move(audio->samples));
  input.next_chunk = [samples, frames,
                      position = size_t{0}](std::string* chunk) mutable {
    if (position >= samples->size()) return false;
    const size_t count = std::min(frames, samples->size() - position);
    chunk->assign(reinterpret_cast<const char*>(samples->data() + position),
                  count * sizeof(float));
    position += count;
    return true;
  };
  return input;
}

// Raw interleaved PCM on stdin, passed through as it is.
PcmInput StdinInput(const StreamCommandOptions& options) {
  PcmInput input;
  input.format.set_encoding(options.format == PcmEncoding::kS16LE
                                ? v1::AUDIO_ENCODING_LINEAR16
                                : v1::AUDIO_ENCODING_FLOAT32);
  input.format.set_sample_rate_hertz(options.rate);
  input.format.set_channel_count(options.channels);
  const size_t pcm_frame_bytes =
      static_cast<size_t>(options.channels) * BytesPerSample(options.format);
  const size_t chunk_bytes =
      SamplesPerChunk(options.rate, options.chunk_ms) * pcm_frame_bytes;
  input.next_chunk = [chunk_bytes, pcm_frame_bytes](std::string* chunk) {
    chunk->resize(chunk_bytes);
    size_t filled = 0;
    while (filled < chunk_bytes && !interrupted.load()) {
      const size_t n =
          std::fread(chunk->data() + filled, 1, chunk_bytes - filled, stdin);
      if (n == 0) {
        if (std::ferror(stdin) && errno == EINTR) {
          std::clearerr(stdin);
          continue;
        }
        break;  // end of input
      }
      filled += n;
    }
    chunk->resize(filled - filled % pcm_frame_bytes);  // whole PCM frames only
    return !chunk->empty();
  };
  return input;
}

}  // namespace

int RunStream(const ConnectionOptions& connection,
              const StreamCommandOptions& options) {
  absl::StatusOr<PcmInput> input =
      options.input == "-" ? StdinInput(options) : FileInput(options);
  if (!input.ok()) {
    PrintError(input.status().message());
    return kExitFailure;
  }
  absl::StatusOr<std::unique_ptr<v1::EmotionService::Stub>> stub =
      MakeStub(connection);
  if (!stub.ok()) {
    PrintError(stub.status().message());
    return kExitFailure;
  }
  v1::StreamingConfig config;
  *config.mutable_format() = input->format;
  config.set_hop_seconds(options.hop_seconds);
  config.set_model_name(options.model.name);
  config.set_model_version(options.model.version);
  config.set_interim_results(options.interim);
  config.mutable_voice_activity()->set_disabled(options.vad_disabled);
  if (options.vad_threshold_dbfs.has_value()) {
    config.mutable_voice_activity()->set_threshold_dbfs(
        *options.vad_threshold_dbfs);
  }
  if (!options.speaker_file.empty()) {
    absl::StatusOr<std::string> statistics = ReadSpeakerFile(options.speaker_file);
    if (!statistics.ok()) {
      PrintError(statistics.status().message());
      return kExitFailure;
    }
    config.mutable_speaker_adaptation()->set_speaker_statistics(*std::move(statistics));
  }

  const bool json = options.output == OutputFormat::kJson;
  grpc::Status final_status;
  absl::Notification done;
  std::shared_ptr<StreamCall> call = StreamCall::Start(
      stub->get(), config, connection,
      [json, &options](const v1::StreamClassifyResponse& response) {
        // Kept after each utterance, so that an interrupted stream keeps
        // what it learned.
        const std::string& statistics = response.utterance().speaker_statistics();
        if (!options.speaker_file.empty() && !statistics.empty()) {
          if (absl::Status s = WriteSpeakerFile(options.speaker_file, statistics); !s.ok()) {
            PrintError(s.message());
          }
        }
        const std::string line = FormatStreamResponse(response, json);
        std::fwrite(line.data(), 1, line.size(), stdout);
        std::fflush(stdout);  // live, also into a pipe
      },
      [&](const grpc::Status& status) {
        final_status = status;
        done.Notify();
      });

  struct sigaction action = {};
  action.sa_handler = OnInterrupt;  // no SA_RESTART: a blocked read returns
  sigaction(SIGINT, &action, nullptr);
  const auto chunk_duration = std::chrono::duration<double, std::milli>(
      options.chunk_ms);
  const auto start = std::chrono::steady_clock::now();
  std::string chunk;
  for (int64_t i = 0; !interrupted.load() && input->next_chunk(&chunk); ++i) {
    if (!options.fast) {
      std::this_thread::sleep_until(
          start + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                      i * chunk_duration));
    }
    if (!call->SendAudio(std::move(chunk))) break;  // the call has ended
  }
  call->CloseSend();
  done.WaitForNotification();
  std::signal(SIGINT, SIG_DFL);
  if (!final_status.ok()) {
    PrintError(DescribeRpcError(final_status, connection));
    return kExitFailure;
  }
  return kExitOk;
}

}  // namespace emoserve::client
