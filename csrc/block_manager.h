// The paged-KV block manager: the C++ twin of vr1fast/rollout/kv_pool.py's BlockManager (same methods, same
// semantics, same error messages; the Python class's module docstring is the specification). No torch and no
// Python headers: c_api.cpp exposes it as plain C functions that vr1fast/rollout/block_manager.py loads with ctypes.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace vr1fast {

// What the Python face raises: ValueError, or kv_pool.PoolTooSmall when the pool runs out of pages.
enum class ErrorKind : int { kValue = 1, kPoolTooSmall = 2, kMemory = 3, kInternal = 4 };

struct Error : std::runtime_error {
  Error(ErrorKind kind, const std::string& message) : std::runtime_error(message), kind(kind) {}
  ErrorKind kind;
};

class BlockManager {
 public:
  // Page ids are int32 (the page tables' dtype), so num_pages and page_size are at most 2^31 - 1.
  BlockManager(int64_t num_pages, int64_t page_size);

  void reset();
  int64_t num_pages() const { return num_pages_; }
  int64_t page_size() const { return page_size_; }
  int64_t num_free() const { return static_cast<int64_t>(free_.size()); }
  int64_t refcount(int64_t page) const;

  int64_t allocate(int64_t num_tokens);  // the new prompt's id
  int64_t fork(int64_t seq, int64_t n);  // the first of n consecutive sample ids
  void append(int64_t seq, int64_t num_tokens);
  void free(int64_t seq);

  int64_t length(int64_t seq) const;
  int64_t parent(int64_t seq) const;
  const std::vector<int32_t>& pages(int64_t seq) const;
  const std::vector<int32_t>& prefix(int64_t seq) const;

  // Checks every seq is live, in order, and returns the most own pages of any of them (0 when n == 0).
  int64_t table_width(const int64_t* seqs, int64_t n) const;
  // Fills out [n, width] row-major with each seq's own pages, -1 after its last page; width >= table_width.
  void page_table(const int64_t* seqs, int64_t n, int64_t width, int32_t* out) const;
  // Checks 0 <= start <= stop <= length(seq); fills out[stop - start] with flat slots when out is not null.
  void slots(int64_t seq, int64_t start, int64_t stop, int64_t* out) const;

 private:
  struct Seq {
    std::vector<int32_t> own;     // own pages, in order
    int64_t length;               // own slots
    int64_t parent;               // the forked-from prompt, -1 for a prompt
    std::vector<int32_t> prefix;  // the prompt's pages at the fork
  };

  const Seq& live(int64_t seq) const;
  Seq& live(int64_t seq);
  std::vector<int32_t> take(uint64_t n);
  int64_t add(Seq seq);

  int64_t num_pages_, page_size_;
  std::vector<int32_t> free_;  // LIFO: back() is handed out next
  std::vector<int64_t> refs_;  // live holders of each page
  std::unordered_map<int64_t, Seq> seqs_;
  int64_t next_id_ = 0;
};

}  // namespace vr1fast
