/*
 * cachestat(2) (Linux >= 6.5): whether a file range is entirely in the page cache, without
 * touching the data. Used before sending a file range with sendfile() from the main thread,
 * which must never wait for the disk (see netio.c and cachedRange in blockd_native.c).
 */
#ifndef BLOCKD_CACHESTAT_H
#define BLOCKD_CACHESTAT_H

#include <errno.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef __NR_cachestat
#if defined(__x86_64__) || defined(__aarch64__) || defined(__riscv)
/* 451 in the generic syscall table, which these use (glibc headers older than the kernel). */
#define __NR_cachestat 451
#endif
#endif

struct blockd_cachestat_range {
  uint64_t off;
  uint64_t len;
};

struct blockd_cachestat {
  uint64_t nr_cache;
  uint64_t nr_dirty;
  uint64_t nr_writeback;
  uint64_t nr_evicted;
  uint64_t nr_recently_evicted;
};

/* Set once the kernel said ENOSYS: do not ask again. */
static int blockd_cachestat_missing;

/*
 * 1 when every page of [off, off+len) is in the page cache, 0 when some are not (or the range
 * runs past EOF), -1 when the kernel cannot tell (no cachestat, or not for this kind of file).
 * `len` must be > 0 (0 would mean "to EOF" to the kernel).
 */
static inline int blockd_range_cached(int fd, uint64_t off, uint64_t len) {
#ifdef __NR_cachestat
  if (blockd_cachestat_missing || len == 0) return -1;
  long page = sysconf(_SC_PAGESIZE);
  if (page <= 0) return -1;
  struct blockd_cachestat_range r = { off, len };
  struct blockd_cachestat cs = { 0, 0, 0, 0, 0 };
  long rc;
  do rc = syscall(__NR_cachestat, fd, &r, &cs, 0); while (rc < 0 && errno == EINTR);
  if (rc < 0) {
    if (errno == ENOSYS) blockd_cachestat_missing = 1;
    return -1;
  }
  uint64_t first = off / (uint64_t)page;
  uint64_t last = (off + len - 1) / (uint64_t)page;
  return cs.nr_cache >= last - first + 1 ? 1 : 0;
#else
  (void)fd;
  (void)off;
  (void)len;
  return -1;
#endif
}

#endif
