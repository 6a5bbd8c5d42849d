// The C interface of the block manager (the one bindings file): plain C functions over an opaque handle, loaded
// with ctypes by vr1fast/rollout/block_manager.py. No torch and no Python headers, so one binary serves every
// torch and Python version. Each call returns its value, or BM_ERROR (INT64_MIN) after an error whose kind
// (1 ValueError, 2 PoolTooSmall, 3 MemoryError, 4 internal) and one-line message bm_error_kind() and
// bm_error_message() report, per thread, until the next failing call. No C++ exception crosses this boundary.
#include <cstdint>
#include <limits>
#include <new>
#include <string>

#include "block_manager.h"

#define BM_API extern "C" __attribute__((visibility("default")))

namespace {

using vr1fast::BlockManager;
using vr1fast::Error;
using vr1fast::ErrorKind;

constexpr int64_t kError = std::numeric_limits<int64_t>::min();
constexpr int64_t kAbiVersion = 1;  // bump when a signature below changes; the Python face checks it

thread_local int last_kind = 0;
thread_local std::string last_message;

template <class F>
int64_t guarded(F&& f) {
  try {
    return f();
  } catch (const Error& e) {
    last_kind = static_cast<int>(e.kind);
    last_message = e.what();
  } catch (const std::bad_alloc&) {
    last_kind = static_cast<int>(ErrorKind::kMemory);
    last_message = "block manager: out of host memory";
  } catch (const std::exception& e) {
    last_kind = static_cast<int>(ErrorKind::kInternal);
    last_message = std::string("block manager: ") + e.what();
  }
  return kError;
}

BlockManager* bm(void* handle) { return static_cast<BlockManager*>(handle); }

}  // namespace

BM_API int64_t bm_abi_version() { return kAbiVersion; }
BM_API int bm_error_kind() { return last_kind; }
BM_API const char* bm_error_message() { return last_message.c_str(); }

BM_API void* bm_create(int64_t num_pages, int64_t page_size) {
  BlockManager* out = nullptr;
  guarded([&] {
    out = new BlockManager(num_pages, page_size);
    return int64_t{0};
  });
  return out;
}

BM_API void bm_destroy(void* h) { delete bm(h); }

BM_API int64_t bm_reset(void* h) {
  return guarded([&] {
    bm(h)->reset();
    return int64_t{0};
  });
}

BM_API int64_t bm_num_free(void* h) { return bm(h)->num_free(); }

BM_API int64_t bm_refcount(void* h, int64_t page) { return guarded([&] { return bm(h)->refcount(page); }); }

BM_API int64_t bm_allocate(void* h, int64_t num_tokens) {
  return guarded([&] { return bm(h)->allocate(num_tokens); });
}

BM_API int64_t bm_fork(void* h, int64_t seq, int64_t n) { return guarded([&] { return bm(h)->fork(seq, n); }); }

BM_API int64_t bm_append(void* h, int64_t seq, int64_t num_tokens) {
  return guarded([&] {
    bm(h)->append(seq, num_tokens);
    return int64_t{0};
  });
}

BM_API int64_t bm_free(void* h, int64_t seq) {
  return guarded([&] {
    bm(h)->free(seq);
    return int64_t{0};
  });
}

BM_API int64_t bm_length(void* h, int64_t seq) { return guarded([&] { return bm(h)->length(seq); }); }

BM_API int64_t bm_parent(void* h, int64_t seq) { return guarded([&] { return bm(h)->parent(seq); }); }

// *data points into the manager (valid until its next change); returns the number of pages.
BM_API int64_t bm_pages(void* h, int64_t seq, const int32_t** data) {
  return guarded([&] {
    const auto& pages = bm(h)->pages(seq);
    *data = pages.data();
    return static_cast<int64_t>(pages.size());
  });
}

BM_API int64_t bm_prefix(void* h, int64_t seq, const int32_t** data) {
  return guarded([&] {
    const auto& pages = bm(h)->prefix(seq);
    *data = pages.data();
    return static_cast<int64_t>(pages.size());
  });
}

BM_API int64_t bm_table_width(void* h, const int64_t* seqs, int64_t n) {
  return guarded([&] { return bm(h)->table_width(seqs, n); });
}

BM_API int64_t bm_page_table(void* h, const int64_t* seqs, int64_t n, int64_t width, int32_t* out) {
  return guarded([&] {
    if (width < bm(h)->table_width(seqs, n)) throw std::length_error("page_table: width below a row's pages");
    bm(h)->page_table(seqs, n, width, out);
    return int64_t{0};
  });
}

// out == nullptr only checks the range (so the caller can size out without a second length call).
BM_API int64_t bm_slots(void* h, int64_t seq, int64_t start, int64_t stop, int64_t* out) {
  return guarded([&] {
    bm(h)->slots(seq, start, stop, out);
    return int64_t{0};
  });
}
