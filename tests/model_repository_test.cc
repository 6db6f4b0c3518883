// ModelRepository on real model directories: versions side by side, the
// default, failures that never replace a working version, reloads that add
// and retire versions while calls still hold them.
#include "core/model_repository.h"

#include <atomic>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "tests/test_model.h"

namespace emoserve {
namespace {

namespace fs = std::filesystem;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

class ModelRepositoryTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = fs::path(::testing::TempDir()) /
            ::testing::UnitTest::GetInstance()->current_test_info()->name();
    fs::remove_all(root_);
    fs::create_directories(root_);
  }

  // A small test model at NAME/VERSION, its weights from `seed`.
  void AddVersion(const std::string& name, int version, uint64_t seed = 7) {
    ASSERT_TRUE(testing::WriteTestModel(testing::SmallModelConfig(),
                                        (root_ / name / absl::StrCat(version)).string(), seed)
                    .ok());
  }

  RepositoryOptions Options(const std::string& default_model = "") {
    RepositoryOptions options;
    options.root = root_.string();
    options.default_model = default_model;
    options.load = [](const std::string& dir, const std::string& /*name*/,
                      const std::string& /*version*/) -> absl::StatusOr<std::unique_ptr<Engine>> {
      absl::StatusOr<std::unique_ptr<Model>> model = Model::Load(dir);
      if (!model.ok()) return model.status();
      EngineOptions engine;
      engine.feature_threads = 1;
      return Engine::Create(std::shared_ptr<const Model>(*std::move(model)), engine);
    };
    options.on_event = [this](const RepositoryEvent& event) {
      absl::MutexLock lock(&mu_);
      events_.push_back(absl::StrCat(event.type == RepositoryEvent::Type::kLoaded   ? "loaded "
                                     : event.type == RepositoryEvent::Type::kFailed ? "failed "
                                     : event.type == RepositoryEvent::Type::kRetired
                                         ? "retired "
                                         : "unloaded ",
                                     event.name, "/", event.version));
    };
    return options;
  }

  std::vector<std::string> TakeEvents() {
    absl::MutexLock lock(&mu_);
    return std::exchange(events_, {});
  }

  fs::path root_;
  absl::Mutex mu_;
  std::vector<std::string> events_ ABSL_GUARDED_BY(mu_);
};

// Probabilities for one window of a tone through `served`'s engine.
absl::StatusOr<std::vector<float>> Classify(const ServedModel& served) {
  const ModelConfig& config = served.engine().model().config();
  ClipRequest clip;
  clip.samples.resize(config.window_samples());
  for (size_t i = 0; i < clip.samples.size(); ++i) {
    clip.samples[i] = static_cast<float>(0.3 * std::sin(0.05 * i));
  }
  absl::Notification done;
  absl::StatusOr<ClipResult> result;
  clip.done = [&](absl::StatusOr<ClipResult> r) {
    result = std::move(r);
    done.Notify();
  };
  served.engine().Classify(std::move(clip));
  done.WaitForNotification();
  if (!result.ok()) return result.status();
  return result->probabilities;
}

std::string Summary(const std::vector<ModelStatus>& models) {
  std::string text;
  for (const ModelStatus& model : models) {
    absl::StrAppend(&text, model.name, model.is_default ? "*" : "", " default ",
                    model.default_version, ":");
    for (const ModelVersionStatus& v : model.versions) {
      absl::StrAppend(&text, " ", v.version, "=", ModelStateName(v.state));
    }
    absl::StrAppend(&text, "; ");
  }
  return text;
}

TEST_F(ModelRepositoryTest, ServesModelsAndVersionsSideBySide) {
  AddVersion("fast", 1, 1);
  AddVersion("fast", 2, 2);
  AddVersion("accurate", 1, 3);
  // A model directory as a name: its only version, 1.
  ASSERT_TRUE(testing::WriteTestModel(testing::SmallModelConfig(), (root_ / "plain").string(), 4)
                  .ok());
  // A broken version and things that are not versions.
  fs::create_directories(root_ / "fast" / "3");
  std::ofstream(root_ / "fast" / "3" / "model.json") << "{ not json";
  fs::create_directories(root_ / "fast" / "01");
  fs::create_directories(root_ / ".hidden" / "1");

  absl::StatusOr<std::unique_ptr<ModelRepository>> repository =
      ModelRepository::Open(Options("fast"));
  ASSERT_TRUE(repository.ok()) << repository.status();
  EXPECT_EQ(Summary((*repository)->List()),
            "accurate default 1: 1=ready; fast* default 2: 1=ready 2=ready 3=failed; "
            "plain default 1: 1=ready; ");
  EXPECT_THAT((*repository)->List()[1].versions[2].error, HasSubstr("model.json"));

  absl::StatusOr<std::shared_ptr<const ServedModel>> by_default = (*repository)->Find("", 0);
  ASSERT_TRUE(by_default.ok()) << by_default.status();
  EXPECT_EQ((*by_default)->name(), "fast");
  EXPECT_EQ((*by_default)->version(), 2);
  EXPECT_EQ((*by_default)->version_label(), "2");
  absl::StatusOr<std::shared_ptr<const ServedModel>> first = (*repository)->Find("fast", 1);
  absl::StatusOr<std::shared_ptr<const ServedModel>> other = (*repository)->Find("accurate", 0);
  ASSERT_TRUE(first.ok() && other.ok());
  // Three engines, three sets of weights: three different answers.
  absl::StatusOr<std::vector<float>> a = Classify(**by_default);
  absl::StatusOr<std::vector<float>> b = Classify(**first);
  absl::StatusOr<std::vector<float>> c = Classify(**other);
  ASSERT_TRUE(a.ok() && b.ok() && c.ok());
  EXPECT_NE(*a, *b);
  EXPECT_NE(*a, *c);

  absl::StatusOr<std::shared_ptr<const ServedModel>> unknown = (*repository)->Find("slow", 0);
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(unknown.status().message(), HasSubstr("the server has: accurate, fast, plain"));
  absl::StatusOr<std::shared_ptr<const ServedModel>> plain = (*repository)->Find("plain", 0);
  ASSERT_TRUE(plain.ok()) << plain.status();
  EXPECT_EQ((*plain)->version_label(), "1");
  absl::StatusOr<std::shared_ptr<const ServedModel>> missing = (*repository)->Find("fast", 9);
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(missing.status().message(), HasSubstr("1 (ready), 2 (ready), 3 (failed)"));
  absl::StatusOr<std::shared_ptr<const ServedModel>> broken = (*repository)->Find("fast", 3);
  EXPECT_EQ(broken.status().code(), absl::StatusCode::kFailedPrecondition);
  // Highest versions first.
  EXPECT_THAT(TakeEvents(), ElementsAre("failed fast/3", "loaded fast/2", "loaded accurate/1",
                                        "loaded fast/1", "loaded plain/1"));
}

TEST_F(ModelRepositoryTest, SeveralModelsNeedADefaultAndAnEmptyRepositoryIsRefused) {
  absl::StatusOr<std::unique_ptr<ModelRepository>> empty = ModelRepository::Open(Options());
  EXPECT_THAT(empty.status().message(), HasSubstr("has no model"));
  AddVersion("a", 1);
  AddVersion("b", 1);
  absl::StatusOr<std::unique_ptr<ModelRepository>> ambiguous = ModelRepository::Open(Options());
  EXPECT_EQ(ambiguous.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(ambiguous.status().message(), HasSubstr("several models (a, b): --default-model"));
  absl::StatusOr<std::unique_ptr<ModelRepository>> wrong = ModelRepository::Open(Options("c"));
  EXPECT_EQ(wrong.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(wrong.status().message(), HasSubstr("default model"));
  RepositoryOptions not_a_directory = Options();
  not_a_directory.root = (root_ / "nowhere").string();
  EXPECT_THAT(ModelRepository::Open(not_a_directory).status().message(),
              HasSubstr("is not a directory"));
}

// A new version takes new calls once loaded; a removed one keeps serving
// the calls that hold it and is unloaded after the last; a failed version
// never replaces a working one and is tried again when its files change.
TEST_F(ModelRepositoryTest, ReloadAddsAndRetiresVersionsWhileCallsHoldThem) {
  AddVersion("m", 1, 1);
  absl::StatusOr<std::unique_ptr<ModelRepository>> repository = ModelRepository::Open(Options());
  ASSERT_TRUE(repository.ok()) << repository.status();
  ModelRepository& r = **repository;
  absl::StatusOr<std::shared_ptr<const ServedModel>> held = r.Find("", 0);
  ASSERT_TRUE(held.ok());
  absl::StatusOr<std::vector<float>> before = Classify(**held);
  ASSERT_TRUE(before.ok());
  TakeEvents();

  // Broken version 2: version 1 goes on answering.
  fs::create_directories(root_ / "m" / "2");
  std::ofstream(root_ / "m" / "2" / "model.json") << "[]";
  ASSERT_TRUE(r.Reload().ok());
  EXPECT_EQ(Summary(r.List()), "m* default 1: 1=ready 2=failed; ");
  EXPECT_EQ((*r.Find("", 0))->version(), 1);
  ASSERT_TRUE(r.Reload().ok());  // unchanged files: not tried again
  EXPECT_THAT(TakeEvents(), ElementsAre("failed m/2"));

  // Version 2 repaired, version 1 removed while a call holds it.
  fs::remove_all(root_ / "m" / "2");
  AddVersion("m", 2, 2);
  fs::remove_all(root_ / "m" / "1");
  ASSERT_TRUE(r.Reload().ok());
  EXPECT_EQ(Summary(r.List()), "m* default 2: 2=ready; ");
  EXPECT_EQ((*r.Find("", 0))->version(), 2);
  EXPECT_EQ(r.Find("m", 1).status().code(), absl::StatusCode::kNotFound);
  absl::StatusOr<std::vector<float>> still = Classify(**held);
  ASSERT_TRUE(still.ok()) << still.status();
  EXPECT_EQ(*still, *before);
  EXPECT_THAT(TakeEvents(), ElementsAre("retired m/1", "loaded m/2"));

  // The last call on version 1 ends: the next reload unloads it.
  held->reset();
  ASSERT_TRUE(r.Reload().ok());
  EXPECT_THAT(TakeEvents(), ElementsAre("unloaded m/1"));
}

// The last call on a removed version ends: on_released fires on that
// call's thread, and UnloadReleased destroys it with no rescan.
TEST_F(ModelRepositoryTest, ARemovedVersionIsReleasedWhenItsLastCallEnds) {
  AddVersion("m", 1, 1);
  AddVersion("m", 2, 2);
  std::atomic<int> released{0};
  RepositoryOptions options = Options();
  options.on_released = [&released] { ++released; };
  absl::StatusOr<std::unique_ptr<ModelRepository>> repository =
      ModelRepository::Open(std::move(options));
  ASSERT_TRUE(repository.ok()) << repository.status();
  ModelRepository& r = **repository;
  absl::StatusOr<std::shared_ptr<const ServedModel>> first = r.Find("m", 1);
  absl::StatusOr<std::shared_ptr<const ServedModel>> second = r.Find("m", 1);
  ASSERT_TRUE(first.ok() && second.ok());
  fs::remove_all(root_ / "m" / "1");
  ASSERT_TRUE(r.Reload().ok());
  TakeEvents();

  first->reset();
  r.UnloadReleased();
  EXPECT_EQ(released, 0);  // a call still holds it
  EXPECT_THAT(TakeEvents(), ElementsAre());
  std::thread last_call([&second] { second->reset(); });
  last_call.join();
  EXPECT_EQ(released, 1);
  EXPECT_THAT(TakeEvents(), ElementsAre());  // handed over, not destroyed on that thread
  r.UnloadReleased();
  EXPECT_THAT(TakeEvents(), ElementsAre("unloaded m/1"));
  EXPECT_EQ(Summary(r.List()), "m* default 2: 2=ready; ");

  // A version removed with no call on it is released by the rescan itself.
  AddVersion("m", 3, 3);
  ASSERT_TRUE(r.Reload().ok());
  fs::remove_all(root_ / "m" / "2");
  ASSERT_TRUE(r.Reload().ok());
  EXPECT_EQ(released, 2);
  EXPECT_THAT(TakeEvents(), ElementsAre("loaded m/3", "retired m/2", "unloaded m/2"));
}

// At most max_loaded_versions versions hold an engine, the highest first;
// one still finishing a call counts until it is unloaded, and a version
// left out loads at a rescan once there is room.
TEST_F(ModelRepositoryTest, LoadedVersionsAreBoundedHighestFirst) {
  for (int version : {1, 2, 3}) AddVersion("m", version, version);
  RepositoryOptions options = Options();
  options.max_loaded_versions = 2;
  absl::StatusOr<std::unique_ptr<ModelRepository>> repository =
      ModelRepository::Open(std::move(options));
  ASSERT_TRUE(repository.ok()) << repository.status();
  ModelRepository& r = **repository;
  EXPECT_EQ(Summary(r.List()), "m* default 3: 1=failed 2=ready 3=ready; ");
  EXPECT_THAT(r.List()[0].versions[0].error, HasSubstr("--max-loaded-versions"));

  // Version 3 removed while a call holds it: still no room for version 1.
  absl::StatusOr<std::shared_ptr<const ServedModel>> held = r.Find("m", 3);
  ASSERT_TRUE(held.ok());
  fs::remove_all(root_ / "m" / "3");
  ASSERT_TRUE(r.Reload().ok());
  EXPECT_EQ(Summary(r.List()), "m* default 2: 1=failed 2=ready; ");
  // Its call over, the next rescan unloads it and loads version 1.
  held->reset();
  ASSERT_TRUE(r.Reload().ok());
  EXPECT_EQ(Summary(r.List()), "m* default 2: 1=ready 2=ready; ");
}

// The project's models/ folder: the bundled model, the trainer's CNN +
// Transformer and the speaker-adaptive model, each a model directory,
// served side by side.
TEST_F(ModelRepositoryTest, TheProjectsModelsFolderServesAllThreeModels) {
  RepositoryOptions options = Options("default");
  options.root = std::string(EMOSERVE_SOURCE_DIR) + "/models";
  absl::StatusOr<std::unique_ptr<ModelRepository>> repository =
      ModelRepository::Open(std::move(options));
  ASSERT_TRUE(repository.ok()) << repository.status();
  EXPECT_EQ(Summary((*repository)->List()),
            "cnn-transformer default 1: 1=ready; default* default 1: 1=ready; "
            "speaker-adaptive default 1: 1=ready; ");
  for (const char* name : {"default", "cnn-transformer", "speaker-adaptive"}) {
    absl::StatusOr<std::shared_ptr<const ServedModel>> served = (*repository)->Find(name, 0);
    ASSERT_TRUE(served.ok()) << served.status();
    absl::StatusOr<std::vector<float>> probabilities = Classify(**served);
    ASSERT_TRUE(probabilities.ok()) << probabilities.status();
    EXPECT_EQ(probabilities->size(), 8u) << name;
    EXPECT_EQ((*served)->engine().model().summary_size() > 0,
              std::string(name) == "speaker-adaptive")
        << name << ": only the speaker-adaptive model adapts";
  }
}

// --model DIR: a repository of one, named and versioned by its model.json.
TEST_F(ModelRepositoryTest, OneModelDirectoryIsARepositoryOfOne) {
  AddVersion("m", 1);
  RepositoryOptions options = Options();
  options.root = (root_ / "m" / "1").string();
  options.single_model = true;
  absl::StatusOr<std::unique_ptr<ModelRepository>> repository =
      ModelRepository::Open(std::move(options));
  ASSERT_TRUE(repository.ok()) << repository.status();
  absl::StatusOr<std::shared_ptr<const ServedModel>> served = (*repository)->Find("", 0);
  ASSERT_TRUE(served.ok());
  const ModelConfig& config = (*served)->engine().model().config();
  EXPECT_EQ((*served)->name(), config.name);
  EXPECT_EQ((*served)->version_label(), config.version);
  EXPECT_TRUE((*repository)->Find(config.name, 1).ok());
  EXPECT_TRUE((*repository)->Reload().ok());
  const std::vector<ModelStatus> listed = (*repository)->List();
  ASSERT_EQ(listed.size(), 1u);
  ASSERT_EQ(listed[0].versions.size(), 1u);
  EXPECT_EQ(listed[0].versions[0].version, 1);
  EXPECT_EQ(listed[0].versions[0].version_label, config.version);  // what responses say
  // Names longer than a directory's are refused.
  EXPECT_EQ((*repository)->Find(std::string(256, 'm'), 0).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace emoserve
