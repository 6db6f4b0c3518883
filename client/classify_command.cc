// `emoserve classify FILE...`: each file's bytes to the server, several at
// a time; results in input order once all have answered.
#include <algorithm>
#include <cstdio>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "client/calls.h"
#include "client/commands.h"
#include "client/format.h"
#include "client/speaker_file.h"
#include "core/audio.h"

namespace emoserve::client {

int RunClassify(const ConnectionOptions& connection,
                const ClassifyCommandOptions& options) {
  absl::StatusOr<std::unique_ptr<v1::EmotionService::Stub>> stub =
      MakeStub(connection);
  if (!stub.ok()) {
    PrintError(stub.status().message());
    return kExitFailure;
  }
  // With --speaker the files are one voice: each call carries the
  // statistics the one before it returned, so they go one at a time.
  const bool speaker = !options.speaker_file.empty();
  std::string statistics;
  if (speaker) {
    absl::StatusOr<std::string> read = ReadSpeakerFile(options.speaker_file);
    if (!read.ok()) {
      PrintError(read.status().message());
      return kExitFailure;
    }
    statistics = *std::move(read);
  }
  const int concurrency = speaker ? 1 : options.concurrency;
  std::vector<ClassifyOutcome> outcomes(options.files.size());
  InFlightCounter in_flight;
  for (size_t i = 0; i < options.files.size(); ++i) {
    ClassifyOutcome& outcome = outcomes[i];
    outcome.file = options.files[i];
    in_flight.WaitAndAdd(concurrency);
    // Files are read here, one at a time, while earlier ones are in flight.
    absl::StatusOr<std::string> bytes = ReadFileBytes(outcome.file);
    if (!bytes.ok()) {
      in_flight.Remove();
      outcome.error_code = absl::StatusCodeToString(bytes.status().code());
      outcome.error_message = std::string(bytes.status().message());
      outcome.error_line = outcome.error_message;
      continue;
    }
    auto request = std::make_shared<v1::ClassifyRequest>();
    request->set_audio(*std::move(bytes));
    request->set_include_timeline(options.timeline);
    request->set_hop_seconds(options.hop_seconds);
    request->set_model_name(options.model.name);
    request->set_model_version(options.model.version);
    if (speaker) {
      request->set_speaker_statistics(statistics);
      request->set_return_speaker_statistics(true);
    }
    const absl::Time start = absl::Now();
    StartClassify(
        stub->get(), std::move(request), connection,
        kDefaultCallTimeoutSeconds,
        [&outcome, &in_flight, &connection, &statistics, speaker, start](
            const grpc::Status& status, const v1::ClassifyResponse& response) {
          outcome.latency = absl::Now() - start;
          if (status.ok()) {
            outcome.response = response;
            if (speaker) statistics = response.speaker_statistics();
          } else {
            outcome.error_code = StatusCodeName(status.error_code());
            outcome.error_message = status.error_message();
            // An unreachable server is not the file's fault: one line for
            // all files; the server's own verdicts name the file.
            const std::string description =
                DescribeRpcError(status, connection);
            outcome.error_line =
                IsConnectionFailure(status)
                    ? description
                    : absl::StrCat(outcome.file, ": ", description);
          }
          in_flight.Remove();
        });
  }
  in_flight.WaitForNone(absl::InfiniteDuration());
  if (speaker && !statistics.empty()) {
    if (absl::Status written = WriteSpeakerFile(options.speaker_file, statistics);
        !written.ok()) {
      PrintError(written.message());
      return kExitFailure;
    }
  }

  bool failed = false;
  std::set<std::string> reported;
  for (const ClassifyOutcome& outcome : outcomes) {
    if (outcome.ok()) continue;
    failed = true;
    if (reported.insert(outcome.error_line).second) {
      PrintError(outcome.error_line);
    }
  }
  std::string out;
  switch (options.output) {
    case OutputFormat::kText:
      out = FormatClassifyTable(outcomes, options.timeline);
      break;
    case OutputFormat::kJson:
      out = ClassifyOutcomesJson(outcomes, options.timeline).dump(2) + "\n";
      break;
    case OutputFormat::kCsv:
      out = FormatClassifyCsv(outcomes, options.timeline);
      break;
  }
  // A table with no rows would be only its header.
  const bool all_failed_table =
      options.output == OutputFormat::kText && failed &&
      std::none_of(outcomes.begin(), outcomes.end(),
                   [](const ClassifyOutcome& o) { return o.ok(); });
  if (!all_failed_table) std::fwrite(out.data(), 1, out.size(), stdout);
  std::fflush(stdout);
  return failed ? kExitFailure : kExitOk;
}

}  // namespace emoserve::client
