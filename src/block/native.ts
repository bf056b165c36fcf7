/**
 * The optional native addon (native/blockd_native.c) and its pure-JS fallback.
 *
 * The fallback stays correct, only slower or less precise: seeking and hole punching throw
 * ENOTSUP (the file driver then reports everything as data and writes zero buffers), there
 * is no non-blocking read and no OFD locking (image locking is then in-process only), and no
 * zstd (qcow2 zstd-compressed clusters are then refused with ENOTSUP).
 * `BLOCKD_NO_ADDON=1` forces the fallback so tests cover both paths.
 */
import { createRequire } from 'node:module';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export interface NativeOps {
  /** True when the real addon is loaded. */
  readonly available: boolean;
  /** Next data offset at or after `offset`, or -1 if there is none before EOF. */
  seekData(fd: number, offset: number): number;
  /** Next hole offset at or after `offset` (EOF counts as a hole), or -1 past EOF. */
  seekHole(fd: number, offset: number): number;
  /** Deallocate a range (keep size). Throws with `code` ENOTSUP/EOPNOTSUPP when not possible. */
  punchHole(fd: number, offset: number, length: number): void;
  /** Zero a range without writing data (FALLOC_FL_ZERO_RANGE). Throws when not possible. */
  zeroRange(fd: number, offset: number, length: number): void;
  /** preadv2(RWF_NOWAIT): bytes read, or -1 when it would block / is unsupported. */
  preadNowait(fd: number, buf: Buffer, offset: number): number;
  /**
   * cachestat(2): 1 when every page of the range is in the page cache, 0 when not, -1 when the
   * kernel cannot tell (Linux < 6.5). `length` > 0. Undefined without the addon.
   */
  readonly cachedRange?: (fd: number, offset: number, length: number) => number;
  /** OFD byte-range lock: type 0 unlock, 1 shared, 2 exclusive. Throws EAGAIN/EACCES on conflict. */
  ofdLock(fd: number, start: number, length: number, type: 0 | 1 | 2): void;
  /** Whether taking a lock of `type` on the range would conflict with another open file description. */
  ofdTest(fd: number, start: number, length: number, type: 1 | 2): boolean;
  /** A zeroed Buffer whose memory is `align`-aligned (O_DIRECT bounce buffers). */
  allocAligned(size: number, align: number): Buffer;
  /** The O_DIRECT open flag. */
  readonly O_DIRECT: number;
  /**
   * Positioned reads or writes of many buffers in one thread-pool round trip (see
   * native/blockd_native.c). `results[i]` = bytes done (reads stop short only at EOF) or
   * -errno; `done` runs on the main thread once all are finished. Undefined without the addon.
   */
  readonly ioBatch?: (
    fd: number,
    write: boolean,
    bufs: Buffer[],
    offsets: number[],
    results: Float64Array,
    done: () => void,
  ) => void;
  /** SO_SNDBUF of a socket fd (capped by the kernel). Undefined without the addon. */
  readonly setSendBuffer?: (fd: number, bytes: number) => void;
  /**
   * A write lane: one thread-pool thread drains its queue of pwrite batches in order and
   * reports each finished batch (`results[i]` = bytes written or -errno, then `done()`).
   * Undefined without the addon.
   */
  readonly writeLane?: WriteLaneOps;
  /** zstd through the system libzstd.so.1 (loaded on first use). Undefined without the addon. */
  readonly zstd?: ZstdOps;
}

/**
 * zstd from the addon, which dlopen()s libzstd.so.1 on the first call (no build dependency).
 * Decoding follows what qcow2 needs (native/blockd_native.c, zstd_decode): one or more frames,
 * then any trailing bytes are ignored; a truncated or corrupt frame throws (`code` EIO).
 */
export interface ZstdOps {
  /** Whether libzstd could be loaded. */
  available(): boolean;
  /** The libzstd version, or why it could not be loaded. */
  status(): { available: boolean; version?: string; error?: string };
  /**
   * Decode `src` into `dst` on the calling thread; returns the bytes produced. Data longer than
   * `dst` throws, unless `stopWhenFull` (then decoding just stops once `dst` is full).
   * Throws `code` ENOTSUP when libzstd is missing.
   */
  decompress(src: Buffer, dst: Buffer, stopWhenFull?: boolean): number;
  /** The same on a thread-pool thread; do not touch `src`/`dst` until it settles. */
  decompressAsync(src: Buffer, dst: Buffer, stopWhenFull?: boolean): Promise<number>;
  /** One frame into `dst`; its length, or -1 when it does not fit. */
  compress(src: Buffer, dst: Buffer, level: number): number;
}

/** See NativeOps.writeLane; `lane` is an opaque handle from `create()`. */
export interface WriteLaneOps {
  create(): object;
  submit(lane: object, fd: number, bufs: Buffer[], offsets: number[], results: Float64Array, done: () => void): void;
  /** Release the lane; only when nothing is queued. */
  close(lane: object): void;
}

interface RawAddon {
  seekData(fd: number, offset: number): number;
  seekHole(fd: number, offset: number): number;
  punchHole(fd: number, offset: number, length: number): void;
  zeroRange(fd: number, offset: number, length: number): void;
  preadNowait(fd: number, buf: Buffer, offset: number): number;
  cachedRange?(fd: number, offset: number, length: number): number;
  ofdLock(fd: number, start: number, length: number, type: number): void;
  ofdTest(fd: number, start: number, length: number, type: number): boolean;
  allocAligned(size: number, align: number): Buffer;
  oDirect(): number;
  ioBatch?(fd: number, write: boolean, bufs: Buffer[], offsets: number[], results: Float64Array, done: () => void): void;
  laneCreate?(): object;
  laneSubmit?(lane: object, fd: number, bufs: Buffer[], offsets: number[], results: Float64Array, done: () => void): void;
  laneClose?(lane: object): void;
  setSendBuffer?(fd: number, bytes: number): void;
  zstdAvailable?(): boolean;
  zstdStatus?(): { available: boolean; version?: string; error?: string };
  zstdDecompress?(src: Buffer, dst: Buffer, stopWhenFull?: boolean): number;
  zstdDecompressAsync?(
    src: Buffer,
    dst: Buffer,
    stopWhenFull: boolean,
    done: (err: Error | null, n?: number) => void,
  ): void;
  zstdCompress?(src: Buffer, dst: Buffer, level: number): number;
}

function zstdOps(a: RawAddon): ZstdOps | undefined {
  const { zstdAvailable, zstdStatus, zstdDecompress, zstdDecompressAsync, zstdCompress } = a;
  if (!zstdAvailable || !zstdStatus || !zstdDecompress || !zstdDecompressAsync || !zstdCompress) return undefined;
  return {
    available: () => zstdAvailable.call(a),
    status: () => zstdStatus.call(a),
    decompress: (src, dst, stop = false) => zstdDecompress.call(a, src, dst, stop),
    decompressAsync: (src, dst, stop = false) =>
      new Promise((resolve, reject) => {
        zstdDecompressAsync.call(a, src, dst, stop, (err, n) => (err ? reject(err) : resolve(n ?? 0)));
      }),
    compress: (src, dst, level) => zstdCompress.call(a, src, dst, level),
  };
}

function notSupported(what: string): never {
  const err = new Error(`${what}: Operation not supported`) as Error & { code: string };
  err.code = 'ENOTSUP';
  throw err;
}

/** Pure-JS stand-in: correct, never clever. */
export const FALLBACK_OPS: NativeOps = {
  available: false,
  seekData: () => notSupported('seekData'),
  seekHole: () => notSupported('seekHole'),
  punchHole: () => notSupported('punchHole'),
  zeroRange: () => notSupported('zeroRange'),
  preadNowait: () => -1,
  ofdLock: () => notSupported('ofdLock'),
  ofdTest: () => false,
  allocAligned: () => notSupported('allocAligned'),
  // Linux x86/arm generic value; only used if the addon is missing, to open with O_DIRECT.
  O_DIRECT: 0o40000,
};

function addonPath(): string | undefined {
  const here = dirname(fileURLToPath(import.meta.url));
  // src/block/native.ts and dist/block/native.js are both two levels below the root.
  const p = join(here, '..', '..', 'native', 'build', 'Release', 'blockd_native.node');
  return existsSync(p) ? p : undefined;
}

let cached: NativeOps | undefined;
let loadError: string | undefined;
let rawModule: unknown;

/**
 * The addon module itself (undefined without it), for layers that check and wrap the functions
 * they use themselves (the NBD server's netio, see src/nbd/native-transport.ts).
 */
export function nativeAddon(): unknown {
  nativeOps();
  return rawModule;
}

/** The addon if it is built and not disabled, else the fallback. Loaded once. */
export function nativeOps(): NativeOps {
  if (cached) return cached;
  if (process.env['BLOCKD_NO_ADDON'] === '1') return (cached = FALLBACK_OPS);
  const p = addonPath();
  if (!p) {
    loadError = 'native addon not built (npm run build:addon)';
    return (cached = FALLBACK_OPS);
  }
  try {
    const require = createRequire(import.meta.url);
    const a = require(p) as RawAddon;
    rawModule = a;
    const zstd = zstdOps(a);
    cached = {
      available: true,
      seekData: (fd, o) => a.seekData(fd, o),
      seekHole: (fd, o) => a.seekHole(fd, o),
      punchHole: (fd, o, l) => a.punchHole(fd, o, l),
      zeroRange: (fd, o, l) => a.zeroRange(fd, o, l),
      preadNowait: (fd, b, o) => a.preadNowait(fd, b, o),
      ofdLock: (fd, s, l, t) => a.ofdLock(fd, s, l, t),
      ofdTest: (fd, s, l, t) => a.ofdTest(fd, s, l, t),
      allocAligned: (n, al) => a.allocAligned(n, al),
      O_DIRECT: a.oDirect(),
      ...(typeof a.ioBatch === 'function' && { ioBatch: a.ioBatch.bind(a) }),
      ...(typeof a.cachedRange === 'function' && { cachedRange: a.cachedRange.bind(a) }),
      ...(typeof a.setSendBuffer === 'function' && { setSendBuffer: a.setSendBuffer.bind(a) }),
      ...(a.laneCreate && a.laneSubmit && a.laneClose && {
        writeLane: { create: a.laneCreate.bind(a), submit: a.laneSubmit.bind(a), close: a.laneClose.bind(a) },
      }),
      ...(zstd && { zstd }),
    };
  } catch (err) {
    loadError = err instanceof Error ? err.message : String(err);
    cached = FALLBACK_OPS;
  }
  return cached;
}

/** Why the addon is not in use (for a debug log line), or undefined. */
export function nativeLoadError(): string | undefined {
  nativeOps();
  return loadError;
}

/** The addon's zstd when libzstd is loadable, else undefined. */
export function zstdOpsIfAvailable(): ZstdOps | undefined {
  const z = nativeOps().zstd;
  return z?.available() ? z : undefined;
}

/** Why zstd cannot be used (for warnings and errors), or undefined when it can. */
export function zstdUnavailableReason(): string | undefined {
  const ops = nativeOps();
  if (!ops.available) {
    return process.env['BLOCKD_NO_ADDON'] === '1'
      ? 'the native addon is disabled (BLOCKD_NO_ADDON=1)'
      : `the native addon is not loaded (${loadError ?? 'unknown reason'})`;
  }
  if (!ops.zstd) return 'the native addon was built without zstd support (npm run build:addon)';
  const st = ops.zstd.status();
  return st.available ? undefined : (st.error ?? 'libzstd.so.1 cannot be loaded');
}

/** Tests only: forget the cached choice so BLOCKD_NO_ADDON is read again. */
export function resetNativeOpsForTests(): void {
  cached = undefined;
  loadError = undefined;
}
