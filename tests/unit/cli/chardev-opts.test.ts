import { describe, it, expect } from 'vitest';
import { parseChardev } from '../../../src/cli/chardev-opts.js';

const parse = (s: string): { result: unknown; warnings: string[] } => {
  const warnings: string[] = [];
  return { result: parseChardev(s, (m) => warnings.push(m)), warnings };
};
const err = (s: string): string => {
  try {
    parseChardev(s, () => {});
  } catch (e) {
    return (e as Error).message;
  }
  return 'no error';
};

describe('--chardev QemuOpts', () => {
  it('parses the usual unix server form', () =>
    expect(parse('socket,id=m,path=/tmp/q.sock,server=on,wait=off').result).toEqual({
      kind: 'chardev',
      spec: {
        id: 'm', backend: 'socket', addr: { type: 'unix', path: '/tmp/q.sock' },
        server: true, wait: false, websocket: false, multiClient: false, nodelay: false,
      },
    }));
  it('accepts backend= explicitly', () =>
    expect(parse('backend=socket,id=m,path=/p,server=on,wait=off').result).toMatchObject({ kind: 'chardev', spec: { backend: 'socket' } }));
  it('defaults to a client without wait', () =>
    expect(parse('socket,id=m,path=/p').result).toMatchObject({ spec: { server: false, wait: false } }));
  it('defaults wait to on for a server', () =>
    expect(parse('socket,id=m,path=/p,server=on').result).toMatchObject({ spec: { server: true, wait: true } }));
  it('parses a TCP address', () =>
    expect(parse('socket,id=m,host=127.0.0.1,port=0,server=on,wait=off').result).toMatchObject({
      spec: { addr: { type: 'inet', host: '127.0.0.1', port: '0' } },
    }));
  it('parses an inherited fd', () =>
    expect(parse('socket,id=m,fd=3,server=on,wait=off').result).toMatchObject({ spec: { addr: { type: 'fd', str: '3' } } }));
  it('parses websocket and multi-client', () =>
    expect(parse('socket,id=m,path=/p,server=on,wait=off,websocket=on,multi-client=on').result).toMatchObject({
      spec: { websocket: true, multiClient: true },
    }));
  it('undoes the ,, escape in a path', () =>
    expect(parse('socket,id=m,path=/a,,b,server=on,wait=off').result).toMatchObject({ spec: { addr: { path: '/a,b' } } }));
  it('accepts short-form booleans with QEMU deprecation warnings', () => {
    const r = parse('socket,id=m,path=/p,server,nowait');
    expect(r.result).toMatchObject({ spec: { server: true, wait: false } });
    expect(r.warnings).toEqual([
      "short-form boolean option 'server' deprecated\nPlease use server=on instead",
      "short-form boolean option 'nowait' deprecated\nPlease use wait=off instead",
    ]);
  });
  it('answers help for a bare help', () => expect(parse('help').result).toEqual({ kind: 'help' }));
  it('answers help for TYPE,help', () => expect(parse('socket,help').result).toEqual({ kind: 'help', backend: 'socket' }));
  it('requires an id', () => expect(err('socket')).toBe('chardev: no id specified'));
  it('requires a backend', () => expect(err('id=m')).toBe('chardev: "m" missing backend'));
  it('refuses an unknown backend', () => expect(err('bogus,id=m')).toBe("'bogus' is not a valid char driver name"));
  it('refuses an escaped comma in the backend', () =>
    expect(err('socket,,id=m,path=/p')).toBe("'socket,id=m' is not a valid char driver name"));
  it('refuses a QSD backend blockd does not have as QSD refuses one not built in', () =>
    expect(err('pty,id=m')).toBe("'pty' is not a valid char driver name"));
  it('parses stdio and null', () => {
    expect(parse('stdio,id=s,signal=off').result).toEqual({ kind: 'chardev', spec: { id: 's', backend: 'stdio' } });
    expect(parse('null,id=n').result).toEqual({ kind: 'chardev', spec: { id: 'n', backend: 'null' } });
  });
  it('gives a ringbuf the default size of 64 KiB', () =>
    expect(parse('ringbuf,id=r').result).toEqual({ kind: 'chardev', spec: { id: 'r', backend: 'ringbuf', size: 65536 } }));
  it('reads a ringbuf size with a suffix', () =>
    expect(parse('memory,id=r,size=1M').result).toMatchObject({ spec: { backend: 'memory', size: 1048576 } }));
  it('refuses a ringbuf size that is not a power of two', () =>
    expect(err('ringbuf,id=r,size=1000')).toBe('size of ringbuf chardev must be power of two'));
  it('wraps a ringbuf size at 2^32 like QEMU (4G is the default, 2G is negative)', () => {
    expect(parse('ringbuf,id=r,size=4G').result).toMatchObject({ spec: { size: 65536 } });
    expect(err('ringbuf,id=r,size=2G')).toBe('size of ringbuf chardev must be power of two');
  });
  it('parses a file chardev', () =>
    expect(parse('file,id=f,path=/tmp/x,append=on').result).toEqual({
      kind: 'chardev',
      spec: { id: 'f', backend: 'file', out: '/tmp/x', append: true },
    }));
  it('requires a file path', () => expect(err('file,id=f')).toBe('chardev: file: no filename given'));
  it('parses a pipe chardev', () =>
    expect(parse('pipe,id=p,path=/tmp/p').result).toEqual({ kind: 'chardev', spec: { id: 'p', backend: 'pipe', device: '/tmp/p' } }));
  it('requires a pipe path', () => expect(err('pipe,id=p')).toBe('chardev: pipe: no device path given'));
  it('refuses mux=on', () => expect(err('null,id=n,mux=on')).toBe("chardev option 'mux' is not supported by blockd"));
  it('refuses an unknown key', () => expect(err('socket,id=m,path=/p,bogus=1')).toBe("Invalid parameter 'bogus'"));
  it('refuses an empty key', () => expect(err('socket,id=m,path=/p,=x')).toBe("Invalid parameter ''"));
  it('refuses a bad boolean', () =>
    expect(err('socket,id=m,path=/p,server=maybe')).toBe("Parameter 'server' expects 'on' or 'off'"));
  it('refuses a malformed id', () =>
    expect(err('socket,id=1m,path=/p')).toBe(
      "Parameter 'id' expects an identifier\nIdentifiers consist of letters, digits, '-', '.', '_', starting with a letter.",
    ));
  it('refuses path together with host', () =>
    expect(err('socket,id=m,path=/p,host=x')).toBe("None or one of 'path', 'fd' or 'host' option required."));
  it('refuses a host without port', () => expect(err('socket,id=m,host=127.0.0.1')).toBe('chardev: socket: no port given'));
  it('refuses a socket without address like QEMU', () => expect(err('socket,id=m')).toBe('Unable to parse FD number '));
  it('refuses a non-numeric fd', () => expect(err('socket,id=m,fd=abc')).toBe('Unable to parse FD number abc'));
  it('refuses wait for a client', () =>
    expect(err('socket,id=m,path=/p,wait=off')).toBe("'wait' option is incompatible with socket in client connect mode"));
  it('refuses reconnect for a server', () =>
    expect(err('socket,id=m,path=/p,server=on,reconnect=1')).toBe(
      "'reconnect' option is incompatible with socket in server listen mode",
    ));
  it('refuses a websocket client', () =>
    expect(err('socket,id=m,path=/p,websocket=on')).toBe('Websocket client is not implemented'));
  it('refuses TLS credentials that cannot exist', () =>
    expect(err('socket,id=m,path=/p,server=on,wait=off,tls-creds=x')).toBe("No TLS credentials with id 'x'"));
});
