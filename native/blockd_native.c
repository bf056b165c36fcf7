/*
 * blockd native helpers: the few Linux file calls Node.js does not expose.
 * Every function takes plain numbers (fd, offsets as doubles that are safe integers),
 * never blocks for long (SEEK_DATA/fallocate are metadata operations; preadv2 uses
 * RWF_NOWAIT), and reports failures as a thrown Error with `.code` = errno name.
 */
#define _GNU_SOURCE
#include <node_api.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>
#include <linux/falloc.h>

#ifndef RWF_NOWAIT
#define RWF_NOWAIT 0x00000008
#endif

static const char *errno_name(int e) {
  switch (e) {
    case EPERM: return "EPERM";
    case ENOENT: return "ENOENT";
    case EIO: return "EIO";
    case EBADF: return "EBADF";
    case EAGAIN: return "EAGAIN";
    case ENOMEM: return "ENOMEM";
    case EACCES: return "EACCES";
    case EBUSY: return "EBUSY";
    case EINVAL: return "EINVAL";
    case EFBIG: return "EFBIG";
    case ENOSPC: return "ENOSPC";
    case ESPIPE: return "ESPIPE";
    case EROFS: return "EROFS";
    case ENXIO: return "ENXIO";
    case ENOSYS: return "ENOSYS";
    case EOPNOTSUPP: return "EOPNOTSUPP";
    case EOVERFLOW: return "EOVERFLOW";
    case EINTR: return "EINTR";
    default: return "EIO";
  }
}

static napi_value throw_errno(napi_env env, int e, const char *what) {
  char msg[160];
  snprintf(msg, sizeof msg, "%s: %s", what, strerror(e));
  napi_value m, code, err;
  napi_create_string_utf8(env, msg, NAPI_AUTO_LENGTH, &m);
  napi_create_string_utf8(env, errno_name(e), NAPI_AUTO_LENGTH, &code);
  napi_create_error(env, code, m, &err);
  napi_set_named_property(env, err, "code", code);
  napi_value no;
  napi_create_int32(env, e, &no);
  napi_set_named_property(env, err, "errno", no);
  napi_throw(env, err);
  return NULL;
}

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
    return throw_errno(env, errno, whence == SEEK_DATA ? "lseek(SEEK_DATA)" : "lseek(SEEK_HOLE)");
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
  if (r < 0) return throw_errno(env, errno, what);
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
    return throw_errno(env, errno, "preadv2");
  }
  return num(env, (double)r);
}

/*
 * OFD byte-range locks (the scheme QEMU uses for image locking).
 * ofdLock(fd, start, len, type) with type 0 = unlock, 1 = shared (read), 2 = exclusive (write);
 * non-blocking; throws EAGAIN/EACCES on conflict.
 * ofdTest(fd, start, len, type) returns true if a lock of that type would conflict.
 */
static short lock_type(int64_t t) { return t == 0 ? F_UNLCK : t == 1 ? F_RDLCK : F_WRLCK; }

static napi_value ofd_lock(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  int64_t fd, start, len, type;
  if (get_args(env, info, 4, argv) || get_i64(env, argv[0], &fd) || get_i64(env, argv[1], &start) ||
      get_i64(env, argv[2], &len) || get_i64(env, argv[3], &type)) return NULL;
  struct flock fl;
  memset(&fl, 0, sizeof fl);
  fl.l_whence = SEEK_SET;
  fl.l_start = start;
  fl.l_len = len;
  fl.l_type = lock_type(type);
  int r;
  do { r = fcntl((int)fd, F_OFD_SETLK, &fl); } while (r < 0 && errno == EINTR);
  if (r < 0) return throw_errno(env, errno, "fcntl(F_OFD_SETLK)");
  return NULL;
}

static napi_value ofd_test(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  int64_t fd, start, len, type;
  if (get_args(env, info, 4, argv) || get_i64(env, argv[0], &fd) || get_i64(env, argv[1], &start) ||
      get_i64(env, argv[2], &len) || get_i64(env, argv[3], &type)) return NULL;
  struct flock fl;
  memset(&fl, 0, sizeof fl);
  fl.l_whence = SEEK_SET;
  fl.l_start = start;
  fl.l_len = len;
  fl.l_type = lock_type(type);
  int r;
  do { r = fcntl((int)fd, F_OFD_GETLK, &fl); } while (r < 0 && errno == EINTR);
  if (r < 0) return throw_errno(env, errno, "fcntl(F_OFD_GETLK)");
  napi_value b;
  napi_get_boolean(env, fl.l_type != F_UNLCK, &b);
  return b;
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
  if (posix_memalign(&p, (size_t)align, (size_t)size) != 0) return throw_errno(env, ENOMEM, "posix_memalign");
  memset(p, 0, (size_t)size);
  napi_value buf;
  if (napi_create_external_buffer(env, (size_t)size, p, free_aligned, NULL, &buf) != napi_ok) {
    free(p);
    napi_throw_error(env, NULL, "cannot create external buffer");
    return NULL;
  }
  return buf;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
    { "seekData", NULL, seek_data, NULL, NULL, NULL, napi_enumerable, NULL },
    { "seekHole", NULL, seek_hole, NULL, NULL, NULL, napi_enumerable, NULL },
    { "punchHole", NULL, punch_hole, NULL, NULL, NULL, napi_enumerable, NULL },
    { "zeroRange", NULL, zero_range, NULL, NULL, NULL, napi_enumerable, NULL },
    { "preadNowait", NULL, pread_nowait, NULL, NULL, NULL, napi_enumerable, NULL },
    { "ofdLock", NULL, ofd_lock, NULL, NULL, NULL, napi_enumerable, NULL },
    { "ofdTest", NULL, ofd_test, NULL, NULL, NULL, napi_enumerable, NULL },
    { "allocAligned", NULL, alloc_aligned, NULL, NULL, NULL, napi_enumerable, NULL },
    { "oDirect", NULL, o_direct, NULL, NULL, NULL, napi_enumerable, NULL },
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
