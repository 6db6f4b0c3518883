// Shared by the fuzz targets: the engine on the stand-in model
// (tests/fuzz/model: the bundled model's labels and rate, small features),
// and the request limits.
#ifndef EMOSERVE_TESTS_FUZZ_FUZZ_SUPPORT_H_
#define EMOSERVE_TESTS_FUZZ_FUZZ_SUPPORT_H_

#include "core/engine.h"
#include "server/requests.h"

namespace emoserve::fuzz {

// Created once per process; aborts (a fuzzer set-up error) when it cannot.
Engine& SharedEngine();

// The server's limits, with durations cut so that one input stays fast.
RequestLimits Limits();

}  // namespace emoserve::fuzz

#endif  // EMOSERVE_TESTS_FUZZ_FUZZ_SUPPORT_H_
