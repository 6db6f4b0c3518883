// The gRPC server, in-process on 127.0.0.1 with a random free port: unary
// and streaming classification of RAVDESS speech in several formats and
// rates, health, reflection, every error code, limits, deadlines, draining,
// concurrent clients and a thousand idle streams.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <optional>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <gmock/gmock.h>
#include <google/protobuf/descriptor.h>
#include <google/protobuf/descriptor.pb.h>
#include <google/protobuf/dynamic_message.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/support/byte_buffer.h>
#include <gtest/gtest.h>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "core/audio.h"
#include "core/resampler.h"
#include "core/speaker_statistics.h"
#include "tests/server_test_support.h"
#include "tests/test_model.h"
#include "tests/test_support.h"

// Allocations of at least this many bytes throw std::bad_alloc while it is
// non-zero: memory running out at a chosen size, for the test that the
// server survives it (AllocationFailureFailsOnlyThatCall).
static std::atomic<size_t> fail_allocations_from{0};

void* operator new(size_t size) {
  const size_t limit = fail_allocations_from.load(std::memory_order_relaxed);
  if (limit != 0 && size >= limit) throw std::bad_alloc();
  if (void* p = std::malloc(size == 0 ? 1 : size)) return p;
  throw std::bad_alloc();
}
// The forms whose memory the two deletes above free must all come from
// malloc (ASan's own nothrow new would be a mismatch).
void* operator new(size_t size, const std::nothrow_t&) noexcept {
  try {
    return operator new(size);
  } catch (const std::bad_alloc&) {
    return nullptr;
  }
}
void* operator new[](size_t size) { return operator new(size); }
void* operator new[](size_t size, const std::nothrow_t& tag) noexcept {
  return operator new(size, tag);
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, size_t) noexcept { std::free(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete[](void* p, size_t) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }

namespace emoserve {
namespace {

using ::emoserve::testing::Connect;
using ::emoserve::testing::Format;
using ::emoserve::testing::kPatience;
using ::emoserve::testing::RunStream;
using ::emoserve::testing::StartServer;
using ::emoserve::testing::StreamOutcome;
using ::emoserve::testing::TestServerConfig;
using ::emoserve::testing::ToFloat32;
using ::emoserve::testing::ToLinear16;
using ::testing::HasSubstr;
using HealthStatus = grpc::health::v1::HealthCheckResponse;

constexpr int kRate = 16000;
constexpr double kWindowSeconds = 3.0;
constexpr double kDefaultHopSeconds = 1.5;

// Tolerances for MaxDifference (relative). The test model is untrained but
// deterministic: the same samples give the same probabilities up to float
// rounding in batching (measured up to 2.6e-6), a signal resampled on
// another path nearly so (measured 1.8e-5). Other clips differ by 1.9e-3 to
// 1e-2, neighbouring windows of speech by 2.4e-3 and more. Tests check that
// what they compare differs by far more than the tolerance, so that a
// mix-up cannot pass.
constexpr float kSameSignal = 1e-5f;
constexpr float kResampledSignal = 1e-4f;

#define SKIP_WITHOUT_SHARED_DATA()                                                 \
  if (!::emoserve::testing::SharedDir().has_value()) {                             \
    GTEST_SKIP() << "no shared data folder (set EMOSERVE_SHARED_DIR): the RAVDESS " \
                    "clips are needed";                                             \
  }

// --------------------------------------------------------------------------
// Helpers.

std::vector<float> Concat(const std::vector<std::vector<float>>& parts) {
  std::vector<float> out;
  for (const auto& part : parts) out.insert(out.end(), part.begin(), part.end());
  return out;
}

// Probabilities in the model's label order.
std::vector<float> InLabelOrder(const google::protobuf::RepeatedPtrField<v1::EmotionScore>& scores) {
  const std::vector<std::string>& labels = testing::DefaultModelConfig().labels;
  std::vector<float> out(labels.size(), std::numeric_limits<float>::quiet_NaN());
  for (const v1::EmotionScore& score : scores) {
    const auto it = std::find(labels.begin(), labels.end(), score.label());
    if (it != labels.end()) out[it - labels.begin()] = score.probability();
  }
  return out;
}

// The largest difference between two probability vectors, relative to the
// probabilities (float rounding is relative), those under 0.01 counted as
// 0.01.
float MaxDifference(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return std::numeric_limits<float>::infinity();
  float worst = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const float d = std::fabs(a[i] - b[i]) / std::max({std::fabs(a[i]), std::fabs(b[i]), 0.01f});
    worst = std::isnan(d) ? std::numeric_limits<float>::infinity() : std::max(worst, d);
  }
  return worst;
}

// Every label once, sorted, summing to one.
void ExpectWellFormedScores(const google::protobuf::RepeatedPtrField<v1::EmotionScore>& scores) {
  const std::vector<std::string>& labels = testing::DefaultModelConfig().labels;
  ASSERT_EQ(scores.size(), static_cast<int>(labels.size()));
  std::vector<std::string> seen;
  float sum = 0;
  for (int i = 0; i < scores.size(); ++i) {
    seen.push_back(scores[i].label());
    sum += scores[i].probability();
    EXPECT_GE(scores[i].probability(), 0.0f);
    if (i > 0) {
      EXPECT_GE(scores[i - 1].probability(), scores[i].probability()) << "not sorted";
    }
  }
  EXPECT_NEAR(sum, 1.0f, 1e-4);
  EXPECT_THAT(seen, ::testing::UnorderedElementsAreArray(labels));
}

size_t ExpectedWindows(size_t samples, double hop_seconds) {
  const size_t window = static_cast<size_t>(kWindowSeconds * kRate);
  const size_t hop = static_cast<size_t>(std::llround(hop_seconds * kRate));
  if (samples <= window) return 1;
  return (samples - window + hop - 1) / hop + 1;
}

v1::StreamingConfig StreamConfig(const v1::AudioFormat& format, bool interim_results = true) {
  v1::StreamingConfig config;
  *config.mutable_format() = format;
  config.set_interim_results(interim_results);
  return config;
}

// The value of the series of `name` whose labels include all of `labels`
// (e.g. {"method=\"Classify\"", "code=\"OK\""}) in a text exposition, or
// nullopt.
std::optional<double> MetricValue(const std::string& text, const std::string& name,
                                  const std::vector<std::string>& labels = {}) {
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (!absl::StartsWith(line, name)) continue;
    const absl::string_view rest = line.substr(name.size());
    if (!rest.empty() && rest[0] != '{' && rest[0] != ' ') continue;  // a longer name
    bool all = true;
    for (const std::string& label : labels) all = all && absl::StrContains(line, label);
    double value = 0;
    const size_t space = line.rfind(' ');
    if (all && space != absl::string_view::npos &&
        absl::SimpleAtod(line.substr(space + 1), &value)) {
      return value;
    }
  }
  return std::nullopt;
}

// Polls `predicate` until it holds or kPatience passes.
template <typename Predicate>
bool Eventually(Predicate predicate) {
  const absl::Time until = absl::Now() + kPatience;
  while (absl::Now() < until) {
    if (predicate()) return true;
    absl::SleepFor(absl::Milliseconds(10));
  }
  return predicate();
}

// A stream held open from the client: config sent, then nothing until
// Close(). Callback API, so a thousand of them need no thousand threads.
class HeldStream final
    : public grpc::ClientBidiReactor<v1::StreamClassifyRequest, v1::StreamClassifyResponse> {
 public:
  HeldStream(v1::EmotionService::Stub& stub, const v1::StreamingConfig& config) {
    context_.set_deadline(absl::ToChronoTime(absl::Now() + kPatience));
    stub.async()->StreamClassify(&context_, this);
    *config_.mutable_config() = config;
    StartWrite(&config_);
    StartRead(&response_);
    AddHold();  // Close() writes from outside the reactions
    // What the constructor wrote reaches the reactions' threads through
    // gRPC core, which TSan cannot see; through mu_ it can.
    { absl::MutexLock lock(&mu_); }
    StartCall();
  }

  // A failed test may leave it open: cancel it, so that nothing is pending
  // when the context goes.
  ~HeldStream() override {
    ReleaseHold();
    context_.TryCancel();
    Wait();
  }

  // Lets the call end without half-closing (e.g. when the server ends it).
  void ReleaseHold() {
    if (holding_) RemoveHold();
    holding_ = false;
  }

  // Sends `pcm` without half-closing, once the config was written; returns
  // once it is written.
  void Send(std::string pcm) {
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(&config_written_));
      config_written_ = false;  // now: "the audio was written"
    }
    audio_.set_audio(std::move(pcm));
    StartWrite(&audio_);
    absl::MutexLock lock(&mu_);
    mu_.Await(absl::Condition(&config_written_));
  }

  // Waits until `count` responses arrived (or the call ended).
  bool WaitForResponses(size_t count) {
    absl::MutexLock lock(&mu_);
    wanted_ = count;
    mu_.AwaitWithTimeout(absl::Condition(this, &HeldStream::HasWantedOrDone), kPatience);
    return responses_.size() >= count;
  }

  // Sends `pcm` (if any) and half-closes, once the config was written.
  void Close(std::string pcm = "") {
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(&config_written_));
    }
    if (pcm.empty()) {
      StartWritesDone();
    } else {
      audio_.set_audio(std::move(pcm));
      StartWriteLast(&audio_, grpc::WriteOptions());
    }
    ReleaseHold();
  }

  void OnWriteDone(bool /*ok*/) override {
    absl::MutexLock lock(&mu_);
    config_written_ = true;
  }
  void OnReadDone(bool ok) override {
    if (!ok) return;
    {
      absl::MutexLock lock(&mu_);
      responses_.push_back(response_);
    }
    StartRead(&response_);
  }
  void OnDone(const grpc::Status& status) override {
    absl::MutexLock lock(&mu_);
    status_ = status;
    done_ = true;
  }

  bool HasWantedOrDone() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return done_ || responses_.size() >= wanted_;
  }

  // The final status once done (after at most kPatience).
  grpc::Status Wait() {
    absl::MutexLock lock(&mu_);
    if (!mu_.AwaitWithTimeout(absl::Condition(&done_), kPatience)) {
      return grpc::Status(grpc::StatusCode::UNKNOWN, "the test gave up waiting");
    }
    return status_;
  }
  std::vector<v1::StreamClassifyResponse> responses() {
    absl::MutexLock lock(&mu_);
    return responses_;
  }

 private:
  grpc::ClientContext context_;
  bool holding_ = true;  // the test thread's only
  v1::StreamClassifyRequest config_;
  v1::StreamClassifyRequest audio_;
  v1::StreamClassifyResponse response_;
  absl::Mutex mu_;
  bool config_written_ = false;
  size_t wanted_ = 0;
  bool done_ = false;
  grpc::Status status_;
  std::vector<v1::StreamClassifyResponse> responses_;
};

// --------------------------------------------------------------------------
// The shared server.

class ServerTest : public ::testing::Test {
 protected:
  static constexpr double kMaxUnarySeconds = 120;
  static constexpr double kMaxStreamSeconds = 30;
  static constexpr int kMaxStreams = 1100;
  static constexpr int64_t kMaxChunkBytes = 64000;
  static constexpr int64_t kMaxMessageBytes = 8 << 20;

  static void SetUpTestSuite() {
    ServerConfig config = TestServerConfig();
    config.max_unary_seconds = kMaxUnarySeconds;
    config.max_stream_seconds = kMaxStreamSeconds;
    config.max_streams = kMaxStreams;
    config.max_chunk_bytes = kMaxChunkBytes;
    config.max_message_bytes = kMaxMessageBytes;
    absl::StatusOr<std::unique_ptr<Server>> server = StartServer(config);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = server->release();
  }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
  }

  void SetUp() override {
    ASSERT_NE(server_, nullptr) << "the server did not start";
    channel_ = Connect(server_->port());
    stub_ = v1::EmotionService::NewStub(channel_);
  }

  grpc::Status Classify(const v1::ClassifyRequest& request, v1::ClassifyResponse* response,
                        absl::Duration timeout = kPatience) {
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
    return stub_->Classify(&context, request, response);
  }

  // Classify of raw 16 kHz LINEAR16 `samples`.
  v1::ClassifyResponse ClassifyPcm(const std::vector<float>& samples, bool timeline = true,
                                   double hop_seconds = 0) {
    v1::ClassifyRequest request;
    request.set_audio(ToLinear16(samples));
    *request.mutable_format() = Format(v1::AUDIO_ENCODING_LINEAR16, kRate);
    request.set_include_timeline(timeline);
    request.set_hop_seconds(hop_seconds);
    v1::ClassifyResponse response;
    const grpc::Status status = Classify(request, &response);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return response;
  }

  std::string Metrics() { return server_->metrics().Render(); }

  static Server* server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::EmotionService::Stub> stub_;
};

Server* ServerTest::server_ = nullptr;

// Three RAVDESS clips back to back (about 11 s of speech), cached.
const std::vector<float>& LongSpeech() {
  static const std::vector<float>* speech = [] {
    absl::StatusOr<std::vector<std::vector<float>>> clips = testing::RavdessClips(3);
    return new std::vector<float>(clips.ok() ? Concat(*clips) : std::vector<float>());
  }();
  return *speech;
}

// --------------------------------------------------------------------------
// Unary.

TEST_F(ServerTest, ClassifiesAFlacFileFromTheSharedData) {
  SKIP_WITHOUT_SHARED_DATA();
  absl::StatusOr<std::string> path = testing::FirstRavdessFlac();
  ASSERT_TRUE(path.ok()) << path.status();
  absl::StatusOr<std::string> bytes = ReadFileBytes(*path);
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  absl::StatusOr<Audio> audio = DecodeAudio(*bytes);
  ASSERT_TRUE(audio.ok()) << audio.status();

  v1::ClassifyRequest request;
  request.set_audio(*bytes);
  v1::ClassifyResponse response;
  const grpc::Status status = Classify(request, &response);
  ASSERT_TRUE(status.ok()) << status.error_message();
  ExpectWellFormedScores(response.scores());
  EXPECT_EQ(response.top_label(), response.scores(0).label());
  EXPECT_NEAR(response.audio_duration_seconds(), audio->duration_seconds(), 1e-6);
  EXPECT_EQ(response.model_name(), testing::DefaultModelConfig().name);
  EXPECT_EQ(response.model_version(), testing::DefaultModelConfig().version);
  EXPECT_EQ(response.window_count(),
            static_cast<int>(ExpectedWindows(audio->samples.size(), kDefaultHopSeconds)));
  EXPECT_GE(response.speech_window_count(), 1);
  EXPECT_TRUE(response.timeline().empty()) << "no timeline was asked for";
}

TEST_F(ServerTest, SameClipGivesTheSameResultInEveryFormatAndRate) {
  SKIP_WITHOUT_SHARED_DATA();
  absl::StatusOr<std::vector<std::vector<float>>> clips = testing::RavdessClips(2);
  ASSERT_TRUE(clips.ok()) << clips.status();
  const std::vector<float>& clip = (*clips)[0];
  const std::vector<float> reference = InLabelOrder(ClassifyPcm(clip, false).scores());
  // Another utterance is far from this one, so "close" means something.
  const float other_clip = MaxDifference(reference, InLabelOrder(ClassifyPcm((*clips)[1], false).scores()));
  ASSERT_GT(other_clip, 5 * kResampledSignal) << "the model does not tell the clips apart";

  struct Case {
    std::string name;
    v1::ClassifyRequest request;
    float tolerance;
  };
  std::vector<Case> cases;
  auto add = [&](std::string name, std::string audio, v1::AudioFormat format, float tolerance) {
    Case c{std::move(name), {}, tolerance};
    c.request.set_audio(std::move(audio));
    *c.request.mutable_format() = std::move(format);
    cases.push_back(std::move(c));
  };
  // 16-bit PCM at the model's rate: exactly the FLAC file's samples.
  absl::StatusOr<std::string> flac = testing::EncodeAudio(clip, 1, kRate, testing::FileFormat::kFlac);
  ASSERT_TRUE(flac.ok()) << flac.status();
  add("FLAC 16 kHz", *flac, v1::AudioFormat(), kSameSignal);
  add("LINEAR16 16 kHz stereo", ToLinear16(clip, 2), Format(v1::AUDIO_ENCODING_LINEAR16, kRate, 2),
      kSameSignal);
  add("FLOAT32 16 kHz", ToFloat32(clip), Format(v1::AUDIO_ENCODING_FLOAT32, kRate), kSameSignal);
  // Other rates go through the resampler twice (here and in the server).
  absl::StatusOr<std::vector<float>> at48k = Resample(clip, kRate, 48000);
  ASSERT_TRUE(at48k.ok()) << at48k.status();
  absl::StatusOr<std::string> wav48k =
      testing::EncodeAudio(*at48k, 1, 48000, testing::FileFormat::kWavPcm16);
  ASSERT_TRUE(wav48k.ok()) << wav48k.status();
  const float resampled = kResampledSignal;
  add("WAV 48 kHz", *wav48k, v1::AudioFormat(), resampled);
  add("LINEAR16 48 kHz", ToLinear16(*at48k), Format(v1::AUDIO_ENCODING_LINEAR16, 48000), resampled);
  absl::StatusOr<std::vector<float>> at22k = Resample(clip, kRate, 22050);
  ASSERT_TRUE(at22k.ok()) << at22k.status();
  add("FLOAT32 22.05 kHz stereo", ToFloat32(*at22k, 2),
      Format(v1::AUDIO_ENCODING_FLOAT32, 22050, 2), resampled);

  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    v1::ClassifyResponse response;
    const grpc::Status status = Classify(c.request, &response);
    ASSERT_TRUE(status.ok()) << status.error_message();
    ExpectWellFormedScores(response.scores());
    EXPECT_NEAR(response.audio_duration_seconds(), static_cast<double>(clip.size()) / kRate, 1e-3);
    EXPECT_EQ(response.window_count(), static_cast<int>(ExpectedWindows(clip.size(), 1.5)));
    EXPECT_LE(MaxDifference(InLabelOrder(response.scores()), reference), c.tolerance);
  }
}

TEST_F(ServerTest, TimelineCoversTheAudioAndTheResultAveragesItsSpeechWindows) {
  SKIP_WITHOUT_SHARED_DATA();
  const std::vector<float>& speech = LongSpeech();
  ASSERT_FALSE(speech.empty());
  for (double hop : {0.0, 1.0, 3.0}) {
    SCOPED_TRACE(absl::StrCat("hop ", hop));
    const double step = hop == 0 ? kDefaultHopSeconds : hop;
    const v1::ClassifyResponse response = ClassifyPcm(speech, true, hop);
    ExpectWellFormedScores(response.scores());
    ASSERT_EQ(response.window_count(), static_cast<int>(ExpectedWindows(speech.size(), step)));
    ASSERT_EQ(response.timeline_size(), response.window_count());
    std::vector<float> sum(8, 0.0f);
    int speech_windows = 0;
    for (int i = 0; i < response.timeline_size(); ++i) {
      const v1::WindowResult& window = response.timeline(i);
      EXPECT_NEAR(window.start_seconds(), i * step, 1e-9);
      EXPECT_NEAR(window.end_seconds(),
                  std::min(i * step + kWindowSeconds, static_cast<double>(speech.size()) / kRate), 1e-9);
      if (!window.speech()) continue;
      ++speech_windows;
      ExpectWellFormedScores(window.scores());
      const std::vector<float> p = InLabelOrder(window.scores());
      for (size_t c = 0; c < sum.size(); ++c) sum[c] += p[c];
    }
    ASSERT_GT(speech_windows, 0);
    EXPECT_EQ(response.speech_window_count(), speech_windows);
    for (float& s : sum) s /= speech_windows;
    EXPECT_LE(MaxDifference(InLabelOrder(response.scores()), sum), 1e-5);
    EXPECT_NEAR(response.timeline(response.timeline_size() - 1).end_seconds(),
                response.audio_duration_seconds(), 1e-9);
  }
}

TEST_F(ServerTest, GetModelInfoDescribesTheServedModel) {
  grpc::ClientContext context;
  v1::ModelInfo info;
  const grpc::Status status = stub_->GetModelInfo(&context, v1::GetModelInfoRequest(), &info);
  ASSERT_TRUE(status.ok()) << status.error_message();
  const ModelConfig config = testing::DefaultModelConfig();
  EXPECT_EQ(info.name(), config.name);
  EXPECT_EQ(info.version(), config.version);
  EXPECT_THAT(info.labels(), ::testing::ElementsAreArray(config.labels));
  EXPECT_EQ(info.sample_rate_hertz(), 16000);
  EXPECT_DOUBLE_EQ(info.window_seconds(), 3.0);
  EXPECT_DOUBLE_EQ(info.default_hop_seconds(), 1.5);
  EXPECT_EQ(info.device(), "cpu");
  EXPECT_EQ(info.max_batch_size(), TestServerConfig().max_batch_size);
  const auto& fields = info.features().fields();
  ASSERT_TRUE(fields.contains("n_mfcc")) << info.features().DebugString();
  EXPECT_EQ(fields.at("n_mfcc").number_value(), 40);
  EXPECT_EQ(fields.at("kind").string_value(), "mfcc");
  EXPECT_EQ(fields.at("n_fft").number_value(), config.features.n_fft);
  EXPECT_EQ(fields.at("hop_length").number_value(), config.features.hop_length);
}

// --------------------------------------------------------------------------
// Streaming.

// The unary timeline over `samples` against a stream's windows, utterances
// and speech events over the same samples.
void ExpectStreamMatchesUnary(const v1::ClassifyResponse& unary, const StreamOutcome& stream,
                              float tolerance) {
  ASSERT_TRUE(stream.status.ok()) << stream.status.error_message();
  // Windows differ from each other by far more than `tolerance`: a window
  // compared with the wrong one fails.
  std::vector<std::vector<float>> speech;
  for (const v1::WindowResult& w : unary.timeline()) {
    if (w.speech()) speech.push_back(InLabelOrder(w.scores()));
  }
  for (size_t i = 1; i < speech.size(); ++i) {
    ASSERT_GT(MaxDifference(speech[i - 1], speech[i]), 5 * tolerance)
        << "neighbouring windows " << i - 1 << " and " << i << " are indistinguishable";
  }
  const std::vector<v1::WindowResult> windows = stream.windows();
  ASSERT_EQ(static_cast<int>(windows.size()), unary.timeline_size());
  for (size_t i = 0; i < windows.size(); ++i) {
    SCOPED_TRACE(absl::StrCat("window ", i));
    const v1::WindowResult& expected = unary.timeline(static_cast<int>(i));
    EXPECT_NEAR(windows[i].start_seconds(), expected.start_seconds(), 1e-6);
    EXPECT_NEAR(windows[i].end_seconds(), expected.end_seconds(), 1e-3);
    ASSERT_EQ(windows[i].speech(), expected.speech());
    if (!expected.speech()) {
      EXPECT_TRUE(windows[i].scores().empty());
      continue;
    }
    ExpectWellFormedScores(windows[i].scores());
    EXPECT_LE(MaxDifference(InLabelOrder(windows[i].scores()), InLabelOrder(expected.scores())),
              tolerance);
  }
  // Utterances: runs of speech windows, each the mean of its windows.
  std::vector<std::pair<int, int>> runs;
  for (int i = 0; i < unary.timeline_size(); ++i) {
    if (!unary.timeline(i).speech()) continue;
    if (runs.empty() || runs.back().second != i) runs.push_back({i, i});
    runs.back().second = i + 1;
  }
  const std::vector<v1::UtteranceResult> utterances = stream.utterances();
  ASSERT_EQ(utterances.size(), runs.size());
  const std::vector<v1::SpeechEvent> events = stream.speech_events();
  ASSERT_EQ(events.size(), 2 * runs.size());
  for (size_t u = 0; u < runs.size(); ++u) {
    SCOPED_TRACE(absl::StrCat("utterance ", u));
    const auto [first, end] = runs[u];
    std::vector<float> mean(8, 0.0f);
    for (int i = first; i < end; ++i) {
      const std::vector<float> p = InLabelOrder(unary.timeline(i).scores());
      for (size_t c = 0; c < mean.size(); ++c) mean[c] += p[c] / (end - first);
    }
    EXPECT_EQ(utterances[u].window_count(), end - first);
    EXPECT_NEAR(utterances[u].start_seconds(), unary.timeline(first).start_seconds(), 1e-6);
    EXPECT_NEAR(utterances[u].end_seconds(), unary.timeline(end - 1).end_seconds(), 1e-3);
    ExpectWellFormedScores(utterances[u].scores());
    EXPECT_EQ(utterances[u].top_label(), utterances[u].scores(0).label());
    EXPECT_LE(MaxDifference(InLabelOrder(utterances[u].scores()), mean), tolerance);
    EXPECT_EQ(events[2 * u].type(), v1::SpeechEvent::SPEECH_STARTED);
    EXPECT_NEAR(events[2 * u].time_seconds(), utterances[u].start_seconds(), 1e-6);
    EXPECT_EQ(events[2 * u + 1].type(), v1::SpeechEvent::SPEECH_ENDED);
    EXPECT_NEAR(events[2 * u + 1].time_seconds(), utterances[u].end_seconds(), 1e-6);
  }
}

TEST_F(ServerTest, StreamingGivesUnaryResultsForChunksFrom10msTo1s) {
  SKIP_WITHOUT_SHARED_DATA();
  const std::vector<float>& speech = LongSpeech();
  const v1::ClassifyResponse unary = ClassifyPcm(speech);
  const std::string pcm = ToLinear16(speech);
  const v1::StreamingConfig config = StreamConfig(Format(v1::AUDIO_ENCODING_LINEAR16, kRate));
  // 10 ms, 100 ms, 250 ms, 1 s, and an odd size that splits samples across
  // messages.
  for (size_t chunk_bytes : {320, 3200, 8000, 32000, 333}) {
    SCOPED_TRACE(absl::StrCat(chunk_bytes, "-byte chunks"));
    ExpectStreamMatchesUnary(unary, RunStream(*stub_, config, pcm, chunk_bytes), kSameSignal);
  }
}

TEST_F(ServerTest, StreamingResamplesFloat32Stereo48k) {
  SKIP_WITHOUT_SHARED_DATA();
  const std::vector<float>& speech = LongSpeech();
  absl::StatusOr<std::vector<float>> at48k = Resample(speech, kRate, 48000);
  ASSERT_TRUE(at48k.ok()) << at48k.status();
  // The reference: the same 48 kHz audio, resampled whole by Classify.
  v1::ClassifyRequest request;
  request.set_audio(ToFloat32(*at48k, 2));
  *request.mutable_format() = Format(v1::AUDIO_ENCODING_FLOAT32, 48000, 2);
  request.set_include_timeline(true);
  v1::ClassifyResponse unary;
  const grpc::Status status = Classify(request, &unary);
  ASSERT_TRUE(status.ok()) << status.error_message();
  const StreamOutcome stream =
      RunStream(*stub_, StreamConfig(Format(v1::AUDIO_ENCODING_FLOAT32, 48000, 2)),
                request.audio(), 48000 * 4 * 2 / 10);
  ExpectStreamMatchesUnary(unary, stream, kResampledSignal);
}

TEST_F(ServerTest, StreamWithoutInterimResultsSendsEventsAndUtterancesOnly) {
  SKIP_WITHOUT_SHARED_DATA();
  const StreamOutcome stream =
      RunStream(*stub_, StreamConfig(Format(v1::AUDIO_ENCODING_LINEAR16, kRate), false),
                ToLinear16(LongSpeech()), 3200);
  ASSERT_TRUE(stream.status.ok()) << stream.status.error_message();
  EXPECT_TRUE(stream.windows().empty());
  EXPECT_FALSE(stream.utterances().empty());
  EXPECT_EQ(stream.speech_events().size(), 2 * stream.utterances().size());
}

TEST_F(ServerTest, VoiceActivitySplitsUtterancesAtSilenceUnlessDisabled) {
  SKIP_WITHOUT_SHARED_DATA();
  absl::StatusOr<std::vector<std::vector<float>>> clips = testing::RavdessClips(2);
  ASSERT_TRUE(clips.ok()) << clips.status();
  const std::vector<float> audio =
      Concat({(*clips)[0], std::vector<float>(6 * kRate, 0.0f), (*clips)[1]});
  const std::string pcm = ToLinear16(audio);
  v1::StreamingConfig config = StreamConfig(Format(v1::AUDIO_ENCODING_LINEAR16, kRate));
  const StreamOutcome with_vad = RunStream(*stub_, config, pcm, 3200);
  ASSERT_TRUE(with_vad.status.ok()) << with_vad.status.error_message();
  EXPECT_GE(with_vad.utterances().size(), 2u);
  int silent = 0;
  for (const v1::WindowResult& w : with_vad.windows()) silent += w.speech() ? 0 : 1;
  EXPECT_GE(silent, 1) << "6 s of digital silence hold a whole window";
  // The same as unary over the same audio.
  ExpectStreamMatchesUnary(ClassifyPcm(audio), with_vad, kSameSignal);

  config.mutable_voice_activity()->set_disabled(true);
  const StreamOutcome without_vad = RunStream(*stub_, config, pcm, 3200);
  ASSERT_TRUE(without_vad.status.ok()) << without_vad.status.error_message();
  ASSERT_EQ(without_vad.utterances().size(), 1u);
  EXPECT_EQ(without_vad.utterances()[0].window_count(), static_cast<int>(without_vad.windows().size()));
  for (const v1::WindowResult& w : without_vad.windows()) EXPECT_TRUE(w.speech());

  // A threshold above the speech's level makes it all silence.
  config.mutable_voice_activity()->set_disabled(false);
  config.mutable_voice_activity()->set_threshold_dbfs(-1);
  const StreamOutcome deaf = RunStream(*stub_, config, pcm, 3200);
  ASSERT_TRUE(deaf.status.ok()) << deaf.status.error_message();
  EXPECT_TRUE(deaf.utterances().empty());
  EXPECT_FALSE(deaf.windows().empty());
}

TEST_F(ServerTest, StreamThatSendsNoAudioEndsCleanly) {
  const StreamOutcome stream =
      RunStream(*stub_, StreamConfig(Format(v1::AUDIO_ENCODING_LINEAR16, kRate)), "", 3200);
  EXPECT_TRUE(stream.status.ok()) << stream.status.error_message();
  EXPECT_TRUE(stream.responses.empty());
}

// --------------------------------------------------------------------------
// Health and reflection.

TEST_F(ServerTest, HealthIsServingForTheServerAndTheService) {
  absl::StatusOr<HealthStatus::ServingStatus> server = testing::CheckHealth(*channel_);
  ASSERT_TRUE(server.ok()) << server.status();
  EXPECT_EQ(*server, HealthStatus::SERVING);
  absl::StatusOr<HealthStatus::ServingStatus> service =
      testing::CheckHealth(*channel_, "emoserve.v1.EmotionService");
  ASSERT_TRUE(service.ok()) << service.status();
  EXPECT_EQ(*service, HealthStatus::SERVING);
  absl::StatusOr<HealthStatus::ServingStatus> unknown =
      testing::CheckHealth(*channel_, "no.such.Service");
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kNotFound) << unknown.status();

  // Watch sends the current status at once.
  auto health = grpc::health::v1::Health::NewStub(channel_);
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + kPatience));
  grpc::health::v1::HealthCheckRequest request;
  auto watch = health->Watch(&context, request);
  HealthStatus first;
  ASSERT_TRUE(watch->Read(&first));
  EXPECT_EQ(first.status(), HealthStatus::SERVING);
  context.TryCancel();
  EXPECT_EQ(watch->Finish().error_code(), grpc::StatusCode::CANCELLED);
}

// A grpc.reflection.v1alpha exchange through the generic stub, with the
// messages built from the descriptors libgrpc++_reflection registers.
class ReflectionClient {
 public:
  explicit ReflectionClient(std::shared_ptr<grpc::Channel> channel) : stub_(std::move(channel)) {
    const auto* pool = google::protobuf::DescriptorPool::generated_pool();
    request_type_ = pool->FindMessageTypeByName("grpc.reflection.v1alpha.ServerReflectionRequest");
    response_type_ =
        pool->FindMessageTypeByName("grpc.reflection.v1alpha.ServerReflectionResponse");
  }
  bool ready() const { return request_type_ != nullptr && response_type_ != nullptr; }

  // Sends one request with `field` set to `value`; returns the response.
  std::unique_ptr<google::protobuf::Message> Ask(const std::string& field, const std::string& value) {
    std::unique_ptr<google::protobuf::Message> request(factory_.GetPrototype(request_type_)->New());
    request->GetReflection()->SetString(request.get(), request_type_->FindFieldByName(field), value);
    std::string bytes = request->SerializeAsString();
    grpc::Slice slice(bytes);
    grpc::ByteBuffer buffer(&slice, 1);

    grpc::CompletionQueue cq;
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(absl::Now() + kPatience));
    auto call = stub_.PrepareCall(&context,
                                  "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", &cq);
    grpc::ByteBuffer reply;
    grpc::Status status;
    int tag = 0;
    auto step = [&](auto&& start) {
      start(&tag);
      void* got = nullptr;
      bool ok = false;
      return cq.Next(&got, &ok) && ok;
    };
    bool ok = step([&](void* t) { call->StartCall(t); }) &&
              step([&](void* t) { call->Write(buffer, t); }) &&
              step([&](void* t) { call->Read(&reply, t); });
    step([&](void* t) { call->WritesDone(t); });
    step([&](void* t) { call->Finish(&status, t); });
    cq.Shutdown();
    void* ignored_tag;
    bool ignored_ok;
    while (cq.Next(&ignored_tag, &ignored_ok)) {
    }
    if (!ok) return nullptr;
    std::vector<grpc::Slice> slices;
    if (!reply.Dump(&slices).ok()) return nullptr;
    std::string reply_bytes;
    for (const grpc::Slice& s : slices) reply_bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
    std::unique_ptr<google::protobuf::Message> response(factory_.GetPrototype(response_type_)->New());
    if (!response->ParseFromString(reply_bytes)) return nullptr;
    return response;
  }

 private:
  grpc::GenericStub stub_;
  google::protobuf::DynamicMessageFactory factory_;
  const google::protobuf::Descriptor* request_type_ = nullptr;
  const google::protobuf::Descriptor* response_type_ = nullptr;
};

TEST_F(ServerTest, ReflectionListsAndDescribesTheServices) {
  ReflectionClient reflection(channel_);
  ASSERT_TRUE(reflection.ready()) << "libgrpc++_reflection's descriptors are not linked in";

  std::unique_ptr<google::protobuf::Message> listed = reflection.Ask("list_services", "*");
  ASSERT_NE(listed, nullptr);
  const auto* list_field = listed->GetDescriptor()->FindFieldByName("list_services_response");
  ASSERT_TRUE(listed->GetReflection()->HasField(*listed, list_field)) << listed->DebugString();
  const google::protobuf::Message& list = listed->GetReflection()->GetMessage(*listed, list_field);
  const auto* service_field = list.GetDescriptor()->FindFieldByName("service");
  std::vector<std::string> names;
  for (int i = 0; i < list.GetReflection()->FieldSize(list, service_field); ++i) {
    const google::protobuf::Message& service =
        list.GetReflection()->GetRepeatedMessage(list, service_field, i);
    names.push_back(service.GetReflection()->GetString(service, service.GetDescriptor()->FindFieldByName("name")));
  }
  EXPECT_THAT(names, ::testing::IsSupersetOf({"emoserve.v1.EmotionService", "grpc.health.v1.Health",
                                              "grpc.reflection.v1alpha.ServerReflection"}));

  std::unique_ptr<google::protobuf::Message> described =
      reflection.Ask("file_containing_symbol", "emoserve.v1.EmotionService");
  ASSERT_NE(described, nullptr);
  const auto* files_field = described->GetDescriptor()->FindFieldByName("file_descriptor_response");
  ASSERT_TRUE(described->GetReflection()->HasField(*described, files_field)) << described->DebugString();
  const google::protobuf::Message& files = described->GetReflection()->GetMessage(*described, files_field);
  const auto* proto_field = files.GetDescriptor()->FindFieldByName("file_descriptor_proto");
  bool found = false;
  for (int i = 0; i < files.GetReflection()->FieldSize(files, proto_field); ++i) {
    google::protobuf::FileDescriptorProto file;
    ASSERT_TRUE(file.ParseFromString(files.GetReflection()->GetRepeatedString(files, proto_field, i)));
    for (const auto& service : file.service()) {
      if (service.name() != "EmotionService") continue;
      found = true;
      std::vector<std::string> methods;
      for (const auto& method : service.method()) methods.push_back(method.name());
      EXPECT_THAT(methods, ::testing::UnorderedElementsAre("Classify", "StreamClassify", "GetModelInfo",
                                                           "ListModels"));
    }
  }
  EXPECT_TRUE(found) << "no EmotionService in the returned files";
}

// --------------------------------------------------------------------------
// Errors: codes and messages that say what to fix.

TEST_F(ServerTest, BadAudioIsInvalidArgumentWithAHint) {
  const std::vector<float> tone = testing::Sine(220, 0.3, kRate, 1.0);
  absl::StatusOr<std::string> wav = testing::EncodeAudio(tone, 1, kRate, testing::FileFormat::kWavPcm16);
  ASSERT_TRUE(wav.ok());
  struct Case {
    std::string name;
    std::string audio;
    v1::AudioFormat format;
    std::string hint;
  };
  const std::vector<Case> cases = {
      {"empty", "", {}, "audio is empty"},
      {"not audio", std::string(4000, 'x'), {}, "audio:"},
      {"truncated WAV", wav->substr(0, 30), {}, "audio:"},
      {"raw without a rate", ToLinear16(tone), Format(v1::AUDIO_ENCODING_LINEAR16, 0), "sample_rate_hertz"},
      {"rate too high", ToLinear16(tone), Format(v1::AUDIO_ENCODING_LINEAR16, 400000), "sample_rate_hertz"},
      {"unknown encoding", ToLinear16(tone), Format(static_cast<v1::AudioEncoding>(7), kRate), "encoding"},
      {"rate on a file", *wav, Format(v1::AUDIO_ENCODING_UNSPECIFIED, kRate), "AUDIO_ENCODING_UNSPECIFIED"},
      {"negative channels", ToLinear16(tone), Format(v1::AUDIO_ENCODING_LINEAR16, kRate, -2), "channel_count"},
      {"half a sample", "abc", Format(v1::AUDIO_ENCODING_LINEAR16, kRate), "multiple of 2 bytes"},
      {"NaN samples", ToFloat32({0.1f, std::nanf(""), 0.2f}), Format(v1::AUDIO_ENCODING_FLOAT32, kRate),
       "finite"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    v1::ClassifyRequest request;
    request.set_audio(c.audio);
    *request.mutable_format() = c.format;
    v1::ClassifyResponse response;
    const grpc::Status status = Classify(request, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
    EXPECT_THAT(status.error_message(), HasSubstr(c.hint));
  }
}

TEST_F(ServerTest, BadHopIsInvalidArgument) {
  const std::string pcm = ToLinear16(testing::Sine(220, 0.3, kRate, 4.0));
  for (double hop : {-1.0, 3.5, std::nan(""), 1e-9}) {
    SCOPED_TRACE(absl::StrCat("hop ", hop));
    v1::ClassifyRequest request;
    request.set_audio(pcm);
    *request.mutable_format() = Format(v1::AUDIO_ENCODING_LINEAR16, kRate);
    request.set_hop_seconds(hop);
    v1::ClassifyResponse response;
    const grpc::Status status = Classify(request, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_THAT(status.error_message(), HasSubstr("hop_seconds"));

    v1::StreamingConfig config = StreamConfig(Format(v1::AUDIO_ENCODING_LINEAR16, kRate));
    config.set_hop_seconds(hop);
    const StreamOutcome stream = RunStream(*stub_, config, pcm, 3200);
    EXPECT_EQ(stream.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_THAT(stream.status.error_message(), HasSubstr("config.hop_seconds"));
  }
}

TEST_F(ServerTest, StreamProtocolErrorsAreInvalidArgument) {
  const std::string pcm = ToLinear16(testing::Sine(220, 0.3, kRate, 1.0));
  const v1::StreamingConfig good = StreamConfig(Format(v1::AUDIO_ENCODING_LINEAR16, kRate));
  auto run_raw = [&](const std::vector<v1::StreamClassifyRequest>& requests) {
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(absl::Now() + kPatience));
    auto stream = stub_->StreamClassify(&context);
    for (const auto& request : requests) {
      if (!stream->Write(request)) break;
    }
    stream->WritesDone();
    v1::StreamClassifyResponse response;
    while (stream->Read(&response)) {
    }
    return stream->Finish();
  };
  v1::StreamClassifyRequest config_message;
  *config_message.mutable_config() = good;
  v1::StreamClassifyRequest audio_message;
  audio_message.set_audio(pcm);

  grpc::Status status = run_raw({audio_message});
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("first message"));

  status = run_raw({config_message, audio_message, config_message});
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("only come in the first message"));

  status = run_raw({});
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("before its config"));

  struct Case {
    std::string name;
    v1::StreamingConfig config;
    std::string hint;
  };
  std::vector<Case> cases;
  cases.push_back({"a file encoding", StreamConfig(v1::AudioFormat()), "raw PCM"});
  cases.push_back({"no rate", StreamConfig(Format(v1::AUDIO_ENCODING_LINEAR16, 0)), "sample_rate_hertz"});
  v1::StreamingConfig loud_threshold = good;
  loud_threshold.mutable_voice_activity()->set_threshold_dbfs(6);
  cases.push_back({"positive threshold", loud_threshold, "threshold_dbfs"});
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    const StreamOutcome stream = RunStream(*stub_, c.config, pcm, 3200);
    EXPECT_EQ(stream.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_THAT(stream.status.error_message(), HasSubstr(c.hint));
  }

  const StreamOutcome nan_audio =
      RunStream(*stub_, StreamConfig(Format(v1::AUDIO_ENCODING_FLOAT32, kRate)),
                ToFloat32({0.1f, std::nanf(""), 0.1f}), 4000);
  EXPECT_EQ(nan_audio.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(nan_audio.status.error_message(), HasSubstr("finite"));
}

TEST_F(ServerTest, OversizedInputIsResourceExhausted) {
  // A message over --max-message-bytes: gRPC itself refuses it.
  v1::ClassifyRequest huge;
  huge.set_audio(std::string(kMaxMessageBytes + 1024, '\0'));
  *huge.mutable_format() = Format(v1::AUDIO_ENCODING_LINEAR16, kRate);
  v1::ClassifyResponse response;
  grpc::Status status = Classify(huge, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << status.error_message();

  // Audio over --max-unary-seconds.
  v1::ClassifyRequest long_audio;
  long_audio.set_audio(ToLinear16(std::vector<float>(static_cast<size_t>((kMaxUnarySeconds + 1) * kRate), 0.1f)));
  *long_audio.mutable_format() = Format(v1::AUDIO_ENCODING_LINEAR16, kRate);
  status = Classify(long_audio, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(status.error_message(), HasSubstr("--max-unary-seconds"));
  EXPECT_THAT(status.error_message(), HasSubstr("StreamClassify"));

  // A stream message over --max-chunk-bytes.
  const StreamOutcome stream =
      RunStream(*stub_, StreamConfig(Format(v1::AUDIO_ENCODING_LINEAR16, kRate)),
                std::string(kMaxChunkBytes + 2, '\0'), kMaxChunkBytes + 2);
  EXPECT_EQ(stream.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(stream.status.error_message(), HasSubstr("--max-chunk-bytes"));
}

TEST_F(ServerTest, StreamLongerThanTheLimitIsOutOfRange) {
  // Digital silence: cheap (no window reaches the model), and still audio.
  const std::string pcm(static_cast<size_t>((kMaxStreamSeconds + 1) * kRate) * 2, '\0');
  const StreamOutcome stream =
      RunStream(*stub_, StreamConfig(Format(v1::AUDIO_ENCODING_LINEAR16, kRate)), pcm, 32000);
  EXPECT_EQ(stream.status.error_code(), grpc::StatusCode::OUT_OF_RANGE) << stream.status.error_message();
  EXPECT_THAT(stream.status.error_message(), HasSubstr("limit"));
  // The windows before the limit were still reported.
  EXPECT_GE(stream.windows().size(), 10u);
}

TEST_F(ServerTest, HonoursClientDeadlines) {
  const auto deadline_calls = [&](const std::string& method) {
    return MetricValue(Metrics(), "emoserve_requests_total",
                       {absl::StrCat("method=\"", method, "\""), "code=\"DEADLINE_EXCEEDED\""})
        .value_or(0);
  };
  // Two minutes of tone: 79 windows, far more than 100 ms of work. FLAC
  // keeps the message small, so that it reaches the server in time.
  absl::StatusOr<std::string> flac = testing::EncodeAudio(
      testing::Sine(220, 0.3, kRate, kMaxUnarySeconds), 1, kRate, testing::FileFormat::kFlac);
  ASSERT_TRUE(flac.ok()) << flac.status();
  v1::ClassifyRequest request;
  request.set_audio(*flac);
  v1::ClassifyResponse response;
  const grpc::Status status = Classify(request, &response, absl::Milliseconds(100));
  EXPECT_EQ(status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  // The server saw the deadline too and dropped the call's work.
  EXPECT_TRUE(Eventually([&] { return deadline_calls("Classify") >= 1; })) << Metrics();
  EXPECT_TRUE(Eventually([&] { return MetricValue(Metrics(), "emoserve_queue_depth") == 0.0; }));

  // A stream idle past its deadline ends, and the server lets go of it.
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Milliseconds(300)));
  auto stream = stub_->StreamClassify(&context);
  v1::StreamClassifyRequest config;
  *config.mutable_config() = StreamConfig(Format(v1::AUDIO_ENCODING_LINEAR16, kRate));
  stream->Write(config);
  v1::StreamClassifyResponse ignored;
  while (stream->Read(&ignored)) {
  }
  EXPECT_EQ(stream->Finish().error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  // The client's deadline passes a moment before the server's (which counts
  // from the call's arrival): the server may see the client cancel first.
  EXPECT_TRUE(Eventually([&] {
    return deadline_calls("StreamClassify") +
               MetricValue(Metrics(), "emoserve_requests_total",
                           {"method=\"StreamClassify\"", "code=\"CANCELLED\""})
                   .value_or(0) >=
           1;
  })) << Metrics();
  EXPECT_TRUE(Eventually([&] { return MetricValue(Metrics(), "emoserve_active_streams") == 0.0; }));

  // And it still serves.
  const v1::ClassifyResponse after = ClassifyPcm(testing::Sine(220, 0.3, kRate, 1.0), false);
  EXPECT_EQ(after.scores_size(), 8);
}

// --------------------------------------------------------------------------
// Concurrency.

TEST_F(ServerTest, ConcurrentClientsEachGetTheirOwnResults) {
  SKIP_WITHOUT_SHARED_DATA();
  absl::StatusOr<std::vector<std::vector<float>>> clips = testing::RavdessClips(4);
  ASSERT_TRUE(clips.ok()) << clips.status();
  // Each clip's result and timeline, one call at a time.
  std::vector<v1::ClassifyResponse> expected;
  for (const auto& clip : *clips) expected.push_back(ClassifyPcm(clip));
  for (size_t i = 1; i < expected.size(); ++i) {
    ASSERT_GT(MaxDifference(InLabelOrder(expected[i - 1].scores()), InLabelOrder(expected[i].scores())),
              5 * kSameSignal)
        << "clips " << i - 1 << " and " << i << " are indistinguishable";
  }

  constexpr int kClients = 8;
  constexpr int kCallsEach = 4;
  std::atomic<int> good{0};
  std::vector<std::thread> clients;
  for (int t = 0; t < kClients; ++t) {
    clients.emplace_back([&, t] {
      // Each client its own connection; unary calls and streams alternate.
      auto stub = v1::EmotionService::NewStub(Connect(server_->port()));
      for (int i = 0; i < kCallsEach; ++i) {
        const size_t which = (t + i) % clips->size();
        SCOPED_TRACE(absl::StrCat("client ", t, " call ", i, " clip ", which));
        const std::string pcm = ToLinear16((*clips)[which]);
        if ((t + i) % 2 == 0) {
          v1::ClassifyRequest request;
          request.set_audio(pcm);
          *request.mutable_format() = Format(v1::AUDIO_ENCODING_LINEAR16, kRate);
          v1::ClassifyResponse response;
          grpc::ClientContext context;
          context.set_deadline(absl::ToChronoTime(absl::Now() + kPatience));
          const grpc::Status status = stub->Classify(&context, request, &response);
          EXPECT_TRUE(status.ok()) << status.error_message();
          const float diff =
              MaxDifference(InLabelOrder(response.scores()), InLabelOrder(expected[which].scores()));
          EXPECT_LE(diff, kSameSignal);
          if (status.ok() && diff <= kSameSignal) ++good;
        } else {
          const StreamOutcome stream = RunStream(
              *stub, StreamConfig(Format(v1::AUDIO_ENCODING_LINEAR16, kRate)), pcm, 1600);
          ExpectStreamMatchesUnary(expected[which], stream, kSameSignal);
          if (stream.status.ok() &&
              static_cast<int>(stream.windows().size()) == expected[which].timeline_size()) {
            ++good;
          }
        }
      }
    });
  }
  for (std::thread& client : clients) client.join();
  EXPECT_EQ(good.load(), kClients * kCallsEach);
}

TEST_F(ServerTest, HoldsAThousandIdleStreams) {
  constexpr int kStreams = 1000;
  // Ten connections: a connection carries at most --max-concurrent-streams
  // (100) calls at once.
  constexpr int kChannels = 10;
  std::vector<std::unique_ptr<v1::EmotionService::Stub>> stubs;
  for (int c = 0; c < kChannels; ++c) stubs.push_back(v1::EmotionService::NewStub(Connect(server_->port())));
  const v1::StreamingConfig config = StreamConfig(Format(v1::AUDIO_ENCODING_LINEAR16, kRate));
  std::vector<std::unique_ptr<HeldStream>> streams;
  for (int i = 0; i < kStreams; ++i) {
    streams.push_back(std::make_unique<HeldStream>(*stubs[i % kChannels], config));
  }
  // All open on the server at once.
  EXPECT_TRUE(Eventually([&] {
    return MetricValue(Metrics(), "emoserve_active_streams") == static_cast<double>(kStreams);
  })) << MetricValue(Metrics(), "emoserve_active_streams").value_or(-1) << " streams open";

  // Meanwhile the server answers everything else.
  absl::StatusOr<HealthStatus::ServingStatus> health = testing::CheckHealth(*channel_);
  ASSERT_TRUE(health.ok()) << health.status();
  EXPECT_EQ(*health, HealthStatus::SERVING);
  EXPECT_EQ(ClassifyPcm(testing::Sine(220, 0.3, kRate, 1.0), false).scores_size(), 8);

  // Every stream still works: a few get audio and an utterance, the rest
  // just close.
  const std::string second_of_tone = ToLinear16(testing::Sine(220, 0.3, kRate, 1.0));
  for (int i = 0; i < kStreams; ++i) streams[i]->Close(i % 100 == 0 ? second_of_tone : "");
  int ok = 0;
  for (int i = 0; i < kStreams; ++i) {
    const grpc::Status status = streams[i]->Wait();
    EXPECT_TRUE(status.ok()) << "stream " << i << ": " << status.error_message();
    ok += status.ok() ? 1 : 0;
    if (i % 100 == 0) {
      int utterances = 0;
      for (const auto& r : streams[i]->responses()) utterances += r.has_utterance() ? 1 : 0;
      EXPECT_EQ(utterances, 1) << "stream " << i;
    }
  }
  EXPECT_EQ(ok, kStreams);
  EXPECT_TRUE(Eventually([&] { return MetricValue(Metrics(), "emoserve_active_streams") == 0.0; }));
}

// --------------------------------------------------------------------------
// Servers of their own: other limits, loading, draining.

TEST(ServerLimitsTest, StreamsBeyondMaxStreamsAreResourceExhausted) {
  ServerConfig config = TestServerConfig();
  config.max_streams = 2;
  absl::StatusOr<std::unique_ptr<Server>> server = StartServer(config);
  ASSERT_TRUE(server.ok()) << server.status();
  auto stub = v1::EmotionService::NewStub(Connect((*server)->port()));
  const v1::StreamingConfig stream_config = StreamConfig(Format(v1::AUDIO_ENCODING_LINEAR16, kRate));
  HeldStream first(*stub, stream_config);
  HeldStream second(*stub, stream_config);
  ASSERT_TRUE(Eventually([&] {
    return MetricValue((*server)->metrics().Render(), "emoserve_active_streams") == 2.0;
  }));
  const StreamOutcome third = RunStream(*stub, stream_config, "", 3200);
  EXPECT_EQ(third.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(third.status.error_message(), HasSubstr("--max-streams"));
  // A slot frees when a stream ends.
  first.Close();
  EXPECT_TRUE(first.Wait().ok());
  ASSERT_TRUE(Eventually([&] {
    return MetricValue((*server)->metrics().Render(), "emoserve_active_streams") == 1.0;
  }));
  EXPECT_TRUE(RunStream(*stub, stream_config, "", 3200).status.ok());
  second.Close();
  EXPECT_TRUE(second.Wait().ok());
}

TEST(ServerLimitsTest, FullQueueIsResourceExhausted) {
  ServerConfig config = TestServerConfig();
  config.max_queue_size = 8;
  absl::StatusOr<std::unique_ptr<Server>> server = StartServer(config);
  ASSERT_TRUE(server.ok()) << server.status();
  auto stub = v1::EmotionService::NewStub(Connect((*server)->port()));

  // One call that alone needs more windows than the queue holds.
  v1::ClassifyRequest too_many;
  too_many.set_audio(ToLinear16(testing::Sine(220, 0.3, kRate, 20.0)));
  *too_many.mutable_format() = Format(v1::AUDIO_ENCODING_LINEAR16, kRate);
  v1::ClassifyResponse response;
  grpc::ClientContext context;
  grpc::Status status = stub->Classify(&context, too_many, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(status.error_message(), HasSubstr("windows"));

  // Many calls at once, each of 4 windows: two fill the queue; the others
  // are either served after them or turned away, never lost.
  constexpr int kCalls = 48;
  v1::ClassifyRequest request;
  request.set_audio(ToLinear16(testing::Sine(220, 0.3, kRate, 7.5)));
  *request.mutable_format() = Format(v1::AUDIO_ENCODING_LINEAR16, kRate);
  std::vector<grpc::ClientContext> contexts(kCalls);
  std::vector<v1::ClassifyResponse> responses(kCalls);
  absl::Mutex mu;
  std::map<grpc::StatusCode, int> codes;
  int done = 0;
  for (int i = 0; i < kCalls; ++i) {
    contexts[i].set_deadline(absl::ToChronoTime(absl::Now() + kPatience));
    stub->async()->Classify(&contexts[i], &request, &responses[i], [&](grpc::Status s) {
      absl::MutexLock lock(&mu);
      ++codes[s.error_code()];
      ++done;
    });
  }
  {
    absl::MutexLock lock(&mu);
    ASSERT_TRUE(mu.AwaitWithTimeout(absl::Condition(+[](int* d) { return *d == kCalls; }, &done), kPatience));
  }
  EXPECT_GE(codes[grpc::StatusCode::OK], 1);
  EXPECT_GE(codes[grpc::StatusCode::RESOURCE_EXHAUSTED], 1);
  EXPECT_EQ(codes[grpc::StatusCode::OK] + codes[grpc::StatusCode::RESOURCE_EXHAUSTED], kCalls);
}

// The budget of audio in flight: a call whose audio does not fit is refused
// with RESOURCE_EXHAUSTED naming the flag; one that fits is served; all of
// it is given back.
TEST(ServerLimitsTest, AudioBeyondTheMemoryBudgetIsResourceExhausted) {
  ServerConfig config = TestServerConfig();
  config.max_audio_memory_mb = 8;
  config.max_message_bytes = 6 << 20;
  absl::StatusOr<std::unique_ptr<Server>> server = StartServer(config);
  ASSERT_TRUE(server.ok()) << server.status();
  auto stub = v1::EmotionService::NewStub(Connect((*server)->port()));
  const auto classify = [&](double seconds) {
    v1::ClassifyRequest request;
    request.set_audio(ToLinear16(testing::Sine(220, 0.3, kRate, seconds)));
    *request.mutable_format() = Format(v1::AUDIO_ENCODING_LINEAR16, kRate);
    v1::ClassifyResponse response;
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(absl::Now() + kPatience));
    return stub->Classify(&context, request, &response);
  };
  // 150 s: 4.8 MB of request and 9.6 MB decoded.
  const grpc::Status refused = classify(150);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(refused.error_message(), HasSubstr("--max-audio-memory-mb"));
  // 30 s: 1.9 MB and 1.9 MB.
  const grpc::Status served = classify(30);
  EXPECT_TRUE(served.ok()) << served.error_message();
  EXPECT_TRUE(Eventually([&] {
    return MetricValue((*server)->metrics().Render(), "emoserve_audio_memory_bytes") == 0.0;
  }));
  EXPECT_EQ(MetricValue((*server)->metrics().Render(), "emoserve_audio_memory_limit_bytes"),
            8.0 * (1 << 20));
}

// Memory running out inside one call (std::bad_alloc on a worker) fails
// that call with RESOURCE_EXHAUSTED; the server lives on and serves the
// next one.
TEST(ServerLimitsTest, AllocationFailureFailsOnlyThatCall) {
  absl::StatusOr<std::unique_ptr<Server>> server = StartServer(TestServerConfig());
  ASSERT_TRUE(server.ok()) << server.status();
  auto stub = v1::EmotionService::NewStub(Connect((*server)->port()));
  // 500 s of quiet FLAC: a few hundred kilobytes that decode to 32 MB.
  absl::StatusOr<std::string> flac = testing::EncodeAudio(
      testing::Sine(220, 0.001, kRate, 500), 1, kRate, testing::FileFormat::kFlac);
  ASSERT_TRUE(flac.ok()) << flac.status();
  v1::ClassifyRequest request;
  request.set_audio(*flac);
  v1::ClassifyResponse response;
  fail_allocations_from = 16 << 20;
  grpc::Status status;
  {
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(absl::Now() + kPatience));
    status = stub->Classify(&context, request, &response);
  }
  fail_allocations_from = 0;
  EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << status.error_message();
  EXPECT_THAT(status.error_message(), HasSubstr("ran out of memory"));
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + kPatience));
  status = stub->Classify(&context, request, &response);
  EXPECT_TRUE(status.ok()) << status.error_message();
  EXPECT_GT(response.window_count(), 300);
}

TEST(ServerLimitsTest, HealthWatchesBeyondTheLimitAreResourceExhausted) {
  ServerConfig config = TestServerConfig();
  config.max_health_watches = 2;
  absl::StatusOr<std::unique_ptr<Server>> server = StartServer(config);
  ASSERT_TRUE(server.ok()) << server.status();
  auto health = grpc::health::v1::Health::NewStub(Connect((*server)->port()));
  std::vector<std::unique_ptr<grpc::ClientContext>> contexts;
  std::vector<std::unique_ptr<grpc::ClientReader<HealthStatus>>> watches;
  for (int i = 0; i < 2; ++i) {
    contexts.push_back(std::make_unique<grpc::ClientContext>());
    contexts.back()->set_deadline(absl::ToChronoTime(absl::Now() + kPatience));
    watches.push_back(health->Watch(contexts.back().get(), {}));
    HealthStatus update;
    ASSERT_TRUE(watches.back()->Read(&update));
    EXPECT_EQ(update.status(), HealthStatus::SERVING);
  }
  grpc::ClientContext third_context;
  third_context.set_deadline(absl::ToChronoTime(absl::Now() + kPatience));
  auto third = health->Watch(&third_context, {});
  HealthStatus update;
  EXPECT_FALSE(third->Read(&update));
  const grpc::Status refused = third->Finish();
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(refused.error_message(), HasSubstr("--max-health-watches"));
  for (auto& context : contexts) context->TryCancel();
  for (auto& watch : watches) watch->Finish();
}

// A stream that sends nothing ends after --stream-idle-seconds; one that
// keeps sending (silence too) does not.
TEST(ServerLimitsTest, IdleStreamsEndAfterStreamIdleSeconds) {
  ServerConfig config = TestServerConfig();
  config.stream_idle_seconds = 1;
  absl::StatusOr<std::unique_ptr<Server>> server = StartServer(config);
  ASSERT_TRUE(server.ok()) << server.status();
  auto stub = v1::EmotionService::NewStub(Connect((*server)->port()));
  const v1::StreamingConfig stream_config = StreamConfig(Format(v1::AUDIO_ENCODING_LINEAR16, kRate));
  HeldStream idle(*stub, stream_config);
  HeldStream busy(*stub, stream_config);
  // Half-second messages of silence for three seconds.
  for (int i = 0; i < 6; ++i) {
    busy.Send(std::string(kRate, '\0'));
    absl::SleepFor(absl::Milliseconds(500));
  }
  idle.ReleaseHold();
  const grpc::Status ended = idle.Wait();
  EXPECT_EQ(ended.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_THAT(ended.error_message(), HasSubstr("--stream-idle-seconds"));
  busy.Close();
  EXPECT_TRUE(busy.Wait().ok());
}

// Audio does not compress: compressed requests are refused before they are
// inflated.
TEST(ServerLimitsTest, CompressedRequestsAreRefused) {
  absl::StatusOr<std::unique_ptr<Server>> server = StartServer(TestServerConfig());
  ASSERT_TRUE(server.ok()) << server.status();
  auto stub = v1::EmotionService::NewStub(Connect((*server)->port()));
  v1::ClassifyRequest request;
  request.set_audio(std::string(1 << 20, '\0'));  // a megabyte of zeros: a kilobyte of gzip
  *request.mutable_format() = Format(v1::AUDIO_ENCODING_LINEAR16, kRate);
  v1::ClassifyResponse response;
  grpc::ClientContext context;
  context.set_compression_algorithm(GRPC_COMPRESS_GZIP);
  context.set_deadline(absl::ToChronoTime(absl::Now() + kPatience));
  const grpc::Status status = stub->Classify(&context, request, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNIMPLEMENTED) << status.error_message();
}

// A TCP connection to 127.0.0.1:port, for speaking HTTP/2 by hand; -1 when
// it fails.
int ConnectRaw(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(port);
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0) {
    close(fd);
    return -1;
  }
  timeval timeout{static_cast<time_t>(absl::ToInt64Seconds(kPatience)), 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
  return fd;
}

// One HTTP/2 frame (RFC 9113, 4.1).
std::string Http2Frame(uint8_t type, uint8_t flags, uint32_t stream, const std::string& payload) {
  std::string f = {static_cast<char>(payload.size() >> 16), static_cast<char>(payload.size() >> 8),
                   static_cast<char>(payload.size()), static_cast<char>(type),
                   static_cast<char>(flags), static_cast<char>(stream >> 24),
                   static_cast<char>(stream >> 16), static_cast<char>(stream >> 8),
                   static_cast<char>(stream)};
  return f + payload;
}

bool SendAll(int fd, absl::string_view bytes) {
  while (!bytes.empty()) {
    const ssize_t n = send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL);
    if (n <= 0) return false;
    bytes.remove_prefix(static_cast<size_t>(n));
  }
  return true;
}

// A connection that opens calls and resets them at once, as fast as it
// can, is closed (gRPC 1.51 alone would grow without bound); the server
// serves everyone else.
TEST(ServerLimitsTest, RapidResetClosesTheConnection) {
  ServerConfig config = TestServerConfig();
  config.metrics_port = 0;
  absl::StatusOr<std::unique_ptr<Server>> server = StartServer(config);
  ASSERT_TRUE(server.ok()) << server.status();
  const int fd = ConnectRaw((*server)->port());
  ASSERT_GE(fd, 0);
  // The preface, empty SETTINGS, then HEADERS (a literal :path, enough for
  // the frame to count) and RST_STREAM for stream after stream.
  std::string flood = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + Http2Frame(0x4, 0, 0, "");
  const std::string header_block = "\x83\x86\x41\x09127.0.0.1\x44\x05/x/yz";
  for (uint32_t stream = 1; stream < 2 * 5000; stream += 2) {
    flood += Http2Frame(0x1, 0x4, stream, header_block) +
             Http2Frame(0x3, 0, stream, std::string("\0\0\0\x08", 4));
  }
  SendAll(fd, flood);  // it may be closed before all is sent
  // The server closes it: reads end (EOF or reset) within the patience.
  char buffer[4096];
  ssize_t n;
  while ((n = read(fd, buffer, sizeof(buffer))) > 0) {
  }
  EXPECT_TRUE(n == 0 || errno == ECONNRESET) << "read " << n << ": " << std::strerror(errno);
  close(fd);
  EXPECT_THAT((*server)->metrics().Render(),
              HasSubstr("emoserve_connections_refused_total{reason=\"rapid_reset\"} 1"));
  // Everyone else is served.
  auto stub = v1::EmotionService::NewStub(Connect((*server)->port()));
  v1::ClassifyRequest request;
  request.set_audio(ToLinear16(testing::Sine(220, 0.3, kRate, 1.0)));
  *request.mutable_format() = Format(v1::AUDIO_ENCODING_LINEAR16, kRate);
  v1::ClassifyResponse response;
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + kPatience));
  EXPECT_TRUE(stub->Classify(&context, request, &response).ok());
}

TEST(ServerLifecycleTest, NotServingAndUnavailableUntilTheModelIsLoaded) {
  absl::StatusOr<std::unique_ptr<Server>> server = StartServer(TestServerConfig(), false);
  ASSERT_TRUE(server.ok()) << server.status();
  auto channel = Connect((*server)->port());
  auto stub = v1::EmotionService::NewStub(channel);

  absl::StatusOr<HealthStatus::ServingStatus> health = testing::CheckHealth(*channel);
  ASSERT_TRUE(health.ok()) << health.status();
  EXPECT_EQ(*health, HealthStatus::NOT_SERVING);
  auto health_stub = grpc::health::v1::Health::NewStub(channel);
  grpc::ClientContext watch_context;
  watch_context.set_deadline(absl::ToChronoTime(absl::Now() + kPatience));
  auto watch = health_stub->Watch(&watch_context, grpc::health::v1::HealthCheckRequest());
  HealthStatus update;
  ASSERT_TRUE(watch->Read(&update));
  EXPECT_EQ(update.status(), HealthStatus::NOT_SERVING);

  v1::ClassifyRequest request;
  request.set_audio(ToLinear16(testing::Sine(220, 0.3, kRate, 1.0)));
  *request.mutable_format() = Format(v1::AUDIO_ENCODING_LINEAR16, kRate);
  v1::ClassifyResponse response;
  {
    grpc::ClientContext context;
    const grpc::Status status = stub->Classify(&context, request, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE);
    EXPECT_THAT(status.error_message(), HasSubstr("loading"));
  }
  {
    grpc::ClientContext context;
    v1::ModelInfo info;
    EXPECT_EQ(stub->GetModelInfo(&context, {}, &info).error_code(), grpc::StatusCode::UNAVAILABLE);
  }
  EXPECT_EQ(RunStream(*stub, StreamConfig(Format(v1::AUDIO_ENCODING_LINEAR16, kRate)), "", 3200)
                .status.error_code(),
            grpc::StatusCode::UNAVAILABLE);

  ASSERT_TRUE((*server)->LoadModel().ok());
  ASSERT_TRUE(watch->Read(&update));
  EXPECT_EQ(update.status(), HealthStatus::SERVING);
  {
    grpc::ClientContext context;
    const grpc::Status status = stub->Classify(&context, request, &response);
    EXPECT_TRUE(status.ok()) << status.error_message();
  }
  // Shutting down: the watcher hears NOT_SERVING, then the call ends.
  std::thread stopper([&] { (*server)->Shutdown(absl::Seconds(1)); });
  ASSERT_TRUE(watch->Read(&update));
  EXPECT_EQ(update.status(), HealthStatus::NOT_SERVING);
  EXPECT_FALSE(watch->Read(&update));
  EXPECT_EQ(watch->Finish().error_code(), grpc::StatusCode::UNAVAILABLE);
  stopper.join();
}

// Shutdown: health goes NOT_SERVING and new calls are refused; open streams
// are flushed (their last window and open utterance) and end OK; a call in
// flight finishes.
TEST(ServerLifecycleTest, ShutdownFlushesStreamsFinishesCallsAndRefusesNewOnes) {
  SKIP_WITHOUT_SHARED_DATA();
  absl::StatusOr<std::vector<std::vector<float>>> clips = testing::RavdessClips(1);
  ASSERT_TRUE(clips.ok()) << clips.status();
  absl::StatusOr<std::unique_ptr<Server>> server = StartServer(TestServerConfig());
  ASSERT_TRUE(server.ok()) << server.status();
  auto channel = Connect((*server)->port());
  auto stub = v1::EmotionService::NewStub(channel);
  v1::StreamingConfig config = StreamConfig(Format(v1::AUDIO_ENCODING_LINEAR16, kRate));
  config.set_interim_results(true);
  HeldStream idle(*stub, config);      // config only
  HeldStream talking(*stub, config);   // speech sent, not closed
  const std::string speech = ToLinear16((*clips)[0]);
  for (size_t i = 0; i < speech.size(); i += 32000) talking.Send(speech.substr(i, 32000));
  // Its first window (0-3 s) came back: the audio was read.
  ASSERT_TRUE(talking.WaitForResponses(2));
  // A long call in flight: 4 minutes at a quarter-second hop, ~950 windows.
  v1::ClassifyRequest long_request;
  std::vector<float> long_audio;
  while (long_audio.size() < 240 * kRate) {
    long_audio.insert(long_audio.end(), (*clips)[0].begin(), (*clips)[0].end());
  }
  long_request.set_audio(ToLinear16(long_audio));
  *long_request.mutable_format() = Format(v1::AUDIO_ENCODING_LINEAR16, kRate);
  long_request.set_hop_seconds(0.25);
  v1::ClassifyResponse long_response;
  grpc::ClientContext long_context;
  long_context.set_deadline(absl::ToChronoTime(absl::Now() + kPatience));
  absl::Notification long_done;
  grpc::Status long_status;
  stub->async()->Classify(&long_context, &long_request, &long_response, [&](grpc::Status s) {
    long_status = s;
    long_done.Notify();
  });
  ASSERT_TRUE(Eventually([&] {
    return MetricValue((*server)->metrics().Render(), "emoserve_queue_depth") > 100.0;
  }));

  std::thread stopper([&] { (*server)->Shutdown(kPatience); });
  EXPECT_TRUE(Eventually([&] {
    absl::StatusOr<HealthStatus::ServingStatus> health = testing::CheckHealth(*channel);
    return health.ok() && *health == HealthStatus::NOT_SERVING;
  }));
  v1::ClassifyRequest request;
  request.set_audio(ToLinear16((*clips)[0]));
  *request.mutable_format() = Format(v1::AUDIO_ENCODING_LINEAR16, kRate);
  v1::ClassifyResponse response;
  grpc::ClientContext context;
  const grpc::Status refused = stub->Classify(&context, request, &response);
  if (!long_done.HasBeenNotified()) {  // the server still drains the long call
    EXPECT_EQ(refused.error_code(), grpc::StatusCode::UNAVAILABLE);
    EXPECT_THAT(refused.error_message(), HasSubstr("shutting down"));
  }
  // The streams were flushed and ended OK: the talking one with its
  // utterance, although the client never half-closed.
  idle.ReleaseHold();  // the client never half-closes
  talking.ReleaseHold();
  EXPECT_TRUE(idle.Wait().ok());
  const grpc::Status talked = talking.Wait();
  EXPECT_TRUE(talked.ok()) << talked.error_message();
  int utterances = 0;
  for (const auto& r : talking.responses()) utterances += r.has_utterance() ? 1 : 0;
  EXPECT_EQ(utterances, 1);
  // The call in flight finished.
  ASSERT_TRUE(long_done.WaitForNotificationWithTimeout(kPatience));
  EXPECT_TRUE(long_status.ok()) << long_status.error_message();
  EXPECT_GT(long_response.window_count(), 900);
  stopper.join();
}

// Whatever clients do, shutdown ends within the grace period: a stream
// whose client reads nothing and a call that would run for long are
// cancelled at its end.
TEST(ServerLifecycleTest, ShutdownEndsWithinTheGracePeriodWhateverClientsDo) {
  ServerConfig config = TestServerConfig();
  config.max_queue_size = 4000;
  absl::StatusOr<std::unique_ptr<Server>> server = StartServer(config);
  ASSERT_TRUE(server.ok()) << server.status();
  auto stub = v1::EmotionService::NewStub(Connect((*server)->port()));
  // About 2350 windows: far longer than the grace period to compute.
  v1::ClassifyRequest request;
  request.set_audio(ToLinear16(testing::Sine(220, 0.3, kRate, 590.0)));
  *request.mutable_format() = Format(v1::AUDIO_ENCODING_LINEAR16, kRate);
  request.set_hop_seconds(0.25);
  v1::ClassifyResponse response;
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + kPatience));
  absl::Notification done;
  grpc::Status status;
  stub->async()->Classify(&context, &request, &response, [&](grpc::Status s) {
    status = s;
    done.Notify();
  });
  ASSERT_TRUE(Eventually([&] {
    return MetricValue((*server)->metrics().Render(), "emoserve_queue_depth") > 1000.0;
  }));
  const absl::Time start = absl::Now();
  (*server)->Shutdown(absl::Seconds(2));
  const absl::Duration took = absl::Now() - start;
  // A bound on a hang, with room for a loaded machine: the cut-off is at
  // 1.5 s and cancelling takes milliseconds.
  EXPECT_LT(took, absl::Seconds(2) + absl::Milliseconds(500)) << took;
  ASSERT_TRUE(done.WaitForNotificationWithTimeout(kPatience));
  EXPECT_EQ(status.error_code(), grpc::StatusCode::CANCELLED) << status.error_message();
}

// A call whose request is still arriving when gRPC shuts down never reaches
// the service, and gRPC 1.51 cancels it: its client is told UNAVAILABLE
// (not processed, send it elsewhere), not CANCELLED. The call is spoken by
// hand: its message is half sent until the server's GOAWAY.
TEST(ServerLifecycleTest, ACallStillArrivingAtShutdownIsRefusedNotCancelled) {
  absl::StatusOr<std::unique_ptr<Server>> server = StartServer(TestServerConfig());
  ASSERT_TRUE(server.ok()) << server.status();
  const int fd = ConnectRaw((*server)->port());
  ASSERT_GE(fd, 0);
  // HPACK (RFC 7541): :method POST and :scheme http indexed, then literals
  // without indexing of :authority, :path, content-type (static index 31:
  // 0x0f 0x10) and te (a new name).
  const auto literal = [](const std::string& name, absl::string_view value) {
    return name + static_cast<char>(value.size()) + std::string(value);
  };
  const std::string headers = "\x83\x86" + literal("\x01", "127.0.0.1") +
                              literal("\x04", "/emoserve.v1.EmotionService/Classify") +
                              literal("\x0f\x10", "application/grpc") +
                              literal(std::string("\0\x02te", 4), "trailers");
  const std::string message = std::string(1, '\0') + std::string("\0\0\0\x64", 4) +
                              std::string(100, '\0');  // 100 bytes of protobuf
  ASSERT_TRUE(SendAll(fd, "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + Http2Frame(0x4, 0, 0, "") +
                              Http2Frame(0x1, 0x4, 1, headers) +
                              Http2Frame(0x0, 0, 1, message.substr(0, 50))));
  std::thread shutdown([&] { (*server)->Shutdown(absl::Seconds(10)); });
  // The server's frames, until its GOAWAY (SETTINGS and PING answered, as
  // clients do); then the rest of the message; then until stream 1 ends.
  std::string received;
  bool goaway = false;
  std::optional<std::pair<uint8_t, std::string>> ending;  // stream 1's last frame
  char buffer[4096];
  ssize_t n;
  while (!ending.has_value() && (n = read(fd, buffer, sizeof(buffer))) > 0) {
    received.append(buffer, static_cast<size_t>(n));
    while (received.size() >= 9) {
      const auto* h = reinterpret_cast<const unsigned char*>(received.data());
      const size_t length = (size_t{h[0]} << 16) | (size_t{h[1]} << 8) | h[2];
      if (received.size() < 9 + length) break;
      const uint8_t type = h[3], flags = h[4];
      const uint32_t stream = (uint32_t{h[5] & 0x7fu} << 24) | (uint32_t{h[6]} << 16) |
                              (uint32_t{h[7]} << 8) | h[8];
      const std::string payload = received.substr(9, length);
      received.erase(0, 9 + length);
      if (type == 0x4 && (flags & 0x1) == 0) SendAll(fd, Http2Frame(0x4, 0x1, 0, ""));
      if (type == 0x6 && (flags & 0x1) == 0) SendAll(fd, Http2Frame(0x6, 0x1, 0, payload));
      if (type == 0x7 && !goaway) {
        goaway = true;
        SendAll(fd, Http2Frame(0x0, 0x1, 1, message.substr(50)));  // END_STREAM
      }
      if (stream == 1 && !ending.has_value() &&
          (type == 0x3 || (type == 0x1 && (flags & 0x1) != 0))) {
        ending.emplace(type, payload);
      }
    }
  }
  close(fd);
  shutdown.join();
  EXPECT_TRUE(goaway);
  ASSERT_TRUE(ending.has_value()) << "stream 1 never ended";
  // Trailers-only, written as gRPC writes them (HPACK literals, see
  // upload_admission.cc): UNAVAILABLE and why.
  EXPECT_EQ(ending->first, 0x1);
  EXPECT_THAT(ending->second, HasSubstr("\x0bgrpc-status\x02" "14"));
  EXPECT_THAT(ending->second, HasSubstr("did not start the call"));
}

// --------------------------------------------------------------------------
// Speaker adaptation.

// A model without a summary refuses speaker statistics, and says so.
TEST_F(ServerTest, SpeakerStatisticsNeedAModelThatAdapts) {
  v1::ModelInfo info;
  grpc::ClientContext info_context;
  ASSERT_TRUE(stub_->GetModelInfo(&info_context, v1::GetModelInfoRequest(), &info).ok());
  EXPECT_FALSE(info.speaker_adaptation());
  v1::ClassifyRequest request;
  request.set_audio(ToLinear16(std::vector<float>(16000, 0.1f)));
  *request.mutable_format() = Format(v1::AUDIO_ENCODING_LINEAR16, kRate);
  request.set_return_speaker_statistics(true);
  v1::ClassifyResponse response;
  grpc::Status status = Classify(request, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(status.error_message(), HasSubstr("does not adapt to speakers"));
  v1::StreamingConfig config = StreamConfig(Format(v1::AUDIO_ENCODING_LINEAR16, kRate));
  config.mutable_speaker_adaptation()->set_speaker_statistics("ESPK");
  const StreamOutcome stream = RunStream(*stub_, config, "", 3200);
  EXPECT_EQ(stream.status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  // Without statistics, a stream of such a model is simply not adapted.
  config.clear_speaker_adaptation();
  const StreamOutcome plain = RunStream(*stub_, config, ToLinear16(LongSpeech()), 32000);
  EXPECT_TRUE(plain.status.ok()) << plain.status.error_message();
  for (const v1::UtteranceResult& utterance : plain.utterances()) {
    EXPECT_FALSE(utterance.speaker_adapted());
    EXPECT_TRUE(utterance.speaker_statistics().empty());
  }
}

// The client carries a voice's statistics: from a Classify or a stream's
// utterance into later calls, which adapt to them; the server keeps none.
TEST(ServerSpeakerAdaptationTest, StatisticsTravelBetweenCallsOfOneVoice) {
  SKIP_WITHOUT_SHARED_DATA();
  ModelConfig model = testing::DefaultModelConfig();
  model.speaker_normalization = SpeakerNormalization::kSummaryMean;
  const std::string dir = testing::ScratchDir() + "/speaker_model";
  ASSERT_TRUE(testing::WriteTestModel(model, dir).ok());
  ServerConfig config = testing::TestServerConfig();
  config.model = dir;
  config.adaptation_min_speech_seconds = 1.5;  // one speech window at the 1.5 s hop
  absl::StatusOr<std::unique_ptr<Server>> server = testing::StartServer(config);
  ASSERT_TRUE(server.ok()) << server.status();
  auto stub = v1::EmotionService::NewStub(testing::Connect((*server)->port()));
  v1::ModelInfo info;
  grpc::ClientContext info_context;
  ASSERT_TRUE(stub->GetModelInfo(&info_context, v1::GetModelInfoRequest(), &info).ok());
  EXPECT_TRUE(info.speaker_adaptation());

  absl::StatusOr<std::vector<std::vector<float>>> clips = testing::RavdessClips(3);
  ASSERT_TRUE(clips.ok()) << clips.status();
  const auto classify = [&](const std::vector<float>& samples, const std::string& statistics,
                            v1::ClassifyResponse* response) {
    v1::ClassifyRequest request;
    request.set_audio(ToLinear16(samples));
    *request.mutable_format() = Format(v1::AUDIO_ENCODING_LINEAR16, kRate);
    request.set_include_timeline(true);
    request.set_speaker_statistics(statistics);
    request.set_return_speaker_statistics(true);
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(absl::Now() + kPatience));
    return stub->Classify(&context, request, response);
  };
  // Clip 0 alone: nothing to adapt to yet.
  v1::ClassifyResponse first;
  ASSERT_TRUE(classify((*clips)[0], "", &first).ok());
  EXPECT_FALSE(first.speaker_adapted());
  ASSERT_FALSE(first.speaker_statistics().empty());
  ASSERT_GE(first.speech_window_count(), 1);
  // Clip 1 with clip 0's statistics: adapted, and different from unadapted.
  v1::ClassifyResponse alone, adapted;
  ASSERT_TRUE(classify((*clips)[1], "", &alone).ok());
  ASSERT_TRUE(classify((*clips)[1], first.speaker_statistics(), &adapted).ok());
  EXPECT_FALSE(alone.speaker_adapted());
  EXPECT_TRUE(adapted.speaker_adapted());
  for (const v1::WindowResult& window : adapted.timeline()) {
    EXPECT_EQ(window.speaker_adapted(), window.speech());
  }
  EXPECT_GT(MaxDifference(InLabelOrder(alone.scores()), InLabelOrder(adapted.scores())), 1e-4);
  EXPECT_GT(adapted.speaker_statistics().size(), first.speaker_statistics().size() / 2);

  // A stream learns the voice from its first utterance and adapts the
  // second; a stream that starts from carried statistics adapts at once.
  v1::StreamingConfig stream_config = StreamConfig(Format(v1::AUDIO_ENCODING_LINEAR16, kRate));
  std::vector<float> audio = (*clips)[0];
  audio.insert(audio.end(), 48000, 0.0f);
  audio.insert(audio.end(), (*clips)[1].begin(), (*clips)[1].end());
  const StreamOutcome streamed = RunStream(*stub, stream_config, ToLinear16(audio), 3200);
  ASSERT_TRUE(streamed.status.ok()) << streamed.status.error_message();
  const std::vector<v1::UtteranceResult> utterances = streamed.utterances();
  ASSERT_GE(utterances.size(), 2u);
  const std::vector<v1::WindowResult> windows = streamed.windows();
  const auto first_speech = std::find_if(windows.begin(), windows.end(),
                                         [](const v1::WindowResult& w) { return w.speech(); });
  ASSERT_NE(first_speech, windows.end());
  EXPECT_FALSE(first_speech->speaker_adapted()) << "nothing heard before it";
  EXPECT_TRUE(utterances.back().speaker_adapted());
  EXPECT_EQ(utterances[0].speaker_statistics().size(), first.speaker_statistics().size());
  EXPECT_NE(utterances.back().speaker_statistics(), utterances[0].speaker_statistics());
  stream_config.mutable_speaker_adaptation()->set_speaker_statistics(
      adapted.speaker_statistics());
  const StreamOutcome carried = RunStream(*stub, stream_config, ToLinear16((*clips)[2]), 3200);
  ASSERT_TRUE(carried.status.ok()) << carried.status.error_message();
  for (const v1::WindowResult& window : carried.windows()) {
    EXPECT_EQ(window.speaker_adapted(), window.speech());
  }

  // Statistics that are not this model's, or garbage, are refused.
  v1::ClassifyResponse refused;
  grpc::Status status = classify((*clips)[2], "not statistics", &refused);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("speaker_statistics"));
  std::string truncated = adapted.speaker_statistics();
  truncated.pop_back();
  EXPECT_EQ(classify((*clips)[2], truncated, &refused).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  stream_config.mutable_speaker_adaptation()->set_disabled(true);
  EXPECT_EQ(RunStream(*stub, stream_config, "", 3200).status.error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
}

}  // namespace
}  // namespace emoserve
