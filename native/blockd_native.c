/*
 * blockd native helpers: the few Linux file calls Node.js does not expose, and zstd (through
 * libzstd.so.1 loaded at run time, see "zstd, loaded at run time" below).
 * Every function takes plain numbers (fd, offsets as doubles that are safe integers),
 * never blocks for long (SEEK_DATA/fallocate are metadata operations; preadv2 uses
 * RWF_NOWAIT; synchronous zstd is meant for small clusters), and reports failures as a thrown
 * Error with `.code` = errno name.
 */
#define _GNU_SOURCE
#include <node_api.h>
#include <uv.h>
#include <stdbool.h>
#include <errno.h>
#include <pthread.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#include <dlfcn.h>
#include <linux/falloc.h>
#include "cachestat.h"
#include "errno_error.h"
#include "netio.h"

#ifndef RWF_NOWAIT
#define RWF_NOWAIT 0x00000008
#endif

static int get_args(napi_env env, napi_callback_info info, size_t want, napi_value *argv) {
  size_t argc = want;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < want) {
    napi_throw_type_error(env, NULL, "wrong number of arguments");
    return -1;
  }
  return 0;
}

static int get_i64(napi_env env, napi_value v, int64_t *out) {
  double d;
  if (napi_get_value_double(env, v, &d) != napi_ok || d != d || d < 0 || d > 9007199254740991.0) {
    napi_throw_range_error(env, NULL, "expected a non-negative safe integer");
    return -1;
  }
  *out = (int64_t)d;
  return 0;
}

static napi_value num(napi_env env, double d) {
  napi_value r;
  napi_create_double(env, d, &r);
  return r;
}

/* seek(fd, offset, whence) with whence SEEK_DATA/SEEK_HOLE; returns offset or -1 on ENXIO. */
static napi_value do_seek(napi_env env, napi_callback_info info, int whence) {
  napi_value argv[2];
  int64_t fd, off;
  if (get_args(env, info, 2, argv) || get_i64(env, argv[0], &fd) || get_i64(env, argv[1], &off)) return NULL;
  off_t r = lseek((int)fd, (off_t)off, whence);
  if (r < 0) {
    if (errno == ENXIO) return num(env, -1);
    return blockd_throw_errno(env, errno, whence == SEEK_DATA ? "lseek(SEEK_DATA)" : "lseek(SEEK_HOLE)");
  }
  return num(env, (double)r);
}
static napi_value seek_data(napi_env env, napi_callback_info info) { return do_seek(env, info, SEEK_DATA); }
static napi_value seek_hole(napi_env env, napi_callback_info info) { return do_seek(env, info, SEEK_HOLE); }

static napi_value do_fallocate(napi_env env, napi_callback_info info, int mode, const char *what) {
  napi_value argv[3];
  int64_t fd, off, len;
  if (get_args(env, info, 3, argv) || get_i64(env, argv[0], &fd) || get_i64(env, argv[1], &off) ||
      get_i64(env, argv[2], &len)) return NULL;
  int r;
  do { r = fallocate((int)fd, mode, (off_t)off, (off_t)len); } while (r < 0 && errno == EINTR);
  if (r < 0) return blockd_throw_errno(env, errno, what);
  return NULL;
}
/* punchHole(fd, offset, length): deallocate, size unchanged; reads return zeroes. */
static napi_value punch_hole(napi_env env, napi_callback_info info) {
  return do_fallocate(env, info, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, "fallocate(PUNCH_HOLE)");
}
/* zeroRange(fd, offset, length): zero without writing data, may extend allocation. */
static napi_value zero_range(napi_env env, napi_callback_info info) {
  return do_fallocate(env, info, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, "fallocate(ZERO_RANGE)");
}

/*
 * preadNowait(fd, buffer, offset): preadv2(RWF_NOWAIT). Returns bytes read, or -1 when the
 * read would block (EAGAIN) or RWF_NOWAIT is unsupported (EOPNOTSUPP/EINVAL/ENOSYS).
 */
static napi_value pread_nowait(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  int64_t fd, off;
  void *data;
  size_t len;
  if (get_args(env, info, 3, argv) || get_i64(env, argv[0], &fd) || get_i64(env, argv[2], &off)) return NULL;
  if (napi_get_buffer_info(env, argv[1], &data, &len) != napi_ok) {
    napi_throw_type_error(env, NULL, "expected a Buffer");
    return NULL;
  }
  struct iovec iov = { data, len };
  ssize_t r;
  do { r = preadv2((int)fd, &iov, 1, (off_t)off, RWF_NOWAIT); } while (r < 0 && errno == EINTR);
  if (r < 0) {
    if (errno == EAGAIN || errno == EOPNOTSUPP || errno == EINVAL || errno == ENOSYS) return num(env, -1);
    return blockd_throw_errno(env, errno, "preadv2");
  }
  return num(env, (double)r);
}

/*
 * cachedRange(fd, offset, length): 1 when the whole range is in the page cache, 0 when not,
 * -1 when the kernel cannot tell (no cachestat(2): Linux < 6.5). One syscall, no data touched.
 */
static napi_value cached_range(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  int64_t fd, off, len;
  if (get_args(env, info, 3, argv) || get_i64(env, argv[0], &fd) || get_i64(env, argv[1], &off) ||
      get_i64(env, argv[2], &len)) {
    return NULL;
  }
  if (len == 0 || fd > 0x7fffffff) return num(env, -1);
  return num(env, blockd_range_cached((int)fd, (uint64_t)off, (uint64_t)len));
}

/*
 * ioBatch(fd, write, bufs, offsets, results, callback): run a batch of positioned reads or
 * writes on one libuv thread-pool thread, then call `callback()` on the main thread with
 * `results[i]` = bytes transferred (a read stops early only at EOF) or -errno.
 *
 * One thread-pool round trip for many requests: the NBD server hands over every request that
 * arrived in one socket read at once, instead of paying a worker wake-up and a completion per
 * request. The batch keeps references to the buffers, the results array and the callback until
 * it completes, so the memory it uses cannot be collected under it.
 */
typedef struct {
  char *data;
  size_t len;
  int64_t off;
  double res;
} batch_op;

typedef struct {
  napi_async_work work;
  napi_ref keep[3]; /* bufs, results, callback */
  double *results;
  int fd;
  int write;
  size_t n;
  batch_op ops[];
} io_batch;

static void batch_execute(napi_env env, void *data) {
  (void)env;
  io_batch *b = data;
  for (size_t i = 0; i < b->n; i++) {
    batch_op *o = &b->ops[i];
    size_t done = 0;
    o->res = 0;
    while (done < o->len) {
      ssize_t r = b->write ? pwrite(b->fd, o->data + done, o->len - done, (off_t)(o->off + (int64_t)done))
                           : pread(b->fd, o->data + done, o->len - done, (off_t)(o->off + (int64_t)done));
      if (r < 0) {
        if (errno == EINTR) continue;
        o->res = -(double)errno;
        break;
      }
      if (r == 0) {
        /* EOF on read; a write that makes no progress is an I/O error. */
        if (b->write) o->res = -(double)EIO;
        break;
      }
      done += (size_t)r;
    }
    if (o->res == 0) o->res = (double)done;
  }
}

/*
 * Batch arguments shared by ioBatch and laneSubmit: argv[2] bufs (Buffers), argv[3] offsets,
 * argv[4] results (Float64Array, one slot per buffer), argv[5] completion callback.
 * Returns nonzero with a pending JS exception when they are malformed.
 */
static int check_batch_args(napi_env env, napi_value *argv, uint32_t *n, double **results) {
  bool is_array = false, is_ta = false;
  if (napi_is_array(env, argv[2], &is_array) != napi_ok || !is_array ||
      napi_get_array_length(env, argv[2], n) != napi_ok || *n == 0 || *n > 4096) {
    napi_throw_type_error(env, NULL, "bufs must be a non-empty array (at most 4096)");
    return 1;
  }
  napi_typedarray_type ta_type;
  size_t ta_len = 0;
  void *ta_data = NULL;
  napi_is_typedarray(env, argv[4], &is_ta);
  if (!is_ta || napi_get_typedarray_info(env, argv[4], &ta_type, &ta_len, &ta_data, NULL, NULL) != napi_ok ||
      ta_type != napi_float64_array || ta_len < *n) {
    napi_throw_type_error(env, NULL, "results must be a Float64Array of the batch length");
    return 1;
  }
  napi_valuetype cbt;
  if (napi_typeof(env, argv[5], &cbt) != napi_ok || cbt != napi_function) {
    napi_throw_type_error(env, NULL, "callback must be a function");
    return 1;
  }
  *results = ta_data;
  return 0;
}

/* Fill ops[0..n) from the bufs/offsets arguments; nonzero with a pending exception on error. */
static int fill_batch_ops(napi_env env, napi_value *argv, batch_op *ops, uint32_t n) {
  for (uint32_t i = 0; i < n; i++) {
    napi_value buf, offv;
    void *data;
    size_t len;
    int64_t off;
    if (napi_get_element(env, argv[2], i, &buf) != napi_ok || napi_get_buffer_info(env, buf, &data, &len) != napi_ok) {
      napi_throw_type_error(env, NULL, "bufs must hold Buffers");
      return 1;
    }
    if (napi_get_element(env, argv[3], i, &offv) != napi_ok || get_i64(env, offv, &off)) return 1;
    ops[i].data = data;
    ops[i].len = len;
    ops[i].off = off;
  }
  return 0;
}

static void batch_free(napi_env env, io_batch *b) {
  for (int i = 0; i < 3; i++) {
    if (b->keep[i]) napi_delete_reference(env, b->keep[i]);
  }
  if (b->work) napi_delete_async_work(env, b->work);
  free(b);
}

static void batch_complete(napi_env env, napi_status status, void *data) {
  io_batch *b = data;
  for (size_t i = 0; i < b->n; i++) {
    b->results[i] = status == napi_ok ? b->ops[i].res : -(double)ECANCELED;
  }
  napi_value cb, undef;
  if (napi_get_reference_value(env, b->keep[2], &cb) == napi_ok && napi_get_undefined(env, &undef) == napi_ok) {
    batch_free(env, b);
    napi_call_function(env, undef, cb, 0, NULL, NULL);
    return;
  }
  batch_free(env, b);
}

static napi_value io_batch_submit(napi_env env, napi_callback_info info) {
  napi_value argv[6];
  int64_t fd;
  bool write = false;
  uint32_t n = 0;
  if (get_args(env, info, 6, argv) || get_i64(env, argv[0], &fd)) return NULL;
  napi_get_value_bool(env, argv[1], &write);
  double *results = NULL;
  if (check_batch_args(env, argv, &n, &results)) return NULL;
  io_batch *b = calloc(1, sizeof(io_batch) + n * sizeof(batch_op));
  if (!b) return blockd_throw_errno(env, ENOMEM, "ioBatch");
  b->fd = (int)fd;
  b->write = write;
  b->n = n;
  b->results = results;
  if (fill_batch_ops(env, argv, b->ops, n)) {
    free(b);
    return NULL;
  }
  napi_value name;
  napi_create_string_utf8(env, "blockd:ioBatch", NAPI_AUTO_LENGTH, &name);
  if (napi_create_reference(env, argv[2], 1, &b->keep[0]) != napi_ok ||
      napi_create_reference(env, argv[4], 1, &b->keep[1]) != napi_ok ||
      napi_create_reference(env, argv[5], 1, &b->keep[2]) != napi_ok ||
      napi_create_async_work(env, NULL, name, batch_execute, batch_complete, b, &b->work) != napi_ok ||
      napi_queue_async_work(env, b->work) != napi_ok) {
    batch_free(env, b);
    napi_throw_error(env, NULL, "cannot queue ioBatch");
    return NULL;
  }
  return NULL;
}

/*
 * Write lanes. Buffered writes to one file serialise on the inode lock in the kernel, so the
 * best a server can do is keep exactly one thread writing, never idle while requests wait, and
 * never make two threads fight over the lock. laneCreate() returns a lane; laneSubmit(lane, fd,
 * bufs, offsets, results, callback) appends a batch of pwrites to it. One thread-pool thread
 * drains the lane batch after batch (it does not return to the pool while work is queued), and
 * each finished batch is reported to the main thread, which fills `results` (bytes written or
 * -errno) and calls `callback()`. laneClose(lane) releases it once nothing is queued.
 *
 * Finished batches go back on a lock-free list (the worker pushes, the main thread takes the
 * whole list) and one uv_async wake-up, which libuv coalesces while one is pending. A
 * thread-safe function did this before: its queue has a mutex that both threads take for every
 * batch, and on a 2-core machine the worker was often preempted while holding it, so the main
 * thread went to sleep on the lock (9 % of its time in futex waits under 4 KiB random writes).
 */
typedef struct lane_job {
  struct lane_job *next;
  napi_ref keep[3]; /* bufs, results, callback */
  double *results;
  int fd;
  size_t n;
  batch_op ops[];
} lane_job;

typedef struct {
  pthread_mutex_t mu;
  pthread_cond_t gone;  /* signalled when the worker leaves */
  pthread_cond_t work;  /* signalled when a job arrives for a parked worker, or on close */
  lane_job *head, *tail; /* head is also read without the lock, as a hint, while spinning */
  int active;        /* a worker is draining the lane */
  int parked;        /* the worker waits on `work` */
  int closing;       /* laneClose() is waiting for the worker to leave */
  uint32_t pending;  /* jobs submitted and not yet reported (main thread only) */
  int64_t spin_ns;   /* how long a worker that ran dry polls the queue before it parks */
  int64_t park_ns;   /* how long it then waits on `work` before it returns to the pool */
  lane_job *done;    /* finished jobs, newest first (worker pushes, main thread takes all) */
  uv_async_t *async; /* wakes the main thread for `done`; referenced while jobs are pending */
  napi_env env;
  napi_async_context actx;
  napi_ref resource;
  int closed;        /* laneClose (or the finalizer) has shut the lane down */
  int handle_gone;   /* its uv handle is closed */
  int ext_gone;      /* its JavaScript handle was collected */
} write_lane;

/*
 * How long a lane's worker stays with the lane once it has run dry (BLOCKD_LANE_SPIN_US,
 * BLOCKD_LANE_PARK_US; 0 = not at all). Without this, every batch that arrives after the lane
 * went idle is a new thread-pool work item: a wake-up of whichever pool thread is free (so the
 * lane wanders over all of them, cache-cold), plus a completion round trip to the main thread
 * for the work item itself. A parked worker is woken by a condition variable instead and needs
 * no CPU while it waits; the spin trades CPU for the wake-up and is off by default (2 cores).
 */
#define LANE_SPIN_US_DEFAULT 0
/*
 * Parked workers keep their pool thread: at most this many at a time in the whole process, so
 * that lanes of many files written now and then cannot take the pool from everything else
 * (reads, other lanes' first runs). The others return to the pool when they run dry, as before.
 */
#define LANE_MAX_PARKED 2
static int lanes_parked;
#define LANE_PARK_US_DEFAULT 2000
#define LANE_WAIT_US_MAX 60000000 /* 60 s */

static int64_t lane_env_us(const char *name, int64_t dflt) {
  const char *v = getenv(name);
  if (!v || !*v) return dflt;
  char *end = NULL;
  long long n = strtoll(v, &end, 10);
  if (*end || n < 0) return dflt;
  return n > LANE_WAIT_US_MAX ? LANE_WAIT_US_MAX : n;
}

static int64_t mono_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/*
 * Worker, lock held: the next job, waiting for one (spin, then park) when the queue is empty.
 * NULL means the worker leaves the lane (active is cleared; the lock is still held).
 */
/* Take one of the LANE_MAX_PARKED slots; 0 when all are taken. */
static int lane_park_slot(void) {
  if (__atomic_add_fetch(&lanes_parked, 1, __ATOMIC_ACQ_REL) <= LANE_MAX_PARKED) return 1;
  __atomic_sub_fetch(&lanes_parked, 1, __ATOMIC_ACQ_REL);
  return 0;
}

static lane_job *lane_next(write_lane *l) {
  if (!l->head && !l->closing && l->spin_ns > 0) {
    pthread_mutex_unlock(&l->mu);
    int64_t until = mono_ns() + l->spin_ns;
    unsigned n = 0;
    while (!__atomic_load_n(&l->head, __ATOMIC_ACQUIRE) && !__atomic_load_n(&l->closing, __ATOMIC_ACQUIRE)) {
      if ((++n & 63) == 0 && mono_ns() >= until) break;
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
    }
    pthread_mutex_lock(&l->mu);
  }
  if (!l->head && !l->closing && l->park_ns > 0 && lane_park_slot()) {
    int64_t until = mono_ns() + l->park_ns;
    struct timespec ts = { .tv_sec = (time_t)(until / 1000000000), .tv_nsec = (long)(until % 1000000000) };
    l->parked = 1;
    while (!l->head && !l->closing) {
      if (pthread_cond_timedwait(&l->work, &l->mu, &ts) == ETIMEDOUT) break;
    }
    l->parked = 0;
    __atomic_sub_fetch(&lanes_parked, 1, __ATOMIC_ACQ_REL);
  }
  lane_job *j = l->head;
  if (!j) {
    l->active = 0;
    pthread_cond_broadcast(&l->gone);
    return NULL;
  }
  __atomic_store_n(&l->head, j->next, __ATOMIC_RELEASE);
  if (!l->head) l->tail = NULL;
  return j;
}

typedef struct {
  napi_async_work work;
  write_lane *lane;
} lane_run;

static void lane_execute(napi_env env, void *data) {
  (void)env;
  write_lane *l = ((lane_run *)data)->lane;
  for (;;) {
    pthread_mutex_lock(&l->mu);
    lane_job *j = lane_next(l);
    pthread_mutex_unlock(&l->mu);
    if (!j) return;
    for (size_t i = 0; i < j->n; i++) {
      batch_op *o = &j->ops[i];
      size_t done = 0;
      o->res = 0;
      while (done < o->len) {
        ssize_t r = pwrite(j->fd, o->data + done, o->len - done, (off_t)(o->off + (int64_t)done));
        if (r < 0) {
          if (errno == EINTR) continue;
          o->res = -(double)errno;
          break;
        }
        if (r == 0) {
          o->res = -(double)EIO;
          break;
        }
        done += (size_t)r;
      }
      if (o->res == 0) o->res = (double)done;
    }
    /* Report it. The send comes before lane_next, so laneClose (which waits until the worker
     * has left) never closes the handle under it. */
    lane_job *old = __atomic_load_n(&l->done, __ATOMIC_RELAXED);
    do {
      j->next = old;
    } while (!__atomic_compare_exchange_n(&l->done, &old, j, 1, __ATOMIC_RELEASE, __ATOMIC_RELAXED));
    uv_async_send(l->async);
  }
}

static void lane_run_done(napi_env env, napi_status status, void *data) {
  (void)status;
  lane_run *r = data;
  napi_delete_async_work(env, r->work);
  free(r);
}

/* Main thread: forget a job without reporting it (laneClose, failed submit). */
static void lane_job_drop(napi_env env, lane_job *j) {
  for (int i = 0; i < 3; i++) {
    if (j->keep[i]) napi_delete_reference(env, j->keep[i]);
  }
  free(j);
}

/* Main thread: the finished jobs in submission order (the list is newest first). */
static lane_job *lane_take_done(write_lane *l) {
  lane_job *list = __atomic_exchange_n(&l->done, NULL, __ATOMIC_ACQUIRE), *fifo = NULL;
  while (list) {
    lane_job *next = list->next;
    list->next = fifo;
    fifo = list;
    list = next;
  }
  return fifo;
}

/*
 * Main thread (uv_async): report every finished job, in order, in one callback scope, so that
 * nextTick and the microtasks run once after all of them.
 */
static void lane_async_cb(uv_async_t *h) {
  write_lane *l = h->data;
  if (!__atomic_load_n(&l->done, __ATOMIC_ACQUIRE)) return;
  napi_env env = l->env;
  napi_handle_scope hs;
  napi_callback_scope cs = NULL;
  napi_value resource = NULL, undef = NULL;
  /* Taken only once JavaScript can be called: a failure here leaves them for the next wake-up. */
  if (napi_open_handle_scope(env, &hs) != napi_ok) return;
  lane_job *j = lane_take_done(l);
  napi_get_undefined(env, &undef);
  if (napi_get_reference_value(env, l->resource, &resource) == napi_ok && resource) {
    napi_open_callback_scope(env, resource, l->actx, &cs);
  }
  while (j) {
    lane_job *next = j->next;
    if (l->pending > 0 && --l->pending == 0) uv_unref((uv_handle_t *)l->async);
    for (size_t i = 0; i < j->n; i++) j->results[i] = j->ops[i].res;
    napi_value cb = NULL;
    napi_get_reference_value(env, j->keep[2], &cb);
    lane_job_drop(env, j);
    if (cb && napi_call_function(env, undef, cb, 0, NULL, NULL) == napi_pending_exception) {
      napi_value exc;
      napi_get_and_clear_last_exception(env, &exc);
      napi_fatal_exception(env, exc);
    }
    j = next;
  }
  if (cs) napi_close_callback_scope(env, cs);
  napi_close_handle_scope(env, hs);
}

static void lane_free(write_lane *l) {
  pthread_cond_destroy(&l->work);
  pthread_cond_destroy(&l->gone);
  pthread_mutex_destroy(&l->mu);
  free(l);
}

/* The lane lives until both its uv handle is closed and its JavaScript handle is collected. */
static void lane_handle_closed(uv_handle_t *h) {
  write_lane *l = h->data;
  free(h);
  l->async = NULL;
  l->handle_gone = 1;
  if (l->ext_gone) lane_free(l);
}

static void lane_shutdown(napi_env env, write_lane *l);

static void lane_external_finalize(napi_env env, void *data, void *hint) {
  (void)hint;
  write_lane *l = data;
  l->ext_gone = 1;
  lane_shutdown(env, l); /* collected without laneClose */
  if (l->handle_gone) lane_free(l);
}

static napi_value lane_create(napi_env env, napi_callback_info info) {
  (void)info;
  write_lane *l = calloc(1, sizeof *l);
  if (!l) return blockd_throw_errno(env, ENOMEM, "laneCreate");
  pthread_mutex_init(&l->mu, NULL);
  pthread_cond_init(&l->gone, NULL);
  pthread_condattr_t ca;
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC); /* lane_next's deadlines are monotonic */
  pthread_cond_init(&l->work, &ca);
  pthread_condattr_destroy(&ca);
  l->spin_ns = lane_env_us("BLOCKD_LANE_SPIN_US", LANE_SPIN_US_DEFAULT) * 1000;
  l->park_ns = lane_env_us("BLOCKD_LANE_PARK_US", LANE_PARK_US_DEFAULT) * 1000;
  l->env = env;
  uv_loop_t *loop = NULL;
  napi_value name, ext, res;
  napi_create_string_utf8(env, "blockd:writeLane", NAPI_AUTO_LENGTH, &name);
  napi_create_object(env, &res);
  l->async = malloc(sizeof *l->async);
  if (!l->async || napi_get_uv_event_loop(env, &loop) != napi_ok || !loop ||
      napi_create_reference(env, res, 1, &l->resource) != napi_ok ||
      napi_async_init(env, res, name, &l->actx) != napi_ok || uv_async_init(loop, l->async, lane_async_cb) != 0) {
    if (l->actx) napi_async_destroy(env, l->actx);
    if (l->resource) napi_delete_reference(env, l->resource);
    free(l->async);
    pthread_cond_destroy(&l->work);
    pthread_cond_destroy(&l->gone);
    pthread_mutex_destroy(&l->mu);
    free(l);
    napi_throw_error(env, NULL, "cannot create write lane");
    return NULL;
  }
  l->async->data = l;
  uv_unref((uv_handle_t *)l->async);
  napi_create_external(env, l, lane_external_finalize, NULL, &ext);
  return ext;
}

static write_lane *get_lane(napi_env env, napi_value v) {
  napi_valuetype t;
  void *p = NULL;
  if (napi_typeof(env, v, &t) != napi_ok || t != napi_external || napi_get_value_external(env, v, &p) != napi_ok || !p) {
    napi_throw_type_error(env, NULL, "expected a write lane");
    return NULL;
  }
  return p;
}

static napi_value lane_submit(napi_env env, napi_callback_info info) {
  napi_value argv[6];
  int64_t fd;
  uint32_t n = 0;
  if (get_args(env, info, 6, argv)) return NULL;
  write_lane *l = get_lane(env, argv[0]);
  if (!l || get_i64(env, argv[1], &fd)) return NULL;
  if (l->closed) {
    napi_throw_error(env, NULL, "write lane is closed");
    return NULL;
  }
  double *results = NULL;
  if (check_batch_args(env, argv, &n, &results)) return NULL;
  lane_job *j = calloc(1, sizeof(lane_job) + n * sizeof(batch_op));
  if (!j) return blockd_throw_errno(env, ENOMEM, "laneSubmit");
  j->fd = (int)fd;
  j->n = n;
  j->results = results;
  if (fill_batch_ops(env, argv, j->ops, n)) {
    free(j);
    return NULL;
  }
  if (napi_create_reference(env, argv[2], 1, &j->keep[0]) != napi_ok ||
      napi_create_reference(env, argv[4], 1, &j->keep[1]) != napi_ok ||
      napi_create_reference(env, argv[5], 1, &j->keep[2]) != napi_ok) {
    for (int i = 0; i < 3; i++) {
      if (j->keep[i]) napi_delete_reference(env, j->keep[i]);
    }
    free(j);
    napi_throw_error(env, NULL, "cannot reference write buffers");
    return NULL;
  }
  lane_run *run = calloc(1, sizeof *run);
  if (!run) {
    for (int i = 0; i < 3; i++) napi_delete_reference(env, j->keep[i]);
    free(j);
    return blockd_throw_errno(env, ENOMEM, "laneSubmit");
  }
  int start = 0;
  pthread_mutex_lock(&l->mu);
  if (l->tail) l->tail->next = j;
  else __atomic_store_n(&l->head, j, __ATOMIC_RELEASE);
  l->tail = j;
  if (!l->active) {
    l->active = 1;
    start = 1;
  } else if (l->parked) {
    pthread_cond_signal(&l->work);
  }
  pthread_mutex_unlock(&l->mu);
  if (l->pending++ == 0) uv_ref((uv_handle_t *)l->async);
  if (!start) {
    free(run);
    return NULL;
  }
  napi_value name;
  run->lane = l;
  napi_create_string_utf8(env, "blockd:writeLane", NAPI_AUTO_LENGTH, &name);
  if (napi_create_async_work(env, NULL, name, lane_execute, lane_run_done, run, &run->work) != napi_ok ||
      napi_queue_async_work(env, run->work) != napi_ok) {
    /* No worker runs: take the job back out (only we touch the queue now). */
    pthread_mutex_lock(&l->mu);
    lane_job **pp = &l->head, *prev = NULL;
    while (*pp && *pp != j) {
      prev = *pp;
      pp = &(*pp)->next;
    }
    if (*pp) *pp = j->next;
    if (l->tail == j) l->tail = prev;
    l->active = 0;
    pthread_mutex_unlock(&l->mu);
    if (--l->pending == 0) uv_unref((uv_handle_t *)l->async);
    lane_job_drop(env, j);
    free(run);
    napi_throw_error(env, NULL, "cannot start write lane");
    return NULL;
  }
  return NULL;
}

/*
 * Stop the worker and close the uv handle (once). The worker reports its last job before it
 * looks at the (then empty) queue and leaves: wait until it has left, so that it never touches
 * a handle closed under it. A worker that waits for more work is told to leave now.
 */
static void lane_shutdown(napi_env env, write_lane *l) {
  if (l->closed) return;
  l->closed = 1;
  pthread_mutex_lock(&l->mu);
  __atomic_store_n(&l->closing, 1, __ATOMIC_RELEASE);
  pthread_cond_signal(&l->work);
  while (l->active) pthread_cond_wait(&l->gone, &l->mu);
  pthread_mutex_unlock(&l->mu);
  /* Finished but not yet reported: dropped unreported, as nothing waits for them now. */
  for (lane_job *j = lane_take_done(l), *next; j; j = next) {
    next = j->next;
    lane_job_drop(env, j);
  }
  napi_async_destroy(env, l->actx);
  napi_delete_reference(env, l->resource);
  uv_close((uv_handle_t *)l->async, lane_handle_closed);
}

/* laneClose(lane): release the lane (call when nothing is queued; a second call does nothing). */
static napi_value lane_close(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  if (get_args(env, info, 1, argv)) return NULL;
  write_lane *l = get_lane(env, argv[0]);
  if (!l) return NULL;
  lane_shutdown(env, l);
  return NULL;
}

/*
 * OFD byte-range locks (the scheme QEMU uses for image locking).
 * ofdLock(fd, start, len, type) with type 0 = unlock, 1 = shared (read), 2 = exclusive (write);
 * non-blocking; throws EAGAIN/EACCES on conflict.
 * ofdTest(fd, start, len, type) returns true if a lock of that type would conflict.
 */
static short lock_type(int64_t t) { return t == 0 ? F_UNLCK : t == 1 ? F_RDLCK : F_WRLCK; }

/* Parse (fd, start, len, type) and run fcntl(cmd) on the described range; 0 on success. */
static int ofd_fcntl(napi_env env, napi_callback_info info, int cmd, const char *what, struct flock *fl) {
  napi_value argv[4];
  int64_t fd, start, len, type;
  if (get_args(env, info, 4, argv) || get_i64(env, argv[0], &fd) || get_i64(env, argv[1], &start) ||
      get_i64(env, argv[2], &len) || get_i64(env, argv[3], &type)) return -1;
  memset(fl, 0, sizeof *fl);
  fl->l_whence = SEEK_SET;
  fl->l_start = start;
  fl->l_len = len;
  fl->l_type = lock_type(type);
  int r;
  do { r = fcntl((int)fd, cmd, fl); } while (r < 0 && errno == EINTR);
  if (r < 0) {
    blockd_throw_errno(env, errno, what);
    return -1;
  }
  return 0;
}

static napi_value ofd_lock(napi_env env, napi_callback_info info) {
  struct flock fl;
  ofd_fcntl(env, info, F_OFD_SETLK, "fcntl(F_OFD_SETLK)", &fl);
  return NULL;
}

static napi_value ofd_test(napi_env env, napi_callback_info info) {
  struct flock fl;
  if (ofd_fcntl(env, info, F_OFD_GETLK, "fcntl(F_OFD_GETLK)", &fl)) return NULL;
  napi_value b;
  napi_get_boolean(env, fl.l_type != F_UNLCK, &b);
  return b;
}

/*
 * setSendBuffer(fd, bytes): SO_SNDBUF of a socket (the kernel caps it at net.core.wmem_max).
 * Node has no call for it; the NBD server uses it so that a batch of large READ replies fits the
 * socket at once instead of going out in pieces, one writability wake-up each.
 */
static napi_value set_send_buffer(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int64_t fd, n;
  if (get_args(env, info, 2, argv) || get_i64(env, argv[0], &fd) || get_i64(env, argv[1], &n)) return NULL;
  int v = n > 0x40000000 ? 0x40000000 : (int)n;
  if (setsockopt((int)fd, SOL_SOCKET, SO_SNDBUF, &v, sizeof v) < 0) return blockd_throw_errno(env, errno, "setsockopt(SO_SNDBUF)");
  return NULL;
}

/* oDirect(): the O_DIRECT open flag value (fs.constants may lack it). */
static napi_value o_direct(napi_env env, napi_callback_info info) {
  (void)info;
  return num(env, (double)O_DIRECT);
}

static void free_aligned(napi_env env, void *data, void *hint) {
  (void)env;
  (void)hint;
  free(data);
}

/* allocAligned(size, align): a zero-filled Buffer whose memory is `align`-aligned (O_DIRECT). */
static napi_value alloc_aligned(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int64_t size, align;
  if (get_args(env, info, 2, argv) || get_i64(env, argv[0], &size) || get_i64(env, argv[1], &align)) return NULL;
  if (size <= 0 || size > (1LL << 31) || align < 512 || (align & (align - 1)) != 0) {
    napi_throw_range_error(env, NULL, "bad size or alignment");
    return NULL;
  }
  void *p = NULL;
  if (posix_memalign(&p, (size_t)align, (size_t)size) != 0) return blockd_throw_errno(env, ENOMEM, "posix_memalign");
  memset(p, 0, (size_t)size);
  napi_value buf;
  if (napi_create_external_buffer(env, (size_t)size, p, free_aligned, NULL, &buf) != napi_ok) {
    free(p);
    napi_throw_error(env, NULL, "cannot create external buffer");
    return NULL;
  }
  return buf;
}

/*
 * zstd, loaded at run time.
 *
 * Node.js 20 has no zstd, and we do not want a build dependency on libzstd-dev: the addon
 * dlopen()s the runtime library (libzstd.so.1, always present on Debian, dpkg needs it) on the
 * first zstd call and resolves the few entry points it uses with its own prototypes. No
 * link-time dependency: when the library is missing, zstd is simply unavailable and
 * zstdAvailable() says why. BLOCKD_ZSTD_LIBRARY names another file to load (tests use a
 * missing one to cover that path).
 *
 * The prototypes below are zstd's stable ABI (zstd.h, "stable API", unchanged since 1.4.0):
 * ZSTD_inBuffer/ZSTD_outBuffer are { pointer, size_t size, size_t pos }, errors are size_t
 * values recognised by ZSTD_isError, ZSTD_d_windowLogMax is 100, ZSTD_reset_session_only is 1,
 * ZSTD_error_dstSize_tooSmall is 70.
 */
typedef struct { const void *src; size_t size; size_t pos; } zstd_in_buf;
typedef struct { void *dst; size_t size; size_t pos; } zstd_out_buf;

#define ZSTD_MIN_VERSION 10400      /* 1.4.0: DCtx_reset and DCtx_setParameter are stable */
#define ZSTD_D_WINDOWLOGMAX 100
#define ZSTD_RESET_SESSION_ONLY 1
#define ZSTD_ERROR_DSTSIZE_TOOSMALL 70
/*
 * Frames for one cluster (at most 2 MiB) never need a bigger window; the limit stops a crafted
 * image from making the decoder allocate libzstd's default maximum (128 MiB) per cluster.
 */
#define ZSTD_WINDOW_LOG_LIMIT 23

static struct {
  pthread_once_t once;
  int ok;
  unsigned version;
  char why[256];
  void *(*create_dctx)(void);
  size_t (*free_dctx)(void *);
  size_t (*dctx_reset)(void *, int);
  size_t (*dctx_set_parameter)(void *, int, int);
  size_t (*decompress_stream)(void *, zstd_out_buf *, zstd_in_buf *);
  unsigned (*is_error)(size_t);
  const char *(*error_name)(size_t);
  unsigned (*get_error_code)(size_t);
  size_t (*compress)(void *, size_t, const void *, size_t, int);
  unsigned (*version_number)(void);
} zl = { .once = PTHREAD_ONCE_INIT };

static void zstd_load(void) {
  const char *name = getenv("BLOCKD_ZSTD_LIBRARY");
  if (!name || !*name) name = "libzstd.so.1";
  void *h = dlopen(name, RTLD_NOW | RTLD_LOCAL);
  if (!h) {
    const char *e = dlerror();
    snprintf(zl.why, sizeof zl.why, "cannot load %s: %s", name, e ? e : "unknown error");
    return;
  }
  /* dlsym returns void *; going through memcpy keeps the object-to-function conversion defined. */
#define ZSYM(field, sym)                                  \
  do {                                                    \
    void *p_ = dlsym(h, sym);                             \
    if (!p_) {                                            \
      snprintf(zl.why, sizeof zl.why, "%s has no %s", name, sym); \
      dlclose(h);                                         \
      return;                                             \
    }                                                     \
    memcpy(&zl.field, &p_, sizeof p_);                    \
  } while (0)
  ZSYM(version_number, "ZSTD_versionNumber");
  ZSYM(create_dctx, "ZSTD_createDCtx");
  ZSYM(free_dctx, "ZSTD_freeDCtx");
  ZSYM(dctx_reset, "ZSTD_DCtx_reset");
  ZSYM(dctx_set_parameter, "ZSTD_DCtx_setParameter");
  ZSYM(decompress_stream, "ZSTD_decompressStream");
  ZSYM(is_error, "ZSTD_isError");
  ZSYM(error_name, "ZSTD_getErrorName");
  ZSYM(get_error_code, "ZSTD_getErrorCode");
  ZSYM(compress, "ZSTD_compress");
#undef ZSYM
  zl.version = zl.version_number();
  if (zl.version < ZSTD_MIN_VERSION) {
    snprintf(zl.why, sizeof zl.why, "%s is version %u.%u.%u; blockd needs 1.4.0 or later", name,
             zl.version / 10000, zl.version / 100 % 100, zl.version % 100);
    dlclose(h);
    return;
  }
  zl.ok = 1; /* the handle stays open for the life of the process */
}

static int zstd_ready(void) {
  pthread_once(&zl.once, zstd_load);
  return zl.ok;
}

/*
 * A few decompression contexts are kept for reuse: creating one and letting it allocate its
 * window buffers costs more than decoding a small cluster. Shared by every thread (the main
 * thread for synchronous calls, pool threads for asynchronous ones), hence the mutex.
 */
#define DCTX_POOL_MAX 8
static pthread_mutex_t dctx_mu = PTHREAD_MUTEX_INITIALIZER;
static void *dctx_pool[DCTX_POOL_MAX];
static int dctx_count;

static void *dctx_get(void) {
  void *d = NULL;
  pthread_mutex_lock(&dctx_mu);
  if (dctx_count > 0) d = dctx_pool[--dctx_count];
  pthread_mutex_unlock(&dctx_mu);
  if (d) return d;
  d = zl.create_dctx();
  if (d && zl.is_error(zl.dctx_set_parameter(d, ZSTD_D_WINDOWLOGMAX, ZSTD_WINDOW_LOG_LIMIT))) {
    zl.free_dctx(d);
    d = NULL;
  }
  return d;
}

static void dctx_put(void *d) {
  /* A failed or abandoned frame leaves state behind: start the next user on a clean session. */
  if (zl.is_error(zl.dctx_reset(d, ZSTD_RESET_SESSION_ONLY))) {
    zl.free_dctx(d);
    return;
  }
  pthread_mutex_lock(&dctx_mu);
  if (dctx_count < DCTX_POOL_MAX) {
    dctx_pool[dctx_count++] = d;
    d = NULL;
  }
  pthread_mutex_unlock(&dctx_mu);
  if (d) zl.free_dctx(d);
}

/* zstd frame (28 b5 2f fd) or skippable frame (5? 2a 4d 18) magic at p. */
static int zstd_frame_magic(const uint8_t *p) {
  uint32_t m = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
  return m == 0xFD2FB528u || (m & 0xFFFFFFF0u) == 0x184D2A50u;
}

/*
 * Decode zstd data from src into dst. Returns the bytes produced, or -1 with `err` set.
 *
 * qcow2 stores a compressed cluster as zstd frame(s) followed by whatever fills the last
 * 512-byte sector (qcow2.txt, "Compressed Clusters Descriptor": the length is only known to the
 * sector), so:
 *  - the first frame must be valid; further frames are decoded while the output has room and
 *    the next bytes look like a frame; anything else after a complete frame is trailing data
 *    and is ignored;
 *  - a frame cut short by the end of src is an error (truncated), never a hang: every call
 *    must consume input or produce output;
 *  - when dst is full in the middle of a frame: with `stop_when_full` (what QEMU's reader does,
 *    it stops as soon as the cluster is complete) that is success; otherwise the rest of the
 *    frame is decoded into a one-byte probe and any further output is an error (data longer
 *    than dst).
 */
static ssize_t zstd_decode(const uint8_t *src, size_t slen, uint8_t *dst, size_t dlen, int stop_when_full,
                           char *err, size_t errlen) {
  void *d = dctx_get();
  if (!d) {
    snprintf(err, errlen, "zstd: cannot create a decompression context");
    return -1;
  }
  zstd_in_buf in = { src, slen, 0 };
  zstd_out_buf out = { dst, dlen, 0 };
  uint8_t spare;
  zstd_out_buf probe = { &spare, 1, 0 };
  int in_frame = 1; /* the first frame is decoded unconditionally, so bad input is reported */
  ssize_t res = -1;
  for (;;) {
    if (!in_frame) {
      if (out.pos == out.size || slen - in.pos < 4 || !zstd_frame_magic(src + in.pos)) {
        res = (ssize_t)out.pos;
        break;
      }
      in_frame = 1;
    }
    zstd_out_buf *o = out.pos < out.size ? &out : &probe;
    if (o == &probe && stop_when_full) {
      res = (ssize_t)out.pos;
      break;
    }
    size_t in_before = in.pos, out_before = o->pos;
    size_t r = zl.decompress_stream(d, o, &in);
    if (zl.is_error(r)) {
      snprintf(err, errlen, "zstd: %s", zl.error_name(r));
      break;
    }
    if (probe.pos > 0) {
      snprintf(err, errlen, "zstd: data decompresses to more than %zu bytes", dlen);
      break;
    }
    if (r == 0) {
      in_frame = 0;
      continue;
    }
    if (in.pos == in_before && o->pos == out_before) {
      snprintf(err, errlen, "zstd: truncated frame (input ends after %zu bytes)", slen);
      break;
    }
  }
  dctx_put(d);
  return res;
}

static void zstd_unavailable(napi_env env) {
  char msg[320];
  snprintf(msg, sizeof msg, "zstd is not available: %s", zl.why);
  napi_value m, code, e;
  napi_create_string_utf8(env, msg, NAPI_AUTO_LENGTH, &m);
  napi_create_string_utf8(env, "ENOTSUP", NAPI_AUTO_LENGTH, &code);
  napi_create_error(env, code, m, &e);
  napi_set_named_property(env, e, "code", code);
  napi_throw(env, e);
}

static void throw_zstd_error(napi_env env, const char *msg) {
  napi_value m, code, e;
  napi_create_string_utf8(env, msg, NAPI_AUTO_LENGTH, &m);
  napi_create_string_utf8(env, "EIO", NAPI_AUTO_LENGTH, &code);
  napi_create_error(env, code, m, &e);
  napi_set_named_property(env, e, "code", code);
  napi_throw(env, e);
}

static int get_buffer(napi_env env, napi_value v, void **data, size_t *len, const char *what) {
  bool is_buf = false;
  if (napi_is_buffer(env, v, &is_buf) != napi_ok || !is_buf || napi_get_buffer_info(env, v, data, len) != napi_ok) {
    char msg[64];
    snprintf(msg, sizeof msg, "%s must be a Buffer", what);
    napi_throw_type_error(env, NULL, msg);
    return -1;
  }
  return 0;
}

/* zstdAvailable(): whether libzstd could be loaded (loads it on the first call). */
static napi_value zstd_available(napi_env env, napi_callback_info info) {
  (void)info;
  napi_value b;
  napi_get_boolean(env, zstd_ready(), &b);
  return b;
}

/* zstdStatus(): { available, version?: "1.5.4", error?: why it could not be loaded }. */
static napi_value zstd_status(napi_env env, napi_callback_info info) {
  (void)info;
  napi_value o, v;
  int ok = zstd_ready();
  napi_create_object(env, &o);
  napi_get_boolean(env, ok, &v);
  napi_set_named_property(env, o, "available", v);
  if (ok) {
    char ver[32];
    snprintf(ver, sizeof ver, "%u.%u.%u", zl.version / 10000, zl.version / 100 % 100, zl.version % 100);
    napi_create_string_utf8(env, ver, NAPI_AUTO_LENGTH, &v);
    napi_set_named_property(env, o, "version", v);
  } else {
    napi_create_string_utf8(env, zl.why, NAPI_AUTO_LENGTH, &v);
    napi_set_named_property(env, o, "error", v);
  }
  return o;
}

/*
 * zstdDecompress(src, dst, stopWhenFull?): decode on the calling (main) thread; returns the
 * bytes written to dst; throws `code` EIO on corrupt, truncated or (without stopWhenFull)
 * over-long data, ENOTSUP when libzstd is missing.
 *
 * Synchronous is fine for small outputs: zstd decodes at well over 1 GB/s, so a 64 KiB cluster
 * (the qcow2 default) costs tens of microseconds, less than a thread-pool round trip. Larger
 * clusters (up to 2 MiB, about a millisecond) go through zstdDecompressAsync; the caller picks.
 */
static napi_value zstd_decompress(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  size_t argc = 3;
  void *src, *dst;
  size_t slen, dlen;
  bool stop = false;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 2) {
    napi_throw_type_error(env, NULL, "wrong number of arguments");
    return NULL;
  }
  if (get_buffer(env, argv[0], &src, &slen, "src") || get_buffer(env, argv[1], &dst, &dlen, "dst")) return NULL;
  if (argc > 2) napi_get_value_bool(env, argv[2], &stop);
  if (!zstd_ready()) {
    zstd_unavailable(env);
    return NULL;
  }
  char err[200];
  ssize_t n = zstd_decode(src, slen, dst, dlen, stop, err, sizeof err);
  if (n < 0) {
    throw_zstd_error(env, err);
    return NULL;
  }
  return num(env, (double)n);
}

/*
 * zstdDecompressAsync(src, dst, stopWhenFull, callback): the same on a libuv pool thread;
 * callback(err, bytes) runs on the main thread. src and dst must not be touched meanwhile;
 * the job holds references to them so they stay alive.
 */
typedef struct {
  napi_async_work work;
  napi_ref keep[3]; /* src, dst, callback */
  const uint8_t *src;
  uint8_t *dst;
  size_t slen, dlen;
  int stop;
  ssize_t res;
  char err[200];
} zstd_job;

static void zstd_job_execute(napi_env env, void *data) {
  (void)env;
  zstd_job *j = data;
  j->res = zstd_decode(j->src, j->slen, j->dst, j->dlen, j->stop, j->err, sizeof j->err);
}

static void zstd_job_free(napi_env env, zstd_job *j) {
  for (int i = 0; i < 3; i++) {
    if (j->keep[i]) napi_delete_reference(env, j->keep[i]);
  }
  if (j->work) napi_delete_async_work(env, j->work);
  free(j);
}

static void zstd_job_complete(napi_env env, napi_status status, void *data) {
  zstd_job *j = data;
  napi_value cb = NULL, undef, args[2];
  napi_get_reference_value(env, j->keep[2], &cb);
  napi_get_undefined(env, &undef);
  if (status != napi_ok) {
    snprintf(j->err, sizeof j->err, "zstd: decompression cancelled");
    j->res = -1;
  }
  if (j->res < 0) {
    napi_value m, code;
    napi_create_string_utf8(env, j->err, NAPI_AUTO_LENGTH, &m);
    napi_create_string_utf8(env, "EIO", NAPI_AUTO_LENGTH, &code);
    napi_create_error(env, code, m, &args[0]);
    napi_set_named_property(env, args[0], "code", code);
    napi_get_undefined(env, &args[1]);
  } else {
    napi_get_null(env, &args[0]);
    napi_create_double(env, (double)j->res, &args[1]);
  }
  zstd_job_free(env, j);
  if (cb) napi_call_function(env, undef, cb, 2, args, NULL);
}

static napi_value zstd_decompress_async(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  void *src, *dst;
  size_t slen, dlen;
  bool stop = false;
  napi_valuetype cbt;
  if (get_args(env, info, 4, argv)) return NULL;
  if (get_buffer(env, argv[0], &src, &slen, "src") || get_buffer(env, argv[1], &dst, &dlen, "dst")) return NULL;
  napi_get_value_bool(env, argv[2], &stop);
  if (napi_typeof(env, argv[3], &cbt) != napi_ok || cbt != napi_function) {
    napi_throw_type_error(env, NULL, "callback must be a function");
    return NULL;
  }
  if (!zstd_ready()) {
    zstd_unavailable(env);
    return NULL;
  }
  zstd_job *j = calloc(1, sizeof *j);
  if (!j) return blockd_throw_errno(env, ENOMEM, "zstdDecompressAsync");
  j->src = src;
  j->slen = slen;
  j->dst = dst;
  j->dlen = dlen;
  j->stop = stop;
  napi_value name;
  napi_create_string_utf8(env, "blockd:zstdDecompress", NAPI_AUTO_LENGTH, &name);
  if (napi_create_reference(env, argv[0], 1, &j->keep[0]) != napi_ok ||
      napi_create_reference(env, argv[1], 1, &j->keep[1]) != napi_ok ||
      napi_create_reference(env, argv[3], 1, &j->keep[2]) != napi_ok ||
      napi_create_async_work(env, NULL, name, zstd_job_execute, zstd_job_complete, j, &j->work) != napi_ok ||
      napi_queue_async_work(env, j->work) != napi_ok) {
    zstd_job_free(env, j);
    napi_throw_error(env, NULL, "cannot queue zstdDecompressAsync");
    return NULL;
  }
  return NULL;
}

/*
 * zstdCompress(src, dst, level): one zstd frame (content size recorded, no dictionary) into
 * dst; returns its length, or -1 when it does not fit (qcow2 then stores the cluster
 * uncompressed). Synchronous: meant for tests and small clusters (compression is several
 * times slower than decompression).
 */
static napi_value zstd_compress(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  void *src, *dst;
  size_t slen, dlen;
  int32_t level;
  if (get_args(env, info, 3, argv)) return NULL;
  if (get_buffer(env, argv[0], &src, &slen, "src") || get_buffer(env, argv[1], &dst, &dlen, "dst")) return NULL;
  if (napi_get_value_int32(env, argv[2], &level) != napi_ok || level < -7 || level > 22) {
    napi_throw_range_error(env, NULL, "level must be an integer from -7 to 22");
    return NULL;
  }
  if (!zstd_ready()) {
    zstd_unavailable(env);
    return NULL;
  }
  size_t r = zl.compress(dst, dlen, src, slen, level);
  if (zl.is_error(r)) {
    if (zl.get_error_code(r) == ZSTD_ERROR_DSTSIZE_TOOSMALL) return num(env, -1);
    char msg[200];
    snprintf(msg, sizeof msg, "zstd: %s", zl.error_name(r));
    throw_zstd_error(env, msg);
    return NULL;
  }
  return num(env, (double)r);
}

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
    { "seekData", NULL, seek_data, NULL, NULL, NULL, napi_enumerable, NULL },
    { "seekHole", NULL, seek_hole, NULL, NULL, NULL, napi_enumerable, NULL },
    { "punchHole", NULL, punch_hole, NULL, NULL, NULL, napi_enumerable, NULL },
    { "zeroRange", NULL, zero_range, NULL, NULL, NULL, napi_enumerable, NULL },
    { "preadNowait", NULL, pread_nowait, NULL, NULL, NULL, napi_enumerable, NULL },
    { "cachedRange", NULL, cached_range, NULL, NULL, NULL, napi_enumerable, NULL },
    { "ofdLock", NULL, ofd_lock, NULL, NULL, NULL, napi_enumerable, NULL },
    { "ofdTest", NULL, ofd_test, NULL, NULL, NULL, napi_enumerable, NULL },
    { "allocAligned", NULL, alloc_aligned, NULL, NULL, NULL, napi_enumerable, NULL },
    { "laneCreate", NULL, lane_create, NULL, NULL, NULL, napi_enumerable, NULL },
    { "laneSubmit", NULL, lane_submit, NULL, NULL, NULL, napi_enumerable, NULL },
    { "laneClose", NULL, lane_close, NULL, NULL, NULL, napi_enumerable, NULL },
    { "ioBatch", NULL, io_batch_submit, NULL, NULL, NULL, napi_enumerable, NULL },
    { "setSendBuffer", NULL, set_send_buffer, NULL, NULL, NULL, napi_enumerable, NULL },
    { "oDirect", NULL, o_direct, NULL, NULL, NULL, napi_enumerable, NULL },
    { "zstdAvailable", NULL, zstd_available, NULL, NULL, NULL, napi_enumerable, NULL },
    { "zstdStatus", NULL, zstd_status, NULL, NULL, NULL, napi_enumerable, NULL },
    { "zstdDecompress", NULL, zstd_decompress, NULL, NULL, NULL, napi_enumerable, NULL },
    { "zstdDecompressAsync", NULL, zstd_decompress_async, NULL, NULL, NULL, napi_enumerable, NULL },
    { "zstdCompress", NULL, zstd_compress, NULL, NULL, NULL, napi_enumerable, NULL },
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
  netio_register(env, exports);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
