/*
 * The errno helper shared by the addon's C files (blockd_native.c, netio.c): throw an Error
 * "what: strerror" with `code` (errno name) and `errno`, the shape src/block/native.ts and
 * src/nbd/native-transport.ts expect. Header-only (static inline), so neither file depends on
 * the other for it.
 */
#ifndef BLOCKD_ERRNO_ERROR_H
#define BLOCKD_ERRNO_ERROR_H

#include <node_api.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>

static inline const char *errno_name(int e) {
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
#ifdef EDQUOT
    case EDQUOT: return "EDQUOT";
#endif
    case ESPIPE: return "ESPIPE";
    case EROFS: return "EROFS";
    case ENXIO: return "ENXIO";
    case ENOSYS: return "ENOSYS";
    case EOPNOTSUPP: return "EOPNOTSUPP";
    case EOVERFLOW: return "EOVERFLOW";
    case EINTR: return "EINTR";
    case EADDRINUSE: return "EADDRINUSE";
    case ENAMETOOLONG: return "ENAMETOOLONG";
    case ENOTDIR: return "ENOTDIR";
    case ENOTSOCK: return "ENOTSOCK";
    case EMFILE: return "EMFILE";
    default: return "EIO";
  }
}

/* Throw an Error "what: strerror" with `code` (errno name) and `errno`. */
static inline napi_value blockd_throw_errno(napi_env env, int e, const char *what) {
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

#endif
