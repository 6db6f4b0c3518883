// Forced include (-include) of every C++ file in EMOSERVE_SANITIZE=thread
// builds: google/protobuf/map_field.h gives MapFieldBase two more members
// under __SANITIZE_THREAD__, so our instrumented code and Debian's
// uninstrumented libprotobuf would disagree on the layout of every message
// with a map field (google.protobuf.Struct in ModelInfo: crashes and
// "assertion failed: byte_count_ < total_size_"). The header is included
// here first with the macro hidden, so that its layout matches the library.
#ifndef EMOSERVE_SANITIZERS_TSAN_PROTOBUF_ABI_H_
#define EMOSERVE_SANITIZERS_TSAN_PROTOBUF_ABI_H_
#include <cstddef>  // libstdc++'s configuration (_GLIBCXX_TSAN) sees TSan
#pragma push_macro("__SANITIZE_THREAD__")
#undef __SANITIZE_THREAD__
#include <google/protobuf/map_field.h>
#pragma pop_macro("__SANITIZE_THREAD__")
#endif  // EMOSERVE_SANITIZERS_TSAN_PROTOBUF_ABI_H_
