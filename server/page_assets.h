// The page at / (server/page/), compiled into the server by
// server/page/embed.cmake: HTML, script and style, no external resources.
#ifndef EMOSERVE_SERVER_PAGE_ASSETS_H_
#define EMOSERVE_SERVER_PAGE_ASSETS_H_

#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace emoserve {

struct PageFile {
  absl::string_view path;  // "/" for index.html
  absl::string_view content_type;
  absl::string_view body;
};

absl::Span<const PageFile> PageFiles();

}  // namespace emoserve

#endif  // EMOSERVE_SERVER_PAGE_ASSETS_H_
