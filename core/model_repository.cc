#include "core/model_repository.h"

#include <algorithm>
#include <filesystem>
#include <system_error>
#include <utility>

#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace emoserve {
namespace {

namespace fs = std::filesystem;

// A version directory's name: a positive integer, nothing else ("01" and
// "1.0" are not versions, so that one number has one directory).
bool ParseVersion(const std::string& text, int64_t* version) {
  return !text.empty() && text[0] != '0' &&
         std::all_of(text.begin(), text.end(), [](char c) { return c >= '0' && c <= '9'; }) &&
         absl::SimpleAtoi(text, version) && *version > 0;
}

// Sizes and modification times of a model directory's two files: a failed
// version is tried again when they change.
std::string Stamp(const std::string& dir) {
  std::string stamp;
  for (const char* file : {"model.pt", "model.json"}) {
    std::error_code error;
    const fs::path path = fs::path(dir) / file;
    const auto size = fs::file_size(path, error);
    const auto time = fs::last_write_time(path, error);
    absl::StrAppend(&stamp, file, ":", error ? 0 : size, ":",
                    error ? 0 : time.time_since_epoch().count(), ";");
  }
  return stamp;
}

}  // namespace

absl::string_view ModelStateName(ModelState state) {
  switch (state) {
    case ModelState::kLoading:
      return "loading";
    case ModelState::kReady:
      return "ready";
    case ModelState::kFailed:
      return "failed";
  }
  return "unknown";
}

ServedModel::ServedModel(std::string name, int64_t version, std::string version_label,
                         std::unique_ptr<Engine> engine)
    : name_(std::move(name)),
      version_(version),
      version_label_(std::move(version_label)),
      engine_(std::move(engine)) {}

ServedModel::~ServedModel() = default;

ModelRepository::ModelRepository(RepositoryOptions options) : options_(std::move(options)) {
  absl::MutexLock lock(&released_->mu);
  released_->on_released = options_.on_released;
}

ModelRepository::~ModelRepository() {
  Shutdown(absl::ZeroDuration());
  {
    absl::MutexLock lock(&released_->mu);
    released_->on_released = nullptr;  // its owner may be going too
  }
  {
    absl::MutexLock lock(&mu_);
    versions_.clear();  // the last references: to released_
  }
  absl::MutexLock lock(&released_->mu);
  released_->alive -= static_cast<int>(released_->models.size());
  released_->models.clear();
}

std::shared_ptr<const ServedModel> ModelRepository::Serve(
    std::unique_ptr<const ServedModel> model) {
  {
    absl::MutexLock lock(&released_->mu);
    ++released_->alive;
  }
  // The deleter only hands the version over: it runs on whichever thread
  // drops the last reference, possibly one of the version's engine threads.
  return std::shared_ptr<const ServedModel>(
      model.release(), [released = released_](const ServedModel* model) {
        std::function<void()> notify;
        {
          absl::MutexLock lock(&released->mu);
          released->models.emplace_back(model);
          notify = released->on_released;
        }
        if (notify) notify();
      });
}

absl::StatusOr<std::unique_ptr<ModelRepository>> ModelRepository::Open(
    RepositoryOptions options) {
  std::error_code error;
  if (!fs::is_directory(options.root, error)) {
    return absl::InvalidArgumentError(
        absl::StrCat(options.single_model ? "the model directory " : "the model repository ",
                     options.root, " is not a directory"));
  }
  std::unique_ptr<ModelRepository> repository(new ModelRepository(std::move(options)));
  ModelRepository& r = *repository;
  if (r.options_.single_model) {
    // Named by its model.json, so that responses say what they said before
    // repositories existed.
    const absl::Time start = absl::Now();
    absl::StatusOr<ModelConfig> config =
        LoadModelConfig((fs::path(r.options_.root) / "model.json").string());
    if (!config.ok()) return config.status();
    const std::string name = config->name.empty() ? "default" : config->name;
    absl::StatusOr<std::unique_ptr<Engine>> engine =
        r.options_.load(r.options_.root, name, config->version);
    if (!engine.ok()) return engine.status();
    std::shared_ptr<const ServedModel> served = r.Serve(
        std::make_unique<const ServedModel>(name, 1, config->version, *std::move(engine)));
    {
      absl::MutexLock lock(&r.mu_);
      Version& version = r.versions_[{name, 1}];
      version.state = ModelState::kReady;
      version.served = std::move(served);
    }
    r.default_model_ = name;
    r.Emit({RepositoryEvent::Type::kLoaded, name, 1, config->version, "", absl::Now() - start});
    return repository;
  }
  if (absl::Status reloaded = r.Reload(); !reloaded.ok()) return reloaded;
  std::vector<std::string> names;
  {
    absl::MutexLock lock(&r.mu_);
    for (const auto& [key, version] : r.versions_) {
      if (names.empty() || names.back() != key.first) names.push_back(key.first);
    }
  }
  if (names.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the model repository ", r.options_.root,
        " has no model: it holds NAME/VERSION/ directories (VERSION a positive integer) "
        "with model.pt and model.json"));
  }
  r.default_model_ = r.options_.default_model;
  if (r.default_model_.empty()) {
    if (names.size() > 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("the model repository holds several models (", absl::StrJoin(names, ", "),
                       "): --default-model must name the one that answers requests naming none"));
    }
    r.default_model_ = names[0];
  }
  absl::StatusOr<std::shared_ptr<const ServedModel>> found = r.Find("", 0);
  if (!found.ok()) {
    return absl::Status(found.status().code(),
                        absl::StrCat("the default model: ", found.status().message()));
  }
  return repository;
}

absl::StatusOr<std::map<ModelRepository::Key, std::string>> ModelRepository::Scan() const {
  std::map<Key, std::string> found;
  std::error_code error;
  for (fs::directory_iterator names(options_.root, error), end; !error && names != end;
       names.increment(error)) {
    const std::string name = names->path().filename().string();
    if (name.empty() || name[0] == '.' || !names->is_directory(error)) continue;
    // A model directory itself is its name's only version: a plain folder
    // of model directories (like the project's models/) is a repository.
    if (fs::exists(names->path() / "model.json", error)) {
      found[{name, 1}] = names->path().string();
      continue;
    }
    for (fs::directory_iterator versions(names->path(), error); !error && versions != end;
         versions.increment(error)) {
      int64_t version = 0;
      if (!ParseVersion(versions->path().filename().string(), &version) ||
          !versions->is_directory(error)) {
        continue;
      }
      found[{name, version}] = versions->path().string();
    }
    error.clear();  // a model directory that vanished while scanned
  }
  if (error) {
    return absl::UnavailableError(
        absl::StrCat("cannot read the model repository ", options_.root, ": ", error.message()));
  }
  return found;
}

absl::Status ModelRepository::Reload() {
  if (options_.single_model) return absl::OkStatus();
  absl::MutexLock reloading(&reload_mu_);
  absl::StatusOr<std::map<Key, std::string>> on_disk = Scan();
  if (!on_disk.ok()) return on_disk.status();
  UnloadReleased();  // room for new versions
  std::vector<std::pair<Key, std::string>> to_load;
  std::vector<RepositoryEvent> retired;
  std::vector<std::shared_ptr<const ServedModel>> dropped;  // released outside the lock
  {
    absl::MutexLock lock(&mu_);
    for (auto it = versions_.begin(); it != versions_.end();) {
      if (on_disk->count(it->first) > 0) {
        ++it;
        continue;
      }
      // Its directory is gone: calls on it finish, new ones go elsewhere.
      if (it->second.served != nullptr) {
        retired_.push_back(it->second.served);
        dropped.push_back(std::move(it->second.served));
      }
      retired.push_back({RepositoryEvent::Type::kRetired, it->first.first, it->first.second,
                         absl::StrCat(it->first.second), "", absl::ZeroDuration()});
      it = versions_.erase(it);
    }
    for (const auto& [key, dir] : *on_disk) {
      auto it = versions_.find(key);
      if (it == versions_.end()) {
        versions_[key].state = ModelState::kLoading;
        to_load.emplace_back(key, dir);
      } else if (it->second.state == ModelState::kFailed && it->second.stamp != Stamp(dir)) {
        it->second.state = ModelState::kLoading;
        to_load.emplace_back(key, dir);
      }
    }
  }
  dropped.clear();
  for (const RepositoryEvent& event : retired) Emit(event);
  // Highest versions first: they are the ones calls want, and the first to
  // get room under max_loaded_versions.
  std::stable_sort(to_load.begin(), to_load.end(), [](const auto& a, const auto& b) {
    return a.first.second > b.first.second;
  });
  const std::string no_room = absl::StrCat(
      "not loaded: the server already holds its maximum of ", options_.max_loaded_versions,
      " loaded versions (--max-loaded-versions; versions still finishing calls count); "
      "remove one");
  for (const auto& [key, dir] : to_load) {
    bool room = false;
    {
      absl::MutexLock lock(&mu_);
      room = Alive() < options_.max_loaded_versions;  // loads run one at a time
      if (!room) {
        Version& version = versions_[key];
        version.state = ModelState::kFailed;
        version.stamp.clear();  // tried again at the next rescan
        version.error = no_room;
      }
    }
    if (room) {
      LoadVersion(key, dir, Stamp(dir));
    } else {
      Emit({RepositoryEvent::Type::kFailed, key.first, key.second, absl::StrCat(key.second),
            no_room, absl::ZeroDuration()});
    }
  }
  UnloadReleased();
  return absl::OkStatus();
}

int ModelRepository::Alive() const {
  absl::MutexLock lock(&released_->mu);
  return released_->alive;
}

void ModelRepository::LoadVersion(const Key& key, const std::string& dir,
                                  const std::string& stamp) {
  const absl::Time start = absl::Now();
  const std::string label = absl::StrCat(key.second);
  absl::StatusOr<std::unique_ptr<Engine>> engine = options_.load(dir, key.first, label);
  RepositoryEvent event{engine.ok() ? RepositoryEvent::Type::kLoaded
                                    : RepositoryEvent::Type::kFailed,
                        key.first, key.second, label, "", absl::Now() - start};
  if (!engine.ok()) event.detail = std::string(engine.status().message());
  std::shared_ptr<const ServedModel> served;
  if (engine.ok()) {
    served = Serve(std::make_unique<const ServedModel>(key.first, key.second, label,
                                                       *std::move(engine)));
  }
  std::shared_ptr<const ServedModel> unlisted;  // released outside the lock
  {
    absl::MutexLock lock(&mu_);
    auto it = versions_.find(key);
    if (it == versions_.end()) {
      // Removed while it loaded (only Reload removes, and it waits for us):
      // cannot happen, but an unlisted engine must still be unloaded.
      unlisted = std::move(served);
    } else {
      it->second.stamp = stamp;
      it->second.error = event.detail;
      it->second.state = served != nullptr ? ModelState::kReady : ModelState::kFailed;
      it->second.served = std::move(served);
    }
  }
  Emit(event);
}

void ModelRepository::UnloadReleased() {
  std::vector<std::unique_ptr<const ServedModel>> models;
  {
    absl::MutexLock lock(&released_->mu);
    models.swap(released_->models);
  }
  for (std::unique_ptr<const ServedModel>& model : models) {
    const RepositoryEvent event{RepositoryEvent::Type::kUnloaded, model->name(), model->version(),
                                model->version_label(), "", absl::ZeroDuration()};
    model->engine().Shutdown(absl::ZeroDuration());
    model.reset();
    {
      absl::MutexLock lock(&released_->mu);
      --released_->alive;
    }
    Emit(event);
  }
  absl::MutexLock lock(&mu_);
  retired_.erase(std::remove_if(retired_.begin(), retired_.end(),
                                [](const auto& served) { return served.expired(); }),
                 retired_.end());
}

absl::StatusOr<std::shared_ptr<const ServedModel>> ModelRepository::Find(
    absl::string_view name, int64_t version) const {
  // A name is a directory's name: longer ones exist nowhere, and are not
  // worth echoing into the error.
  constexpr size_t kMaxNameBytes = 255;
  if (name.size() > kMaxNameBytes) {
    return absl::InvalidArgumentError(absl::StrCat("a model name is at most ", kMaxNameBytes,
                                                   " bytes; got ", name.size()));
  }
  const std::string wanted(name.empty() ? absl::string_view(default_model_) : name);
  absl::MutexLock lock(&mu_);
  auto first = versions_.lower_bound({wanted, 0});
  if (first == versions_.end() || first->first.first != wanted) {
    std::vector<std::string> names;
    for (const auto& [key, v] : versions_) {
      if (names.empty() || names.back() != key.first) names.push_back(key.first);
    }
    return absl::NotFoundError(absl::StrCat("no model named \"", absl::CHexEscape(wanted),
                                            "\"; the server has: ", absl::StrJoin(names, ", ")));
  }
  auto end = versions_.lower_bound({wanted + '\0', 0});
  if (version == 0) {
    // The highest ready version.
    for (auto it = std::make_reverse_iterator(end); it != std::make_reverse_iterator(first);
         ++it) {
      if (it->second.state == ModelState::kReady) return it->second.served;
    }
    return absl::UnavailableError(
        absl::StrCat("model \"", wanted, "\" has no version ready (loading or failed)"));
  }
  auto it = versions_.find({wanted, version});
  if (it == versions_.end()) {
    std::vector<std::string> versions;
    for (auto v = first; v != end; ++v) {
      versions.push_back(absl::StrCat(v->first.second, " (", ModelStateName(v->second.state), ")"));
    }
    return absl::NotFoundError(absl::StrCat("model \"", wanted, "\" has no version ", version,
                                            "; it has: ", absl::StrJoin(versions, ", ")));
  }
  switch (it->second.state) {
    case ModelState::kReady:
      return it->second.served;
    case ModelState::kFailed:
      return absl::FailedPreconditionError(absl::StrCat("model \"", wanted, "\" version ",
                                                        version, " failed to load: ",
                                                        it->second.error));
    default:
      return absl::UnavailableError(absl::StrCat("model \"", wanted, "\" version ", version,
                                                 " is still loading; retry shortly"));
  }
}

std::vector<ModelStatus> ModelRepository::List() const {
  std::vector<ModelStatus> models;
  absl::MutexLock lock(&mu_);
  for (const auto& [key, version] : versions_) {
    if (models.empty() || models.back().name != key.first) {
      models.push_back({key.first, {}, 0, key.first == default_model_});
    }
    models.back().versions.push_back(
        {key.second, version.state, version.error,
         version.served != nullptr ? version.served->version_label() : absl::StrCat(key.second)});
    if (version.state == ModelState::kReady) models.back().default_version = key.second;
  }
  return models;
}

void ModelRepository::Shutdown(absl::Duration grace) {
  // Released versions have no work left; the destructor or
  // UnloadReleased shuts them down.
  std::vector<std::shared_ptr<const ServedModel>> engines;
  {
    absl::MutexLock lock(&mu_);
    for (const auto& [key, version] : versions_) {
      if (version.served != nullptr) engines.push_back(version.served);
    }
    for (const auto& retired : retired_) {
      if (std::shared_ptr<const ServedModel> served = retired.lock()) engines.push_back(served);
    }
  }
  // Together: each engine finishes its queued work within the same grace.
  const absl::Time deadline = absl::Now() + grace;
  for (const auto& served : engines) {
    served->engine().Shutdown(std::max(absl::ZeroDuration(), deadline - absl::Now()));
  }
}

void ModelRepository::Emit(const RepositoryEvent& event) const {
  if (options_.on_event) options_.on_event(event);
}

}  // namespace emoserve
