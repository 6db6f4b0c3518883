// Exceptions stop at thread and module boundaries: a worker, a model runner
// or a gRPC reaction that catches one turns it into the status of the one
// call it was serving, and the process lives on.
#ifndef EMOSERVE_CORE_EXCEPTIONS_H_
#define EMOSERVE_CORE_EXCEPTIONS_H_

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace emoserve {

// The status for the exception being handled (call it inside a catch
// block): kResourceExhausted for std::bad_alloc (memory ran out), kInternal
// naming `where` and the exception's message for anything else.
absl::Status StatusFromCurrentException(absl::string_view where);

}  // namespace emoserve

#endif  // EMOSERVE_CORE_EXCEPTIONS_H_
