// The paged-KV block manager; see block_manager.h. Every check runs, in the Python twin's order, before any state
// changes, so a raised error leaves the manager as it was (as in kv_pool.py).
#include "block_manager.h"

#include <algorithm>
#include <limits>

namespace vr1fast {
namespace {

constexpr int64_t kMaxInt32 = std::numeric_limits<int32_t>::max();

Error value_error(const std::string& message) { return Error(ErrorKind::kValue, message); }

std::string str(int64_t x) { return std::to_string(x); }

}  // namespace

BlockManager::BlockManager(int64_t num_pages, int64_t page_size) : num_pages_(num_pages), page_size_(page_size) {
  if (num_pages < 1 || page_size < 1) {
    throw value_error("BlockManager: num_pages=" + str(num_pages) + " and page_size=" + str(page_size) +
                      " must be >= 1");
  }
  if (num_pages > kMaxInt32 || page_size > kMaxInt32) {
    throw value_error("BlockManager: num_pages=" + str(num_pages) + " and page_size=" + str(page_size) +
                      " must be <= 2147483647 (page ids are int32)");
  }
  reset();
}

void BlockManager::reset() {
  free_.resize(num_pages_);
  for (int64_t i = 0; i < num_pages_; ++i) free_[i] = static_cast<int32_t>(num_pages_ - 1 - i);
  refs_.assign(num_pages_, 0);
  seqs_.clear();
  next_id_ = 0;
}

int64_t BlockManager::refcount(int64_t page) const {
  if (page < 0 || page >= num_pages_) {
    throw value_error("page " + str(page) + " is not in the pool (0.." + str(num_pages_ - 1) + ")");
  }
  return refs_[page];
}

const BlockManager::Seq& BlockManager::live(int64_t seq) const {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) {
    throw value_error("sequence " + str(seq) + " is not live (never allocated, or already freed)");
  }
  return it->second;
}

BlockManager::Seq& BlockManager::live(int64_t seq) {
  return const_cast<Seq&>(static_cast<const BlockManager*>(this)->live(seq));
}

std::vector<int32_t> BlockManager::take(uint64_t n) {
  if (n > free_.size()) {
    throw Error(ErrorKind::kPoolTooSmall, "KV pool out of pages: " + std::to_string(n) + " more needed, " +
                                              str(num_free()) + " free of " + str(num_pages_));
  }
  std::vector<int32_t> pages(free_.rbegin(), free_.rbegin() + static_cast<int64_t>(n));
  free_.resize(free_.size() - n);
  for (int32_t p : pages) refs_[p] = 1;
  return pages;
}

int64_t BlockManager::add(Seq seq) {
  seqs_.emplace(next_id_, std::move(seq));
  return next_id_++;
}

int64_t BlockManager::allocate(int64_t num_tokens) {
  if (num_tokens < 1) {
    throw value_error("allocate: a prompt needs at least one token, got " + str(num_tokens));
  }
  uint64_t pages = static_cast<uint64_t>(num_tokens - 1) / static_cast<uint64_t>(page_size_) + 1;
  seqs_.reserve(seqs_.size() + 1);
  return add(Seq{take(pages), num_tokens, -1, {}});
}

int64_t BlockManager::fork(int64_t seq, int64_t n) {
  const Seq& prompt = live(seq);
  if (n < 1) throw value_error("fork: sequence " + str(seq) + " needs n >= 1 samples, got " + str(n));
  if (prompt.parent != -1) {
    throw value_error("fork: sequence " + str(seq) + " is itself a fork (one prefix level only)");
  }
  seqs_.reserve(seqs_.size() + static_cast<uint64_t>(n));  // rehashing keeps references to elements valid
  for (int32_t p : prompt.own) refs_[p] += n;
  int64_t first = next_id_;
  for (int64_t i = 0; i < n; ++i) add(Seq{{}, 0, seq, prompt.own});
  return first;
}

void BlockManager::append(int64_t seq, int64_t num_tokens) {
  Seq& s = live(seq);
  if (num_tokens < 1) {
    throw value_error("append: sequence " + str(seq) + " needs num_tokens >= 1, got " + str(num_tokens));
  }
  if (std::any_of(s.own.begin(), s.own.end(), [this](int32_t p) { return refs_[p] > 1; })) {
    throw value_error("append: sequence " + str(seq) + " has pages shared by its forks; they are read-only");
  }
  // length + num_tokens < 2^64 (both are int64): no overflow; the pool bounds the length that is kept.
  uint64_t length = static_cast<uint64_t>(s.length) + static_cast<uint64_t>(num_tokens);
  uint64_t pages = (length - 1) / static_cast<uint64_t>(page_size_) + 1;
  std::vector<int32_t> fresh = take(pages - s.own.size());
  s.own.insert(s.own.end(), fresh.begin(), fresh.end());
  s.length = static_cast<int64_t>(length);
}

void BlockManager::free(int64_t seq) {
  const Seq& s = live(seq);
  for (const std::vector<int32_t>* pages : {&s.own, &s.prefix}) {
    for (int32_t p : *pages) {
      if (--refs_[p] == 0) free_.push_back(p);
    }
  }
  seqs_.erase(seq);
}

int64_t BlockManager::length(int64_t seq) const { return live(seq).length; }

int64_t BlockManager::parent(int64_t seq) const { return live(seq).parent; }

const std::vector<int32_t>& BlockManager::pages(int64_t seq) const { return live(seq).own; }

const std::vector<int32_t>& BlockManager::prefix(int64_t seq) const { return live(seq).prefix; }

int64_t BlockManager::table_width(const int64_t* seqs, int64_t n) const {
  int64_t width = 0;
  for (int64_t i = 0; i < n; ++i) width = std::max(width, static_cast<int64_t>(live(seqs[i]).own.size()));
  return width;
}

void BlockManager::page_table(const int64_t* seqs, int64_t n, int64_t width, int32_t* out) const {
  for (int64_t i = 0; i < n; ++i) {
    const std::vector<int32_t>& own = live(seqs[i]).own;
    int32_t* row = out + i * width;
    std::copy(own.begin(), own.end(), row);
    std::fill(row + own.size(), row + width, -1);
  }
}

void BlockManager::slots(int64_t seq, int64_t start, int64_t stop, int64_t* out) const {
  const Seq& s = live(seq);
  if (!(0 <= start && start <= stop && stop <= s.length)) {
    throw value_error("slots: range " + str(start) + ".." + str(stop) + " outside sequence " + str(seq) + "'s " +
                      str(s.length) + " tokens");
  }
  if (out == nullptr) return;
  for (int64_t pos = start; pos < stop; ++pos) {
    out[pos - start] = static_cast<int64_t>(s.own[pos / page_size_]) * page_size_ + pos % page_size_;
  }
}

}  // namespace vr1fast
