// `emoserve bench`: a load generator for the emoserve API, and its report.
#ifndef EMOSERVE_CLIENT_BENCH_H_
#define EMOSERVE_CLIENT_BENCH_H_

#include <cstdint>
#include <map>
#include <string>

#include <nlohmann/json.hpp>

#include "client/latency.h"

namespace emoserve::client {

// What one bench run measured. Only calls (or streams) started after the
// warmup and before the end of the measured period count.
struct BenchReport {
  std::string mode;    // "closed_loop", "open_loop" or "streams"
  std::string server;  // host:port
  std::string model;   // "name version (device)"
  int concurrency = 0;    // closed loop
  double target_rps = 0;  // open loop
  int streams = 0;        // streams
  double warmup_seconds = 0;
  double duration_seconds = 0;  // the measured period
  // Calls (or streams) that ended, and how: OK or the gRPC status code.
  int64_t requests = 0;
  int64_t ok = 0;
  std::map<std::string, int64_t> errors;  // "RESOURCE_EXHAUSTED" -> count
  // Open loop: sends that fell due while --max-in-flight calls were
  // outstanding, skipped rather than delayed.
  int64_t dropped = 0;
  double audio_seconds = 0;  // audio classified by the OK calls
  // Unary: per call, from the send (open loop: from the time the send was
  // scheduled, so a slow server cannot hide its queueing). Streams: per
  // window result, from the send of the audio that completed the window.
  LatencyHistogram latency;
  // Streams: from closing the send side to the end of the call (the final
  // result's delay).
  LatencyHistogram final_latency;
  int64_t windows = 0;  // streams: window results received

  int64_t error_count() const;
  double throughput() const;  // OK calls (or streams) per second
};

nlohmann::ordered_json BenchReportJson(const BenchReport& report);
std::string FormatBenchReport(const BenchReport& report);

}  // namespace emoserve::client

#endif  // EMOSERVE_CLIENT_BENCH_H_
