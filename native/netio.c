/*
 * netio: a small socket layer for the NBD server, on Node's own libuv loop.
 *
 * Why: a Node net.Socket costs tens of microseconds of JavaScript to build and tear down
 * (stream state, event emitters, write requests), which is most of the CPU an NBD client costs
 * when it connects, negotiates and leaves. Here a connection is a file descriptor plus a
 * uv_poll_t: accept4(), read() into one buffer shared with JavaScript, sendmsg() straight from the
 * caller's Buffers, close(). JavaScript sees one callback per event, (event, id, arg), where `id`
 * names the connection, and drives everything else (handshake, requests, back-pressure).
 *
 * Everything runs on the main thread (the poll callbacks come from Node's loop), so no locking.
 * Node ignores SIGPIPE, and writes use MSG_NOSIGNAL anyway.
 *
 * JavaScript API (see src/nbd/native-transport.ts):
 *   netInit(readBuffer, callback)       callback(ev, id, arg) for every event below
 *   netListenUnix(path, backlog) -> fd  socket + bind + listen (throws an Error with `code`)
 *   netDup(fd) -> fd                    a close-on-exec duplicate (to take over a listening socket)
 *   netListen(fd) -> listener id        start accepting on a listening socket
 *   netListenerClose(lid)               stop accepting and close the socket
 *   netResume(id) / netPause(id)        start / stop reading
 *   netWrite(id, buf | buf[]) -> n      1 = all in the kernel, 0 = queued (EV_DRAIN follows),
 *                                       -errno = the connection failed (close it)
 *   netPending(id) -> bytes             bytes queued and not yet in the kernel
 *   netClose(id, graceful)              graceful: after the queued bytes are sent
 *   netPeer(id) -> string               "host:port" for TCP peers, "unix" otherwise
 *   netReadInto(id, buf, off, len)      the next `len` bytes read go straight into buf[off..]
 *                                       (a WRITE payload), not into readBuffer; see below
 *   netWriteFile(id, buf | buf[], fd, off, len) -> n
 *                                       as netWrite, then `len` bytes of file `fd` from `off`
 *                                       with sendfile(); see "File segments" below
 *   netOpenCount() -> n                 connections whose socket is still open
 *   netLoanGen(id) -> n                 this connection's number for netLoanReturned (unique in
 *                                       the process), or -1 when its reading cannot be followed
 *                                       (TCP)
 *   netLoanMark(id) -> n                bytes written to the connection so far (netWrite and
 *                                       netWriteFile)
 *   netLoanReturned(id, gen, mark) -> bool
 *                                       the peer has read everything up to `mark`, or the
 *                                       connection `gen` is closed; see "Loans"
 *   netFileStats() -> [sent, waited, loaded, zeroed]
 *                                       file segments: all sent, had to wait for the socket
 *                                       (dup), were read on a thread (evicted), hit EOF
 * Events: 1 ACCEPT (id = new connection, arg = listener id), 2 READ (arg = bytes now at the start
 * of readBuffer; the callback must consume or copy them before it returns), 3 EOF, 4 ERROR
 * (arg = errno; reading has stopped, the caller closes), 5 DRAIN (the write queue is empty),
 * 6 READ_DIRECT (arg = bytes read: the first min(arg, bytes the target still wanted) went into
 * the netReadInto target, the rest is at the start of readBuffer, as for READ).
 *
 * Why netReadInto: a large WRITE payload read into the shared buffer has to be copied into a
 * buffer of its own (the write completes later, on another thread); at 2 GB/s that memcpy was a
 * fifth of the server's CPU samples. With a target armed, read() becomes readv() into the rest
 * of the target plus a short tail of readBuffer (DIRECT_TAIL: room for the next request header,
 * so a stream of large writes lands almost entirely in the targets). The target is kept (and
 * its Buffer referenced) until it is full or the connection closes.
 *
 * File segments (netWriteFile): a large READ reply of a raw file export whose range is all in
 * the page cache goes out as the reply header (queued like any netWrite) followed by a file
 * range sent with sendfile(). Since Linux 6.5 a unix stream socket takes the page-cache pages
 * by reference (MSG_SPLICE_PAGES) and TCP does the same, so the server copies nothing; before,
 * the bytes were copied into a reply buffer (preadv2) and again into the socket (sendmsg).
 * - Order: a file segment is one more entry of the connection's write queue, so it leaves
 *   after everything queued before it and before everything queued after it.
 * - Never blocking on the disk: the caller checks with cachestat() that the range is cached
 *   right before the call (a send at once needs no further check). A segment that has to wait
 *   for the socket is checked again before each later sendfile(); when some of it was evicted
 *   meanwhile, the rest is read on a thread-pool thread into a buffer of its own (the queue
 *   waits, in order), which is then sent like any buffer.
 * - The file may be closed (node reopened or deleted) while a segment waits: a waiting segment
 *   holds its own dup() of the descriptor, so it always reads the file the request was for. A
 *   file that shrank meanwhile ends the segment with zeroes, as the file driver's reads do.
 * - A segment the socket takes at once costs no dup(); a read error (EIO) in sendfile() or on
 *   the thread fails the connection (the header is already out, so no error reply can follow).
 * - The bytes are read from the page cache when they are sent, not when the request arrived:
 *   a write to the same range that completes meanwhile may be seen. NBD leaves the result of
 *   a read overlapping a concurrent write undefined, and the client only learns that the read
 *   is done once the last byte arrives, so either content is correct (docs/nbd.md).
 *
 * Loans (netLoanGen, netLoanMark, netLoanReturned): the pages of a file segment are referenced
 * until the peer has read them, and a qcow2 image must not hand a freed cluster to other data
 * before then (src/util/page-loans.ts). Of the bytes written so far (`written`), those sent are
 * written - q_bytes, and of those, on a unix socket, the ones the peer has not read yet are
 * within SIOCOUTQ (the socket's send allocation: the skbs waiting in the peer's receive queue,
 * counted with their overhead, so the estimate errs on the late side). A connection that sent
 * file segments stays open after netClose, without reading, until its peer has read them or
 * closed its end, LINGER_MS at most (must_linger), so that this can be followed to the end.
 * TCP's SIOCOUTQ counts only unacknowledged bytes, while on loopback the receiver's queue
 * shares the pages: no answer there (netLoanGen gives -1).
 */
#define _GNU_SOURCE
#include <node_api.h>
#include <uv.h>
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/sockios.h>
#include <sys/ioctl.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>
#include "cachestat.h"
#include "errno_error.h"
#include "netio.h"

#define EV_ACCEPT 1
#define EV_READ 2
#define EV_EOF 3
#define EV_ERROR 4
#define EV_DRAIN 5
#define EV_READ_DIRECT 6

/* sendmsg() takes at most this many buffers per call (IOV_MAX is 1024 on Linux). */
#define MAX_IOV 64
/* A connection whose writes block gets this send buffer (the kernel caps it at wmem_max). */
#define BIG_SNDBUF (4 * 1024 * 1024)
/* A graceful close whose peer does not take the queued bytes gives up after this long. */
#define LINGER_MS 30000
/* How often lingering connections are checked for that deadline ... */
#define LINGER_CHECK_MS 5000
/* ... and, while one has sent everything and waits for its peer to read it, for that. */
#define LINGER_POLL_MS 20
/*
 * Connections accepted per readiness event. One: the poll is level-triggered, so a backlog is
 * reported again at once, and a client connecting alone costs no failing accept4() (EAGAIN).
 */
#define ACCEPT_BURST 1
/* readBuffer bytes read after a netReadInto target (the next header and a little payload). */
#define DIRECT_TAIL 512
/* sendfile() moves at most this much per call (Linux: MAX_RW_COUNT). */
#define SENDFILE_MAX 0x7ffff000

/* Kinds of write-queue entries. */
#define Q_BUF 0   /* a JavaScript Buffer, referenced until sent */
#define Q_OWNED 1 /* malloc'd bytes (a loaded file segment, zeroes past EOF), freed when sent */
#define Q_FILE 2  /* a file range, sent with sendfile() */

typedef struct {
  napi_ref ref; /* Q_BUF: keeps the Buffer alive until it is sent */
  const char *base;
  size_t len;
  size_t off;   /* bytes of the entry already sent */
  char *owned;  /* Q_OWNED: the memory behind base */
  int64_t foff; /* Q_FILE: file offset of the entry's first byte */
  int ffd;      /* Q_FILE: the file (a dup of the caller's fd unless borrowed) */
  uint8_t kind;
  bool borrowed; /* Q_FILE: ffd is the caller's own fd (only during netWriteFile) */
  bool fresh;    /* Q_FILE: checked as cached by the caller just now */
} pending_buf;

struct conn;

/* A thread-pool read of the rest of a file segment that is no longer all cached. */
typedef struct {
  uv_work_t req;
  struct conn *c; /* NULL once the connection is gone: the read's result is then dropped */
  int fd;         /* owned: the segment's dup */
  int64_t off;
  size_t len;
  char *buf;
  int err;
} file_load;

typedef struct conn {
  uv_poll_t poll;
  int fd;
  int id;
  int events;        /* what the poll handle is started with */
  bool reading;      /* the caller wants READ events */
  bool closing;      /* netClose() done: no more events */
  bool close_after;  /* graceful close once the queue is empty */
  bool big_sndbuf;   /* SO_SNDBUF already raised */
  bool inet;
  uint64_t linger_until; /* close_after: uv_now() deadline */
  napi_ref dref;     /* netReadInto target: Buffer kept alive while armed */
  char *dbase;       /* where the next target byte goes */
  size_t dleft;      /* target bytes still wanted (0 = no target) */
  pending_buf *q;    /* write queue (FIFO, q_head .. q_len) */
  int q_head, q_len, q_cap;
  size_t q_bytes;
  uint64_t written;  /* bytes accepted by netWrite/netWriteFile since the connection opened */
  double gen;        /* netLoanGen: ids are reused, this is not */
  bool lent;         /* a file segment was queued (unix): its pages may wait in the peer's queue */
  file_load *load;   /* the head file segment is being read on a thread: the queue waits */
} conn;

typedef struct {
  uv_poll_t poll;
  int fd;
  int id;
  bool closing;
} listener;

static napi_env g_env;
static uv_loop_t *g_loop;
static napi_ref g_cb;
static napi_ref g_buf_ref;
static napi_async_context g_async;
static char *g_rbuf;
static size_t g_rlen;

static conn **g_conns;
static int g_conns_cap;
static int *g_free_ids;
static int g_free_len;
static int g_next_id = 1; /* 0 is never used */
static int g_open; /* connections whose fd is still open */
static double g_gen; /* the last connection's netLoanGen */
static int g_lingering; /* connections in a graceful close */
static uv_timer_t g_linger_timer;
static void on_linger_timer(uv_timer_t *t);

/*
 * Closed connections parked with their poll handle stopped, not closed, by the fd number the
 * handle was made for. accept4() returns the lowest free fd, usually the one the last client
 * had: that client's handle is then restarted as it is, skipping uv_poll_init's checks (an
 * epoll_ctl ADD and DEL and an ioctl per connection). A stopped handle neither keeps the loop
 * alive nor touches epoll, so a spare whose fd number is meanwhile used elsewhere is harmless;
 * spares are never closed (they are few and small; like the linger timer they live until exit).
 */
#define SPARES 8
static conn *g_spares[SPARES];
static int g_spare_fd[SPARES];
static int g_nspares;

static listener *g_listeners[64];

/* File segments (netFileStats): tests and diagnosis see which way they went. */
static double g_file_sent, g_file_waited, g_file_loaded, g_file_zeroed;

/* ---- small helpers ---------------------------------------------------------------------- */

static napi_value nv_throw(napi_env env, const char *msg) {
  napi_throw_error(env, NULL, msg);
  return NULL;
}

static napi_value nv_int(napi_env env, int64_t v) {
  napi_value r;
  napi_create_int64(env, v, &r);
  return r;
}

static bool get_int(napi_env env, napi_value v, int *out) {
  int32_t x;
  if (napi_get_value_int32(env, v, &x) != napi_ok) {
    napi_throw_type_error(env, NULL, "expected an integer");
    return false;
  }
  *out = x;
  return true;
}

static conn *conn_of(int id) {
  if (id <= 0 || id >= g_conns_cap) return NULL;
  return g_conns[id];
}

/* Call the JavaScript callback with (ev, id, arg); runs nextTick and microtasks afterwards. */
static void emit(int ev, int id, int64_t arg) {
  napi_env env = g_env;
  napi_handle_scope scope;
  if (napi_open_handle_scope(env, &scope) != napi_ok) return;
  napi_value cb, recv, argv[3], result;
  napi_get_reference_value(env, g_cb, &cb);
  napi_get_global(env, &recv);
  napi_create_int32(env, ev, &argv[0]);
  napi_create_int32(env, id, &argv[1]);
  napi_create_int64(env, arg, &argv[2]);
  napi_status st = napi_make_callback(env, g_async, recv, cb, 3, argv, &result);
  if (st == napi_pending_exception) {
    napi_value exc;
    napi_get_and_clear_last_exception(env, &exc);
    napi_fatal_exception(env, exc);
  }
  napi_close_handle_scope(env, scope);
}

/* ---- connections ------------------------------------------------------------------------ */

static void conn_update_poll(conn *c);

static int alloc_id(void) {
  if (g_free_len > 0) return g_free_ids[--g_free_len];
  if (g_next_id >= g_conns_cap) {
    int cap = g_conns_cap ? g_conns_cap * 2 : 256;
    conn **n = realloc(g_conns, sizeof *n * (size_t)cap);
    int *f = realloc(g_free_ids, sizeof *f * (size_t)cap);
    if (!n || !f) {
      if (n) g_conns = n;
      if (f) g_free_ids = f;
      return -1;
    }
    memset(n + g_conns_cap, 0, sizeof *n * (size_t)(cap - g_conns_cap));
    g_conns = n;
    g_free_ids = f;
    g_conns_cap = cap;
  }
  return g_next_id++;
}

static void release_target(conn *c) {
  if (c->dref) napi_delete_reference(g_env, c->dref);
  c->dref = NULL;
  c->dbase = NULL;
  c->dleft = 0;
}

static void release_entry(pending_buf *p) {
  if (p->kind == Q_BUF) napi_delete_reference(g_env, p->ref);
  else if (p->kind == Q_OWNED) free(p->owned);
  else if (p->ffd >= 0 && !p->borrowed) close(p->ffd);
  p->ref = NULL;
  p->owned = NULL;
  p->ffd = -1;
}

static void release_queue(conn *c) {
  release_target(c);
  if (c->load) {
    c->load->c = NULL; /* the thread's read finishes on its own and is dropped */
    c->load = NULL;
  }
  for (int i = c->q_head; i < c->q_len; i++) release_entry(&c->q[i]);
  free(c->q);
  c->q = NULL;
  c->q_head = c->q_len = c->q_cap = 0;
  c->q_bytes = 0;
}

static void on_conn_closed(uv_handle_t *h) {
  conn *c = (conn *)h->data;
  g_free_ids[g_free_len++] = c->id;
  free(c);
}

/*
 * Close now: no more events for this id. The connection is parked as a spare while there is
 * room (see g_spares); otherwise its slot is reused once libuv lets go of the handle.
 */
static void conn_close_now(conn *c) {
  if (c->closing && c->fd < 0) return;
  c->closing = true;
  if (c->close_after) g_lingering--;
  release_queue(c);
  g_conns[c->id] = NULL;
  g_open--;
  if (g_nspares < SPARES) {
    /* uv_poll_stop drops the fd from epoll (it is still open) and any events still pending for
     * it in this loop iteration, synchronously; the stopped handle is never touched again
     * unless accept4 returns this fd number. */
    uv_poll_stop(&c->poll);
    close(c->fd);
    g_spare_fd[g_nspares] = c->fd;
    g_spares[g_nspares++] = c;
    c->fd = -1;
    g_free_ids[g_free_len++] = c->id;
    return;
  }
  /* uv_close stops the poll and forgets the fd synchronously, so closing it right after is safe. */
  uv_close((uv_handle_t *)&c->poll, on_conn_closed);
  close(c->fd);
  c->fd = -1;
}

/* A parked connection whose poll handle was made for `fd`, taken out of g_spares; or NULL. */
static conn *take_spare(int fd) {
  for (int i = 0; i < g_nspares; i++) {
    if (g_spare_fd[i] != fd) continue;
    conn *c = g_spares[i];
    g_nspares--;
    g_spares[i] = g_spares[g_nspares];
    g_spare_fd[i] = g_spare_fd[g_nspares];
    /* Everything after the handle back to its calloc state (the handle itself stays as is). */
    memset((char *)c + offsetof(conn, fd), 0, sizeof *c - offsetof(conn, fd));
    return c;
  }
  return NULL;
}

static void on_load_work(uv_work_t *req);
static void on_load_done(uv_work_t *req, int status);

/*
 * The head entry is a file segment that is no longer known to be cached: read the rest on a
 * thread-pool thread (the queue waits for it). Returns 0 or an errno.
 */
static int start_load(conn *c, pending_buf *p) {
  if (p->borrowed) {
    /* Still inside netWriteFile: the caller's fd is not ours to hand to a thread. */
    int d = fcntl(p->ffd, F_DUPFD_CLOEXEC, 3);
    if (d < 0) return errno;
    p->ffd = d;
    p->borrowed = false;
  }
  file_load *l = calloc(1, sizeof *l);
  size_t left = p->len - p->off;
  char *buf = l ? malloc(left) : NULL;
  if (!buf) {
    free(l);
    return ENOMEM;
  }
  l->req.data = l;
  l->c = c;
  l->fd = p->ffd; /* the load owns the descriptor now */
  l->off = p->foff + (int64_t)p->off;
  l->len = left;
  l->buf = buf;
  p->ffd = -1;
  if (uv_queue_work(g_loop, &l->req, on_load_work, on_load_done) != 0) {
    p->ffd = l->fd;
    free(buf);
    free(l);
    return EIO;
  }
  c->load = l;
  g_file_loaded++;
  return 0;
}

/* The file ended before the segment did (it shrank since the request): zeroes for the rest. */
static int zero_rest(pending_buf *p) {
  size_t left = p->len - p->off;
  char *z = calloc(1, left);
  if (!z) return ENOMEM;
  if (p->ffd >= 0 && !p->borrowed) close(p->ffd);
  p->ffd = -1;
  p->kind = Q_OWNED;
  p->owned = z;
  p->base = z;
  p->len = left;
  p->off = 0;
  g_file_zeroed++;
  return 0;
}

/*
 * Send some of the head file segment. Returns 0 when it is all sent, EAGAIN when the socket is
 * full, EINPROGRESS when a thread-pool read was started, -1 when the entry became a buffer
 * (zeroes past EOF), or another errno (the connection has failed).
 */
static int send_file_entry(conn *c, pending_buf *p) {
  if (!p->fresh) {
    /* Waited for the socket: the pages may have been evicted since the caller looked. */
    if (blockd_range_cached(p->ffd, (uint64_t)(p->foff + (int64_t)p->off), p->len - p->off) != 1) {
      int e = start_load(c, p);
      return e ? e : EINPROGRESS;
    }
  }
  p->fresh = false;
  while (p->off < p->len) {
    size_t left = p->len - p->off;
    off_t fo = (off_t)(p->foff + (int64_t)p->off);
    ssize_t n = sendfile(c->fd, p->ffd, &fo, left < SENDFILE_MAX ? left : SENDFILE_MAX);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return EAGAIN;
      return errno;
    }
    if (n == 0) {
      int e = zero_rest(p);
      return e ? e : -1;
    }
    p->off += (size_t)n;
    c->q_bytes -= (size_t)n;
  }
  return 0;
}

/* Send what is queued; returns 0 (all sent, still blocked, or waiting for a load) or an errno. */
static int flush_queue(conn *c) {
  while (c->q_head < c->q_len) {
    if (c->load) return 0;
    pending_buf *head = &c->q[c->q_head];
    if (head->kind == Q_FILE) {
      int e = send_file_entry(c, head);
      if (e == 0) {
        release_entry(head);
        c->q_head++;
        g_file_sent++;
        continue;
      }
      if (e == -1) continue; /* now a buffer entry */
      if (e == EAGAIN || e == EINPROGRESS) return 0;
      return e;
    }
    struct iovec iov[MAX_IOV];
    int n = 0;
    int flags = MSG_NOSIGNAL | MSG_DONTWAIT;
    for (int i = c->q_head; i < c->q_len && n < MAX_IOV; i++, n++) {
      if (c->q[i].kind == Q_FILE) {
        flags |= MSG_MORE; /* TCP: the header leaves in one segment with the file's bytes */
        break;
      }
      iov[n].iov_base = (char *)c->q[i].base + c->q[i].off;
      iov[n].iov_len = c->q[i].len - c->q[i].off;
    }
    struct msghdr m = { .msg_iov = iov, .msg_iovlen = (size_t)n };
    ssize_t w = sendmsg(c->fd, &m, flags);
    if (w < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
      return errno;
    }
    size_t left = (size_t)w;
    c->q_bytes -= left;
    while (left > 0 && c->q_head < c->q_len) {
      pending_buf *p = &c->q[c->q_head];
      size_t rest = p->len - p->off;
      if (left >= rest) {
        left -= rest;
        release_entry(p);
        c->q_head++;
      } else {
        p->off += left;
        left = 0;
      }
    }
    if ((size_t)w == 0) return 0;
  }
  c->q_head = c->q_len = 0;
  return 0;
}

/* Bytes sent on a unix socket that its peer has not read yet (SIOCOUTQ; -1 on error). */
static int unread_bytes(conn *c) {
  int n = 0;
  if (c->fd < 0 || ioctl(c->fd, SIOCOUTQ, &n) != 0) return -1;
  return n;
}

/*
 * A graceful close keeps the socket open while its queue is not all sent, and, after file
 * segments (see "Loans"), until the peer has read them: their pages stay referenced in its
 * receive queue after we close, and netLoanReturned can only follow an open socket. The
 * linger timer looks again every LINGER_POLL_MS while some connection waits for its reader,
 * and the close happens at the latest LINGER_MS after it was asked for.
 */
static bool must_linger(conn *c) {
  return c->q_head < c->q_len || (c->lent && unread_bytes(c) > 0);
}

static void linger_poll_fast(void) {
  uv_timer_start(&g_linger_timer, on_linger_timer, LINGER_POLL_MS, LINGER_POLL_MS);
}

/*
 * After a flush on writability (or a finished load): report the queue's state. Returns true
 * when the connection must not be touched any more (closed, or failed and reported).
 */
static bool after_flush(conn *c, int e) {
  if (e && c->close_after) {
    conn_close_now(c);
    return true;
  }
  if (e) {
    c->reading = false;
    release_queue(c);
    conn_update_poll(c);
    emit(EV_ERROR, c->id, e);
    return true;
  }
  if (c->q_head == c->q_len) {
    if (c->close_after) {
      if (!must_linger(c)) {
        conn_close_now(c);
        return true;
      }
      conn_update_poll(c); /* nothing to poll: the linger timer looks again */
      linger_poll_fast();
      return true;
    }
    conn_update_poll(c);
    emit(EV_DRAIN, c->id, 0);
    if (c->closing) return true;
  } else {
    conn_update_poll(c);
  }
  return false;
}

static void on_load_work(uv_work_t *req) {
  file_load *l = (file_load *)req->data;
  size_t done = 0;
  while (done < l->len) {
    ssize_t n = pread(l->fd, l->buf + done, l->len - done, (off_t)(l->off + (int64_t)done));
    if (n < 0) {
      if (errno == EINTR) continue;
      l->err = errno;
      return;
    }
    if (n == 0) {
      memset(l->buf + done, 0, l->len - done); /* the file shrank: zeroes, as file reads do */
      return;
    }
    done += (size_t)n;
  }
}

static void on_load_done(uv_work_t *req, int status) {
  file_load *l = (file_load *)req->data;
  close(l->fd);
  conn *c = l->c;
  if (!c) {
    free(l->buf);
    free(l);
    return;
  }
  c->load = NULL;
  int e = status < 0 ? EIO : l->err;
  if (e) {
    free(l->buf);
    free(l);
    after_flush(c, e);
    return;
  }
  /* The head entry is still the segment (the queue waited for it): it becomes a buffer. */
  pending_buf *p = &c->q[c->q_head];
  p->kind = Q_OWNED;
  p->owned = l->buf;
  p->base = l->buf;
  p->len = l->len;
  p->off = 0;
  free(l);
  after_flush(c, flush_queue(c));
}

static void on_conn_io(uv_poll_t *h, int status, int events) {
  conn *c = (conn *)h->data;
  if (c->closing) return;
  if (status < 0 && c->close_after) {
    /* Nobody listens for this connection any more (graceful close pending): just close. */
    conn_close_now(c);
    return;
  }
  if (status < 0) {
    c->reading = false;
    conn_update_poll(c);
    emit(EV_ERROR, c->id, -status);
    return;
  }
  if ((events & UV_WRITABLE) && !c->load) {
    if (after_flush(c, flush_queue(c))) return;
  }
  if ((events & (UV_READABLE | UV_DISCONNECT)) && c->reading) {
    ssize_t n;
    if (c->dleft > 0) {
      struct iovec iov[2] = {
        { .iov_base = c->dbase, .iov_len = c->dleft },
        { .iov_base = g_rbuf, .iov_len = g_rlen < DIRECT_TAIL ? g_rlen : DIRECT_TAIL },
      };
      do n = readv(c->fd, iov, 2); while (n < 0 && errno == EINTR);
      if (n > 0) {
        /* Bookkeeping before the callback, which may arm the next target. */
        size_t k = (size_t)n < c->dleft ? (size_t)n : c->dleft;
        c->dbase += k;
        c->dleft -= k;
        if (c->dleft == 0) release_target(c);
        emit(EV_READ_DIRECT, c->id, n);
        return;
      }
    } else {
      do n = read(c->fd, g_rbuf, g_rlen); while (n < 0 && errno == EINTR);
    }
    if (n > 0) {
      emit(EV_READ, c->id, n);
    } else if (n == 0) {
      c->reading = false;
      conn_update_poll(c);
      emit(EV_EOF, c->id, 0);
    } else if (errno != EAGAIN && errno != EWOULDBLOCK) {
      int e = errno;
      c->reading = false;
      conn_update_poll(c);
      emit(EV_ERROR, c->id, e);
    }
  }
}

static void conn_update_poll(conn *c) {
  if (c->closing) return;
  int ev = 0;
  if (c->reading) ev |= UV_READABLE;
  if (c->q_head < c->q_len && !c->load) ev |= UV_WRITABLE;
  if (ev == c->events) return;
  c->events = ev;
  if (ev) uv_poll_start(&c->poll, ev, on_conn_io);
  else uv_poll_stop(&c->poll);
}

/* ---- listeners -------------------------------------------------------------------------- */

static void on_listener_closed(uv_handle_t *h) { free(h->data); }

static void on_accept(uv_poll_t *h, int status, int events) {
  (void)events;
  listener *l = (listener *)h->data;
  if (l->closing || status < 0) return;
  for (int i = 0; i < ACCEPT_BURST && !l->closing; i++) {
    struct sockaddr_storage sa;
    socklen_t salen = sizeof sa;
    int fd = accept4(l->fd, (struct sockaddr *)&sa, &salen, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      /* EAGAIN: drained. EMFILE and friends: try again on the next readiness event. */
      return;
    }
    int id = alloc_id();
    conn *c = id > 0 ? take_spare(fd) : NULL;
    if (!c) {
      c = id > 0 ? calloc(1, sizeof *c) : NULL;
      if (!c || uv_poll_init(g_loop, &c->poll, fd) != 0) {
        if (c) free(c);
        if (id > 0) g_free_ids[g_free_len++] = id;
        close(fd);
        continue;
      }
    }
    c->fd = fd;
    c->id = id;
    c->gen = ++g_gen;
    c->poll.data = c;
    c->inet = sa.ss_family == AF_INET || sa.ss_family == AF_INET6;
    if (c->inet) {
      int one = 1;
      setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    g_conns[id] = c;
    g_open++;
    emit(EV_ACCEPT, id, l->id);
  }
}

/* ---- JavaScript entry points ------------------------------------------------------------ */

static size_t get_args(napi_env env, napi_callback_info info, size_t want, napi_value *argv) {
  size_t argc = want;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  return argc;
}

static napi_value net_init(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  if (get_args(env, info, 2, argv) < 2) return nv_throw(env, "netInit(buffer, callback)");
  if (g_cb) return nv_throw(env, "netInit: already initialised");
  void *data;
  size_t len;
  bool isbuf;
  napi_is_buffer(env, argv[0], &isbuf);
  if (!isbuf || napi_get_buffer_info(env, argv[0], &data, &len) != napi_ok || len == 0) {
    return nv_throw(env, "netInit: the read buffer must be a non-empty Buffer");
  }
  napi_valuetype t;
  napi_typeof(env, argv[1], &t);
  if (t != napi_function) return nv_throw(env, "netInit: callback must be a function");
  if (napi_get_uv_event_loop(env, &g_loop) != napi_ok) return nv_throw(env, "netInit: no event loop");
  napi_value res, name;
  napi_create_object(env, &res);
  napi_create_string_utf8(env, "blockd:nbd-socket", NAPI_AUTO_LENGTH, &name);
  if (napi_async_init(env, res, name, &g_async) != napi_ok) return nv_throw(env, "netInit: async_init failed");
  uv_timer_init(g_loop, &g_linger_timer);
  uv_unref((uv_handle_t *)&g_linger_timer);
  napi_create_reference(env, argv[0], 1, &g_buf_ref);
  napi_create_reference(env, argv[1], 1, &g_cb);
  g_env = env;
  g_rbuf = data;
  g_rlen = len;
  return NULL;
}

static napi_value net_listen_unix(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  if (get_args(env, info, 2, argv) < 2) return nv_throw(env, "netListenUnix(path, backlog)");
  struct sockaddr_un sa;
  memset(&sa, 0, sizeof sa);
  sa.sun_family = AF_UNIX;
  size_t n;
  if (napi_get_value_string_utf8(env, argv[0], sa.sun_path, sizeof sa.sun_path, &n) != napi_ok) {
    return nv_throw(env, "netListenUnix: path must be a string");
  }
  if (n >= sizeof sa.sun_path - 1) return blockd_throw_errno(env, ENAMETOOLONG, "bind");
  int backlog;
  if (!get_int(env, argv[1], &backlog)) return NULL;
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return blockd_throw_errno(env, errno, "socket");
  if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
    int e = errno;
    close(fd);
    return blockd_throw_errno(env, e, "bind");
  }
  if (listen(fd, backlog) < 0) {
    int e = errno;
    close(fd);
    unlink(sa.sun_path);
    return blockd_throw_errno(env, e, "listen");
  }
  return nv_int(env, fd);
}

static napi_value net_dup(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int fd;
  if (get_args(env, info, 1, argv) < 1 || !get_int(env, argv[0], &fd)) return NULL;
  int d = fcntl(fd, F_DUPFD_CLOEXEC, 3);
  if (d < 0) return blockd_throw_errno(env, errno, "dup");
  return nv_int(env, d);
}

static napi_value net_listen(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int fd;
  if (get_args(env, info, 1, argv) < 1 || !get_int(env, argv[0], &fd)) return NULL;
  if (!g_cb) return nv_throw(env, "netListen: call netInit first");
  int type;
  socklen_t tl = sizeof type;
  if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &tl) < 0) return blockd_throw_errno(env, errno, "getsockopt");
  if (type != SOCK_STREAM) return blockd_throw_errno(env, EINVAL, "not a stream socket");
  int fl = fcntl(fd, F_GETFL);
  if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) return blockd_throw_errno(env, errno, "fcntl");
  int slot = -1;
  for (int i = 0; i < (int)(sizeof g_listeners / sizeof g_listeners[0]); i++) {
    if (!g_listeners[i]) {
      slot = i;
      break;
    }
  }
  if (slot < 0) return blockd_throw_errno(env, EMFILE, "netListen");
  listener *l = calloc(1, sizeof *l);
  if (!l) return blockd_throw_errno(env, ENOMEM, "netListen");
  if (uv_poll_init(g_loop, &l->poll, fd) != 0) {
    free(l);
    return blockd_throw_errno(env, EINVAL, "uv_poll_init");
  }
  l->fd = fd;
  l->id = slot + 1;
  l->poll.data = l;
  g_listeners[slot] = l;
  uv_poll_start(&l->poll, UV_READABLE, on_accept);
  return nv_int(env, l->id);
}

static napi_value net_listener_close(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int id;
  if (get_args(env, info, 1, argv) < 1 || !get_int(env, argv[0], &id)) return NULL;
  if (id < 1 || id > (int)(sizeof g_listeners / sizeof g_listeners[0]) || !g_listeners[id - 1]) return NULL;
  listener *l = g_listeners[id - 1];
  g_listeners[id - 1] = NULL;
  l->closing = true;
  uv_close((uv_handle_t *)&l->poll, on_listener_closed);
  close(l->fd);
  return NULL;
}

static conn *arg_conn(napi_env env, napi_callback_info info, size_t want, napi_value *argv) {
  int id;
  if (get_args(env, info, want, argv) < 1 || !get_int(env, argv[0], &id)) return NULL;
  return conn_of(id);
}

static napi_value set_reading(napi_env env, napi_callback_info info, bool on) {
  napi_value argv[1];
  conn *c = arg_conn(env, info, 1, argv);
  if (c && !c->closing) {
    c->reading = on;
    conn_update_poll(c);
  }
  return NULL;
}

static napi_value net_resume(napi_env env, napi_callback_info info) { return set_reading(env, info, true); }
static napi_value net_pause(napi_env env, napi_callback_info info) { return set_reading(env, info, false); }

/* A new zeroed entry at the tail of the write queue (NULL: out of memory). */
static pending_buf *queue_slot(conn *c) {
  if (c->q_len == c->q_cap) {
    if (c->q_head > 0) {
      memmove(c->q, c->q + c->q_head, sizeof *c->q * (size_t)(c->q_len - c->q_head));
      c->q_len -= c->q_head;
      c->q_head = 0;
    }
    if (c->q_len == c->q_cap) {
      int cap = c->q_cap ? c->q_cap * 2 : 16;
      pending_buf *n = realloc(c->q, sizeof *n * (size_t)cap);
      if (!n) return NULL;
      c->q = n;
      c->q_cap = cap;
    }
  }
  pending_buf *p = &c->q[c->q_len];
  memset(p, 0, sizeof *p);
  p->ffd = -1;
  return p;
}

static bool queue_push(conn *c, napi_env env, napi_value buf, const char *base, size_t len, size_t off) {
  pending_buf *p = queue_slot(c);
  if (!p) return false;
  if (napi_create_reference(env, buf, 1, &p->ref) != napi_ok) return false;
  p->kind = Q_BUF;
  p->base = base;
  p->len = len;
  p->off = off;
  c->q_len++;
  c->q_bytes += len - off;
  return true;
}

/*
 * netWrite(id, buf | buf[]): sendmsg() at once when nothing is queued; whatever the kernel does
 * not take is queued (the Buffers referenced, not copied) and sent on writability.
 */
static napi_value net_write(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  conn *c = arg_conn(env, info, 2, argv);
  if (!c || c->closing) return nv_int(env, -EPIPE);
  bool isarr;
  napi_is_array(env, argv[1], &isarr);
  uint32_t count = 1;
  if (isarr) napi_get_array_length(env, argv[1], &count);
  if (count == 0) return nv_int(env, 1);
  napi_value one[MAX_IOV];
  struct iovec iov[MAX_IOV];
  uint32_t done = 0;
  bool blocked = c->q_head < c->q_len;
  while (done < count) {
    uint32_t n = count - done < MAX_IOV ? count - done : MAX_IOV;
    for (uint32_t i = 0; i < n; i++) {
      napi_value b = argv[1];
      if (isarr) napi_get_element(env, argv[1], done + i, &b);
      void *data;
      size_t len;
      if (napi_get_buffer_info(env, b, &data, &len) != napi_ok) {
        return nv_throw(env, "netWrite: expected Buffers");
      }
      one[i] = b;
      iov[i].iov_base = data;
      iov[i].iov_len = len;
      c->written += len;
    }
    size_t off0 = 0; /* bytes of iov[first] already sent */
    uint32_t first = 0;
    if (!blocked) {
      size_t total = 0;
      for (uint32_t i = 0; i < n; i++) total += iov[i].iov_len;
      struct msghdr m = { .msg_iov = iov, .msg_iovlen = n };
      ssize_t w;
      do w = sendmsg(c->fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT); while (w < 0 && errno == EINTR);
      if (w < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK) return nv_int(env, -errno);
        w = 0;
      }
      if ((size_t)w == total) {
        done += n;
        continue;
      }
      blocked = true;
      size_t left = (size_t)w;
      while (first < n && left >= iov[first].iov_len) left -= iov[first++].iov_len;
      off0 = left;
      if (!c->big_sndbuf && !c->inet) {
        /* Only connections that move enough data to fill the socket pay for a bigger buffer. */
        int v = BIG_SNDBUF;
        setsockopt(c->fd, SOL_SOCKET, SO_SNDBUF, &v, sizeof v);
        c->big_sndbuf = true;
      }
    }
    for (uint32_t i = first; i < n; i++) {
      if (!queue_push(c, env, one[i], iov[i].iov_base, iov[i].iov_len, i == first ? off0 : 0)) {
        return nv_int(env, -ENOMEM);
      }
    }
    done += n;
  }
  if (!blocked) return nv_int(env, 1);
  /* The bigger buffer may already have room: try once more before waiting for writability. */
  int e = flush_queue(c);
  if (e) return nv_int(env, -e);
  if (c->q_head == c->q_len) return nv_int(env, 1);
  conn_update_poll(c);
  return nv_int(env, 0);
}

/*
 * netWriteFile(id, buf | buf[], fd, offset, length): queue the Buffers, then `length` bytes of
 * the file `fd` from `offset` (the caller has just checked them cached: see "File segments"),
 * and send what the socket takes now. `fd` is only used during the call; a segment that has to
 * wait keeps a dup() of it. Returns as netWrite.
 */
static napi_value net_write_file(napi_env env, napi_callback_info info) {
  napi_value argv[5];
  conn *c = arg_conn(env, info, 5, argv);
  if (!c || c->closing) return nv_int(env, -EPIPE);
  int fd;
  int64_t off, len;
  if (!get_int(env, argv[2], &fd)) return NULL;
  if (napi_get_value_int64(env, argv[3], &off) != napi_ok || napi_get_value_int64(env, argv[4], &len) != napi_ok ||
      fd < 0 || off < 0 || len <= 0 || off > INT64_MAX - len) {
    return nv_throw(env, "netWriteFile(id, buffers, fd, offset, length): bad file range");
  }
  bool isarr;
  napi_is_array(env, argv[1], &isarr);
  uint32_t count = 1;
  if (isarr) napi_get_array_length(env, argv[1], &count);
  if (count > MAX_IOV) return nv_throw(env, "netWriteFile: too many Buffers");
  napi_value bv[MAX_IOV];
  void *bdata[MAX_IOV];
  size_t blen[MAX_IOV];
  /* All checked before anything is queued: a header must never go out without its data. */
  for (uint32_t i = 0; i < count; i++) {
    bv[i] = argv[1];
    if (isarr) napi_get_element(env, argv[1], i, &bv[i]);
    bool isbuf = false;
    napi_is_buffer(env, bv[i], &isbuf);
    if (!isbuf || napi_get_buffer_info(env, bv[i], &bdata[i], &blen[i]) != napi_ok) {
      return nv_throw(env, "netWriteFile: expected Buffers");
    }
  }
  bool was_empty = c->q_head == c->q_len;
  for (uint32_t i = 0; i < count; i++) {
    if (blen[i] > 0 && !queue_push(c, env, bv[i], bdata[i], blen[i], 0)) return nv_int(env, -ENOMEM);
    c->written += blen[i];
  }
  pending_buf *fe = queue_slot(c);
  if (!fe) return nv_int(env, -ENOMEM);
  c->q_len++;
  c->q_bytes += (size_t)len;
  c->written += (uint64_t)len;
  fe->len = (size_t)len;
  fe->kind = Q_FILE;
  fe->ffd = fd;
  fe->foff = off;
  fe->borrowed = true;
  fe->fresh = was_empty;
  if (!c->inet) c->lent = true;
  int e = 0;
  if (was_empty) {
    e = flush_queue(c);
    if (!e && c->q_head < c->q_len && !c->big_sndbuf && !c->inet) {
      /* As netWrite: only connections that fill the socket pay for a bigger buffer. */
      int v = BIG_SNDBUF;
      setsockopt(c->fd, SOL_SOCKET, SO_SNDBUF, &v, sizeof v);
      c->big_sndbuf = true;
      e = flush_queue(c);
    }
  }
  /* Whatever is still queued of the segment must not depend on the caller's fd any more. */
  if (c->q_head < c->q_len) {
    pending_buf *last = &c->q[c->q_len - 1];
    if (last->kind == Q_FILE && last->borrowed) {
      int d = fcntl(fd, F_DUPFD_CLOEXEC, 3);
      g_file_waited++;
      last->borrowed = false;
      last->fresh = false;
      last->ffd = d;
      if (d < 0 && !e) e = errno;
    }
  }
  if (e) return nv_int(env, -e);
  if (c->q_head == c->q_len) return nv_int(env, 1);
  conn_update_poll(c);
  return nv_int(env, 0);
}

static napi_value net_pending(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  conn *c = arg_conn(env, info, 1, argv);
  return nv_int(env, c ? (int64_t)c->q_bytes : 0);
}

/*
 * netReadInto(id, buf, off, len): the next `len` bytes read on this connection go to
 * buf[off .. off+len) (EV_READ_DIRECT reports them). Replaces a target still armed.
 */
static napi_value net_read_into(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  conn *c = arg_conn(env, info, 4, argv);
  if (!c || c->closing) return NULL;
  void *data;
  size_t len;
  int64_t off, n;
  bool isbuf;
  napi_is_buffer(env, argv[1], &isbuf);
  if (!isbuf || napi_get_buffer_info(env, argv[1], &data, &len) != napi_ok ||
      napi_get_value_int64(env, argv[2], &off) != napi_ok || napi_get_value_int64(env, argv[3], &n) != napi_ok) {
    return nv_throw(env, "netReadInto(id, buffer, offset, length)");
  }
  if (off < 0 || n < 0 || (uint64_t)off > len || (uint64_t)n > len - (size_t)off) {
    return nv_throw(env, "netReadInto: range outside the buffer");
  }
  release_target(c);
  if (n == 0) return NULL;
  if (napi_create_reference(env, argv[1], 1, &c->dref) != napi_ok) return nv_throw(env, "netReadInto: reference failed");
  c->dbase = (char *)data + off;
  c->dleft = (size_t)n;
  return NULL;
}

/* Every few seconds while graceful closes are pending: close the ones past their deadline. */
static void on_linger_timer(uv_timer_t *t) {
  (void)t;
  uint64_t now = uv_now(g_loop);
  int reading = 0; /* sent everything, waiting for the peer to read it */
  for (int i = 1; i < g_next_id && i < g_conns_cap; i++) {
    conn *c = g_conns[i];
    if (!c || !c->close_after || c->closing) continue;
    if (now >= c->linger_until) conn_close_now(c);
    else if (c->q_head == c->q_len && !c->load) {
      if (!must_linger(c)) conn_close_now(c);
      else reading++;
    }
  }
  if (g_lingering == 0) uv_timer_stop(&g_linger_timer);
  else if (reading == 0 && uv_timer_get_repeat(&g_linger_timer) != LINGER_CHECK_MS) {
    uv_timer_start(&g_linger_timer, on_linger_timer, LINGER_CHECK_MS, LINGER_CHECK_MS);
  }
}

static napi_value net_close(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  conn *c = arg_conn(env, info, 2, argv);
  if (!c || c->closing) return NULL;
  bool graceful = false;
  napi_get_value_bool(env, argv[1], &graceful);
  /* At once: what is not sent yet is dropped; what the peer has not read of file segments
   * still keeps the socket open (see must_linger). */
  if (!graceful && c->lent && c->q_head < c->q_len) {
    c->written -= c->q_bytes; /* never sent: not to be counted as sent below */
    release_queue(c);
  }
  if ((graceful || c->lent) && must_linger(c)) {
    if (!c->close_after) {
      c->close_after = true;
      c->linger_until = uv_now(g_loop) + LINGER_MS;
      if (g_lingering++ == 0) uv_timer_start(&g_linger_timer, on_linger_timer, LINGER_CHECK_MS, LINGER_CHECK_MS);
    }
    c->reading = false;
    conn_update_poll(c);
    if (c->q_head == c->q_len) linger_poll_fast();
    return NULL;
  }
  conn_close_now(c);
  return NULL;
}

static napi_value net_peer(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  conn *c = arg_conn(env, info, 1, argv);
  napi_value r;
  if (!c || !c->inet) {
    napi_create_string_utf8(env, "unix", NAPI_AUTO_LENGTH, &r);
    return r;
  }
  struct sockaddr_storage sa;
  socklen_t l = sizeof sa;
  char host[INET6_ADDRSTRLEN] = "?";
  char out[INET6_ADDRSTRLEN + 8];
  int port = 0;
  if (getpeername(c->fd, (struct sockaddr *)&sa, &l) == 0) {
    if (sa.ss_family == AF_INET) {
      struct sockaddr_in *s4 = (struct sockaddr_in *)&sa;
      inet_ntop(AF_INET, &s4->sin_addr, host, sizeof host);
      port = ntohs(s4->sin_port);
    } else if (sa.ss_family == AF_INET6) {
      struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&sa;
      inet_ntop(AF_INET6, &s6->sin6_addr, host, sizeof host);
      port = ntohs(s6->sin6_port);
    }
  }
  snprintf(out, sizeof out, "%s:%d", host, port);
  napi_create_string_utf8(env, out, NAPI_AUTO_LENGTH, &r);
  return r;
}

static napi_value net_loan_gen(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  conn *c = arg_conn(env, info, 1, argv);
  napi_value r;
  napi_create_double(env, !c || c->closing || c->inet ? -1 : c->gen, &r);
  return r;
}

static napi_value net_loan_mark(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  conn *c = arg_conn(env, info, 1, argv);
  napi_value r;
  napi_create_double(env, c ? (double)c->written : 0, &r);
  return r;
}

/*
 * A connection in a graceful close (close_after) still counts: its queue, file segments
 * included, is still being sent. Once it is closed, or its id belongs to a later connection,
 * the answer is yes: what its peer had not read by then is no longer followed.
 */
static napi_value net_loan_returned(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  conn *c = arg_conn(env, info, 3, argv);
  double gen = 0, mark = 0;
  napi_get_value_double(env, argv[1], &gen);
  napi_get_value_double(env, argv[2], &mark);
  bool back = true;
  if (c && c->gen == gen && !c->closing && c->fd >= 0) {
    uint64_t sent = c->written - c->q_bytes;
    int outq = (double)sent < mark ? -1 : unread_bytes(c);
    back = outq >= 0 && (double)sent - (double)outq >= mark;
  }
  napi_value r;
  napi_get_boolean(env, back, &r);
  return r;
}

/* netOpenCount(): connections whose socket is still open (tests look for leaks with it). */
static napi_value net_open_count(napi_env env, napi_callback_info info) {
  (void)info;
  return nv_int(env, g_open);
}

static napi_value net_file_stats(napi_env env, napi_callback_info info) {
  (void)info;
  napi_value arr;
  napi_create_array_with_length(env, 4, &arr);
  double v[4] = { g_file_sent, g_file_waited, g_file_loaded, g_file_zeroed };
  for (uint32_t i = 0; i < 4; i++) {
    napi_value x;
    napi_create_double(env, v[i], &x);
    napi_set_element(env, arr, i, x);
  }
  return arr;
}

/* Called from the module's init (blockd_native.c). */
void netio_register(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
    { "netInit", NULL, net_init, NULL, NULL, NULL, napi_enumerable, NULL },
    { "netListenUnix", NULL, net_listen_unix, NULL, NULL, NULL, napi_enumerable, NULL },
    { "netDup", NULL, net_dup, NULL, NULL, NULL, napi_enumerable, NULL },
    { "netListen", NULL, net_listen, NULL, NULL, NULL, napi_enumerable, NULL },
    { "netListenerClose", NULL, net_listener_close, NULL, NULL, NULL, napi_enumerable, NULL },
    { "netResume", NULL, net_resume, NULL, NULL, NULL, napi_enumerable, NULL },
    { "netPause", NULL, net_pause, NULL, NULL, NULL, napi_enumerable, NULL },
    { "netWrite", NULL, net_write, NULL, NULL, NULL, napi_enumerable, NULL },
    { "netPending", NULL, net_pending, NULL, NULL, NULL, napi_enumerable, NULL },
    { "netClose", NULL, net_close, NULL, NULL, NULL, napi_enumerable, NULL },
    { "netPeer", NULL, net_peer, NULL, NULL, NULL, napi_enumerable, NULL },
    { "netOpenCount", NULL, net_open_count, NULL, NULL, NULL, napi_enumerable, NULL },
    { "netReadInto", NULL, net_read_into, NULL, NULL, NULL, napi_enumerable, NULL },
    { "netWriteFile", NULL, net_write_file, NULL, NULL, NULL, napi_enumerable, NULL },
    { "netFileStats", NULL, net_file_stats, NULL, NULL, NULL, napi_enumerable, NULL },
    { "netLoanGen", NULL, net_loan_gen, NULL, NULL, NULL, napi_enumerable, NULL },
    { "netLoanMark", NULL, net_loan_mark, NULL, NULL, NULL, napi_enumerable, NULL },
    { "netLoanReturned", NULL, net_loan_returned, NULL, NULL, NULL, napi_enumerable, NULL },
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
}
