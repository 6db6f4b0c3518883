// libFuzzer: the connection guard's reading of HTTP/2 (upload admission and
// the frame counter) on anything. The input is a sequence of chunks, each a
// byte (bit 7: from gRPC rather than the client; bits 0-6: length) and its
// bytes, fed as they would arrive; the first byte's bit 0 says the server
// is shutting down (gRPC's cancellations of unanswered calls are then
// rewritten, and trailers held whole to be checked). The guard must never
// crash, must hand on gRPC's bytes in order (its own frames between them;
// checked when nothing is rewritten), and must give the upload budget back
// in full when the connection goes.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "absl/strings/string_view.h"
#include "core/memory_budget.h"
#include "server/upload_admission.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace emoserve;
  // Small, so that refusals happen: 64 KiB, the last 8 KiB for messages of
  // up to 512 bytes.
  MemoryBudget budget(64 << 10, nullptr, "the fuzz upload budget",
                      SmallLeaseReserve::EighthOf(64 << 10));
  if (size == 0) return 0;
  const bool shutting_down = (data[0] & 1) != 0;
  {
    UploadAdmission uploads(&budget);
    std::string to_server, to_client, from_server;
    size_t at = 1;
    while (at < size) {
      const uint8_t head = data[at++];
      const size_t length = std::min<size_t>(head & 0x7f, size - at);
      const absl::string_view chunk(reinterpret_cast<const char*>(data + at), length);
      at += length;
      if ((head & 0x80) != 0) {
        from_server.append(chunk.data(), chunk.size());
        uploads.FromServer(chunk, shutting_down, &to_client);
      } else if (!uploads.FromClient(chunk, &to_server)) {
        break;  // closed: too many refused streams
      }
      uploads.FlushToClient(&to_client);
      if (budget.used() < 0 || budget.used() > budget.capacity()) std::abort();
    }
    // gRPC's bytes reach the client in order, the guard's only between
    // them; the start of a frame header still incomplete (at most 8 bytes)
    // waits for the rest.
    size_t found = 0;
    for (char c : to_client) {
      if (found < from_server.size() && c == from_server[found]) ++found;
    }
    if (!shutting_down && found + 8 < from_server.size()) std::abort();
  }
  if (budget.used() != 0) std::abort();
  return 0;
}
