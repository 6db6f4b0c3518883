#include "core/exceptions.h"

#include <exception>
#include <new>

#include "absl/strings/str_cat.h"

namespace emoserve {

absl::Status StatusFromCurrentException(absl::string_view where) {
  try {
    throw;
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(absl::StrCat(
        where, ": the server ran out of memory for this call; retry later or "
               "send shorter audio"));
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat(where, " failed: ", e.what()));
  } catch (...) {
    return absl::InternalError(absl::StrCat(where, " failed: an unknown exception"));
  }
}

}  // namespace emoserve
