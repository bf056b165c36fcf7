import { describe, it, expect } from 'vitest';
import { scanArgv, pass1 } from '../../../src/cli/argv.js';

const err = (args: string[]): string => {
  try {
    pass1(args);
  } catch (e) {
    return (e as Error).message;
  }
  return 'no error';
};

describe('getopt_long emulation', () => {
  it('reads --opt VALUE', () =>
    expect(scanArgv(['--blockdev', 'x'])).toEqual([
      { kind: 'option', name: 'blockdev', value: 'x', display: '--blockdev x' },
    ]));
  it('reads --opt=VALUE and keeps the typed word for messages', () =>
    expect(scanArgv(['--blockdev=x'])).toEqual([
      { kind: 'option', name: 'blockdev', value: 'x', display: '--blockdev=x' },
    ]));
  it('accepts a unique prefix', () =>
    expect(scanArgv(['--block', 'x'])).toEqual([
      { kind: 'option', name: 'blockdev', value: 'x', display: '--block x' },
    ]));
  it('accepts an empty value after =', () =>
    expect(scanArgv(['--blockdev='])[0]).toMatchObject({ name: 'blockdev', value: '' }));
  it('returns non-option arguments in place', () =>
    expect(scanArgv(['extra'])).toEqual([{ kind: 'argument', value: 'extra' }]));
  it('treats a lone dash as an argument', () => expect(scanArgv(['-'])).toEqual([{ kind: 'argument', value: '-' }]));
  it('stops at -- and ignores what follows', () => expect(scanArgv(['--', 'extra'])).toEqual([]));
  it('reads -T with an attached argument', () =>
    expect(scanArgv(['-Tfoo'])).toEqual([{ kind: 'option', name: 'trace', value: 'foo', display: '-Tfoo' }]));
  it('reads -T with a separate argument', () =>
    expect(scanArgv(['-T', 'foo'])[0]).toMatchObject({ name: 'trace', value: 'foo' }));
  it('refuses an unknown long option', () => expect(err(['--bogus'])).toBe("unrecognized option '--bogus'"));
  it('quotes the whole word of an unknown option with =', () =>
    expect(err(['--bogus=x'])).toBe("unrecognized option '--bogus=x'"));
  it('refuses an unknown short option', () => expect(err(['-x'])).toBe("invalid option -- 'x'"));
  it('refuses a missing long argument', () =>
    expect(err(['--blockdev'])).toBe("option '--blockdev' requires an argument"));
  it('names the full option when a prefix lacks its argument', () =>
    expect(err(['--b'])).toBe("option '--blockdev' requires an argument"));
  it('refuses a missing short argument', () => expect(err(['-T'])).toBe("option requires an argument -- 'T'"));
  it('refuses an argument for a flag', () =>
    expect(err(['--help=x'])).toBe("option '--help' doesn't allow an argument"));
  it('refuses an ambiguous prefix listing the candidates', () =>
    expect(err(['--d'])).toBe("option '--d' is ambiguous; possibilities: '--daemonize' '--demo'"));
});

describe('pass 1', () => {
  it('finds --help even after a bad option argument', () =>
    expect(pass1(['--blockdev', 'bad', '--help']).early).toBe('help'));
  it('lets the first of -h and -V win in a cluster', () => expect(pass1(['-Vh']).early).toBe('version'));
  it('prints help before a later getopt error', () => expect(pass1(['-h', '--bogus']).early).toBe('help'));
  it('reports a getopt error before a later --help', () =>
    expect(err(['--bogus', '--help'])).toBe("unrecognized option '--bogus'"));
  it('records --pidfile wherever it appears', () =>
    expect(pass1(['--blockdev', 'x', '--pidfile', '/p']).pidfile).toBe('/p'));
  it('records --daemonize given twice', () => expect(pass1(['--daemonize', '--daemonize']).daemonize).toBe(true));
  it('records the log options', () =>
    expect(pass1(['--log-level', 'debug', '--log-pretty'])).toMatchObject({ logLevel: 'debug', logPretty: true }));
  it('refuses an unknown log level', () =>
    expect(err(['--log-level', 'loud'])).toBe(
      "--log-level loud: Parameter 'log-level' expects one of fatal, error, warn, info, debug, trace, silent",
    ));
});
