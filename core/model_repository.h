// Several models and versions in one server: a repository directory
// ROOT/NAME/VERSION/{model.pt,model.json} (VERSION a positive integer; the
// highest ready one answers for its name; ROOT/NAME/{model.pt,model.json}
// is version 1 of NAME), or one model directory served as a repository of
// one. Each loaded version has its own engine; calls hold
// the version they started on until they end, so a version that is
// replaced or removed finishes its calls and is destroyed after the last.
// No gRPC here; the server adapts requests and logs to this interface.
#ifndef EMOSERVE_CORE_MODEL_REPOSITORY_H_
#define EMOSERVE_CORE_MODEL_REPOSITORY_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "core/engine.h"

namespace emoserve {

enum class ModelState { kLoading, kReady, kFailed };
// "loading", "ready", "failed".
absl::string_view ModelStateName(ModelState state);

// One loaded version of a model, with its engine.
class ServedModel {
 public:
  ServedModel(std::string name, int64_t version, std::string version_label,
              std::unique_ptr<Engine> engine);
  // Shuts the engine down; the repository destroys a version only once no
  // call holds it, never on one of its engine's threads.
  ~ServedModel();

  // The name requests use, and the version: the directory's number in a
  // repository; in a repository of one, model.json's name and version 1.
  const std::string& name() const { return name_; }
  int64_t version() const { return version_; }
  // What responses report as the version: the number in a repository,
  // model.json's version string in a repository of one.
  const std::string& version_label() const { return version_label_; }
  Engine& engine() const { return *engine_; }

 private:
  const std::string name_;
  const int64_t version_;
  const std::string version_label_;
  const std::unique_ptr<Engine> engine_;
};

struct ModelVersionStatus {
  int64_t version = 0;
  ModelState state = ModelState::kLoading;
  std::string error;  // why it failed
  std::string version_label;  // as ServedModel::version_label()
};

struct ModelStatus {
  std::string name;
  std::vector<ModelVersionStatus> versions;  // ascending
  int64_t default_version = 0;               // the highest ready one; 0 when none
  bool is_default = false;                   // answers requests that name no model
};

struct RepositoryEvent {
  enum class Type { kLoaded, kFailed, kRetired, kUnloaded };
  Type type;
  std::string name;
  int64_t version = 0;
  std::string version_label;  // as ServedModel::version_label()
  std::string detail;  // the error of kFailed
  absl::Duration load_time;
};

struct RepositoryOptions {
  // A repository directory, or one model directory when `single_model`.
  std::string root;
  bool single_model = false;
  // Answers requests that name no model. "": the repository's only name
  // (required when it has several).
  std::string default_model;
  // Versions loaded at once, retired ones still finishing calls included:
  // each holds a model and an engine. Versions beyond it are reported
  // failed (highest versions are loaded first) and tried again at each
  // rescan.
  int max_loaded_versions = 4;
  // Loads, warms up and starts the engine of the model directory `dir`,
  // served as `name` and `version_label`; called on the thread that opens
  // or reloads the repository.
  std::function<absl::StatusOr<std::unique_ptr<Engine>>(
      const std::string& dir, const std::string& name, const std::string& version_label)>
      load;
  // Loads, failures, retirements and unloads, for logs and metrics; called
  // without the repository's lock held.
  std::function<void(const RepositoryEvent&)> on_event;
  // Called when the last call on a removed version ends, on that call's
  // thread (possibly one of the version's own engine threads, where its
  // engine cannot be destroyed): wake a thread that calls UnloadReleased().
  // Without it, the next Reload() unloads it.
  std::function<void()> on_released;
};

class ModelRepository {
 public:
  // Scans the repository and loads every version. Fails when the root is
  // not a directory, when the default model has no ready version, or when
  // several models exist and none is the default.
  static absl::StatusOr<std::unique_ptr<ModelRepository>> Open(RepositoryOptions options);
  // Shuts down and destroys every version. Calls must be over: a version
  // still held then is never destroyed.
  ~ModelRepository();

  // Rescans: loads versions that appeared (or whose failed files changed)
  // and retires those whose directory is gone. A version that fails to
  // load is reported failed and never replaces a working one. Loads run on
  // the calling thread, one at a time; calls go on meanwhile. Also unloads
  // released versions.
  absl::Status Reload();

  // Shuts down and destroys the removed versions whose last call has ended
  // (see RepositoryOptions::on_released), reporting each unloaded.
  void UnloadReleased();

  // The version a call runs on: `name` "" is the default model, `version`
  // 0 its highest ready version. kInvalidArgument for a name longer than
  // a directory's (255 bytes); kNotFound names what exists; kUnavailable
  // when the version is loading, kFailedPrecondition when it failed.
  absl::StatusOr<std::shared_ptr<const ServedModel>> Find(absl::string_view name,
                                                          int64_t version) const;

  std::vector<ModelStatus> List() const;
  const std::string& default_model() const { return default_model_; }

  // Every engine stops accepting work and finishes what it has within
  // `grace` (see Engine::Shutdown).
  void Shutdown(absl::Duration grace);

 private:
  struct Version {
    ModelState state = ModelState::kLoading;
    std::string error;
    // What the directory's files were when last loaded (a failed version
    // is tried again when they change).
    std::string stamp;
    std::shared_ptr<const ServedModel> served;
  };
  using Key = std::pair<std::string, int64_t>;
  // Versions whose last reference is gone, waiting to be destroyed off the
  // calls' threads; shared with every reference's deleter.
  struct Released {
    absl::Mutex mu;
    std::vector<std::unique_ptr<const ServedModel>> models ABSL_GUARDED_BY(mu);
    int alive ABSL_GUARDED_BY(mu) = 0;  // versions holding an engine
    std::function<void()> on_released ABSL_GUARDED_BY(mu);
  };

  explicit ModelRepository(RepositoryOptions options);
  // The one reference the repository keeps to a new version; the calls'
  // copies share it, and the last one to go hands the version to released_.
  std::shared_ptr<const ServedModel> Serve(std::unique_ptr<const ServedModel> model);
  // Directories on disk: name -> version -> directory.
  absl::StatusOr<std::map<Key, std::string>> Scan() const;
  // Loads `dir` as `key`, outside the lock.
  void LoadVersion(const Key& key, const std::string& dir, const std::string& stamp);
  int Alive() const;
  void Emit(const RepositoryEvent& event) const;

  const RepositoryOptions options_;
  const std::shared_ptr<Released> released_ = std::make_shared<Released>();
  std::string default_model_;
  absl::Mutex reload_mu_;  // one Reload at a time
  mutable absl::Mutex mu_;
  std::map<Key, Version> versions_ ABSL_GUARDED_BY(mu_);
  // Removed versions that calls may still hold (for Shutdown).
  std::vector<std::weak_ptr<const ServedModel>> retired_ ABSL_GUARDED_BY(mu_);
};

}  // namespace emoserve

#endif  // EMOSERVE_CORE_MODEL_REPOSITORY_H_
