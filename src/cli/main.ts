/**
 * blockd's composition root: the qemu-storage-daemon command line (two passes,
 * qsd-cli.md §2), logger, services, dispatcher, chardevs and monitors, pidfile,
 * --daemonize, signals and shutdown. Nothing imports this module; bin/blockd calls run().
 */
import { writeSync } from 'node:fs';
import { pino, type Logger, type LevelWithSilent } from 'pino';
import { CliError } from '../util/errors.js';
import { createLogger } from '../util/logger.js';
import { Services, BLOCKD_VERSION } from '../qmp/services.js';
import { SchemaRegistry } from '../qmp/schema-registry.js';
import { Dispatcher } from '../qmp/dispatcher.js';
import { MonitorManager } from '../qmp/monitor-manager.js';
import { ALL_COMMANDS } from '../qmp/commands/index.js';
import { pass1, type Pass1 } from './argv.js';
import { runPass2Item, type Pass2Context } from './options.js';
import { PidFile } from './pidfile.js';
import { DaemonChannel, spawnDaemon } from './daemonize.js';
import { startDemo, type Demo } from './demo.js';

export const PROG = 'blockd';

/** `--help` text (stdout, exit 0), modelled on qemu-storage-daemon's usage. */
export function usageText(): string {
  return `Usage: ${PROG} [options]
A storage daemon compatible with qemu-storage-daemon 7.2: QMP monitor, block node graph, NBD exports

  -h, --help             print this help and exit
  -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]
                         accepted for compatibility and ignored (no trace
                         events); '-T help' lists none and exits
  -V, --version          print version information and exit

  --blockdev [driver=]<driver>[,node-name=<N>][,discard=ignore|unmap]
             [,cache.direct=on|off][,cache.no-flush=on|off]
             [,read-only=on|off][,auto-read-only=on|off]
             [,force-share=on|off][,detect-zeroes=on|off|unmap]
             [,driver specific parameters...]
                         add a block node (like the QMP command blockdev-add)

  --chardev socket,id=<id>,path=<path>|host=<host>,port=<port>|fd=<fd>
            [,server=on|off][,wait=on|off][,websocket=on|off]
            [,multi-client=on|off]
                         add a socket character device for a monitor
  --chardev stdio|null,id=<id>  --chardev ringbuf|memory,id=<id>[,size=<n>]
  --chardev file,id=<id>,path=<path>[,append=on|off]  --chardev pipe,id=<id>,path=<path>
                         the other backends ('--chardev help' lists them)

  --daemonize            run in the background; the parent exits once
                         startup has finished (0) or failed (1)

  --export [type=]nbd,id=<id>,node-name=<node-name>[,name=<export-name>]
           [,writable=on|off][,description=<text>][,bitmaps.0=<name>]
           [,allocation-depth=on|off]
                         export a block node over NBD (needs --nbd-server
                         before it; like the QMP command block-export-add)

  --monitor [chardev=]<id>[,mode=control][,pretty=on|off]
                         run a QMP monitor on a chardev defined earlier

  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>
               [,max-connections=<n>][,handshake-max-seconds=<n>]
  --nbd-server addr.type=unix,addr.path=<path>[,max-connections=<n>]
  --nbd-server addr.type=fd,addr.str=<fd>
                         start the NBD server (like nbd-server-start)

  --object help          list the object types this build can create
  --object <type>,<property>=<value>[,...]
                         create an object (like object-add)

  --pidfile <path>       write the process ID to <path> once startup has
                         finished (its existence means "ready")

Every option that takes keyval text also accepts a JSON object ('{...}').
Options run from left to right; anything an option refers to must come earlier.

blockd extensions:
  --config <file.json>   run the QMP commands in <file.json>, a JSON array of
                         {"execute": <name>, "arguments": {...}}, at this point
  --log-level <level>    fatal, error, warn (default), info, debug, trace or silent;
                         logs are NDJSON on stderr
  --log-pretty           human-readable logs (pino-pretty)
  --demo                 start a demonstration daemon with nothing to prepare:
                         a QMP socket and a 1 GiB scratch image exported over NBD;
                         prints the addresses and example client commands
`;
}

/** `--version` text (stdout, exit 0). */
export function versionText(): string {
  return `${PROG} version ${BLOCKD_VERSION} (compatible with qemu-storage-daemon 7.2)
Copyright (c) 2024-2025 the blockd developers
`;
}

/** Where startup text goes: our stderr, or the --daemonize parent while it waits. */
class StderrOut {
  constructor(private readonly channel: DaemonChannel | undefined) {}

  write(text: string): void {
    if (this.channel !== undefined) {
      this.channel.stderr(text);
      return;
    }
    try {
      writeSync(2, text);
    } catch {
      // stderr closed: nothing to do
    }
  }

  /** A pino destination following the same route (daemon: dropped once ready). */
  destination(): { write(s: string): void } {
    return { write: (s: string) => this.write(s) };
  }
}

function writeStdout(text: string): void {
  let off = 0;
  const buf = Buffer.from(text);
  while (off < buf.length) {
    try {
      off += writeSync(1, buf, off);
    } catch (err) {
      if ((err as { code?: string }).code === 'EAGAIN') continue;
      return;
    }
  }
}

function buildLogger(p: Pass1, out: StderrOut, daemon: boolean): Logger {
  const level = (p.logLevel ?? 'warn') as LevelWithSilent;
  if (daemon) {
    // After startup a daemon has no stderr; before that, logs travel with the other startup output.
    return pino({ level, base: { pid: process.pid } }, out.destination());
  }
  return createLogger({ level, pretty: p.logPretty });
}

/**
 * Run blockd with these arguments (without node and script). Resolves when the daemon is
 * up; the process exits by itself on errors, signals or `quit`.
 */
export async function run(args: readonly string[], script: string = process.argv[1] ?? ''): Promise<void> {
  const channel = DaemonChannel.fromEnv();
  const out = new StderrOut(channel);
  const die = (message: string): never => {
    out.write(`${PROG}: ${message}\n`);
    channel?.failed();
    process.exit(1);
  };

  // ---- pass 1: getopt errors, -h, -V, --daemonize, --pidfile -----------------------------
  let p: Pass1;
  try {
    p = pass1(args);
  } catch (err) {
    return die(err instanceof Error ? err.message : String(err));
  }
  if (p.early === 'help') {
    writeStdout(usageText());
    process.exit(0);
  }
  if (p.early === 'version') {
    writeStdout(versionText());
    process.exit(0);
  }
  if (p.daemonize && channel === undefined) {
    const code = await spawnDaemon(script, args, (t) => {
      try {
        writeSync(2, t);
      } catch {
        // ignore
      }
    });
    process.exit(code);
  }
  if (channel !== undefined) {
    process.umask(0o027);
    for (const sig of ['SIGTSTP', 'SIGTTOU', 'SIGTTIN'] as const) process.on(sig, () => undefined);
  }

  // ---- composition ----------------------------------------------------------------------
  const log = buildLogger(p, out, channel !== undefined);
  process.on('unhandledRejection', (reason) => {
    log.fatal({ err: reason }, 'unhandled promise rejection');
    process.exit(1);
  });
  process.on('uncaughtException', (err) => {
    log.fatal({ err }, 'uncaught exception');
    process.exit(1);
  });
  process.on('SIGPIPE', () => undefined);

  let schema: SchemaRegistry;
  try {
    schema = SchemaRegistry.load();
  } catch (err) {
    return die(`cannot load the QMP schema: ${(err as Error).message}`);
  }
  const services = new Services(log);
  const dispatcher = new Dispatcher(services, ALL_COMMANDS, schema);
  const monitors = new MonitorManager(services, dispatcher, log);
  monitors.daemonized = channel !== undefined;
  services.qomChardevs = () => monitors.qomChardevs();
  let pidfile: PidFile | undefined;
  let demo: Demo | undefined;
  // Keep the process alive like QSD's main loop, even with no listener at all.
  const keepAlive = setInterval(() => undefined, 1 << 30);

  let stopping: Promise<void> | undefined;
  const shutdown = (why: string): Promise<void> => {
    stopping ??= (async () => {
      log.info({ why }, 'shutting down');
      try {
        await services.shutdown();
        await monitors.close();
        await demo?.close();
      } catch (err) {
        log.error({ err }, 'error during shutdown');
      }
      pidfile?.remove();
      clearInterval(keepAlive);
      process.exit(0);
    })();
    return stopping;
  };
  services.onQuit = () => shutdown('quit');
  for (const sig of ['SIGTERM', 'SIGINT', 'SIGHUP'] as const) {
    process.on(sig, () => {
      void shutdown(sig);
    });
  }

  // ---- pass 2: left to right, first failure exits 1 with no rollback ---------------------
  // Nothing is answered before the whole command line is set up (QSD runs its main loop only
  // then): monitor clients get no greeting and NBD clients no handshake until 'ready' below.
  // A failed start-up leaves none of the sockets it created behind.
  monitors.hold();
  services.exports.holdClients();
  process.on('exit', () => {
    if (stopping !== undefined) return;
    monitors.unlinkSocketFiles();
    services.exports.unlinkSocketFile();
  });
  const ctx: Pass2Context = {
    dispatcher,
    schema,
    monitors,
    warn: (display, msg) => out.write(`${PROG}: ${display}: warning: ${msg}\n`),
    info: (display, msg) => out.write(`${PROG}: ${display}: info: ${msg}\n`),
    stdout: writeStdout,
  };
  for (const item of p.items) {
    const display = item.kind === 'argument' ? item.value : item.display;
    try {
      const r = await runPass2Item(ctx, item);
      if (r.exit !== undefined) {
        channel?.failed();
        process.exit(r.exit);
      }
    } catch (err) {
      return die(`${display}: ${err instanceof Error ? err.message : String(err)}`);
    }
  }

  if (p.demo) {
    try {
      demo = await startDemo({ dispatcher, monitors, log, stdout: writeStdout });
    } catch (err) {
      return die(`--demo: ${err instanceof Error ? err.message : String(err)}`);
    }
  }

  // ---- ready: pidfile, release the --daemonize parent, main loop -------------------------
  if (p.pidfile !== undefined) {
    try {
      pidfile = PidFile.write(p.pidfile);
    } catch (err) {
      if (err instanceof CliError) return die(err.message);
      return die(`cannot create PID file: ${(err as Error).message}`);
    }
  }
  if (channel !== undefined) {
    // Relative paths in later commands resolve from '/', as with QSD (before the parent
    // is released, so "parent exited" implies the daemon's final state).
    process.chdir('/');
    channel.ready();
  }
  services.exports.releaseClients();
  monitors.release();
  log.info('blockd ready');
}
