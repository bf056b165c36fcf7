import { describe, it, expect, afterEach } from 'vitest';
import {
  existsSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { PidFile } from '../../../src/cli/pidfile.js';

const dirs: string[] = [];
const temp = (): string => {
  const d = mkdtempSync(join(tmpdir(), 'blockd-pid-'));
  dirs.push(d);
  return d;
};
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

describe('PidFile', () => {
  it('writes the PID and a newline with mode 0600', () => {
    const p = join(temp(), 'pid');
    PidFile.write(p, 12345);
    expect(readFileSync(p, 'utf8')).toBe('12345\n');
    expect(statSync(p).mode & 0o777).toBe(0o600);
  });
  it('leaves only the pidfile in its directory, whether it was written or refused', () => {
    const d = temp();
    const p = join(d, 'pid');
    PidFile.write(p, 12345);
    expect(readdirSync(d)).toEqual(['pid']);
    writeFileSync(p, `${process.pid}\n`);
    expect(() => PidFile.write(p, 1234567)).toThrow('Cannot lock pid file');
    expect(readdirSync(d)).toEqual(['pid']);
  });
  it('does not write through a symbolic link planted at its private name', () => {
    const d = temp();
    const victim = join(d, 'victim');
    writeFileSync(victim, 'keep');
    symlinkSync(victim, join(d, 'pid.777.tmp'));
    PidFile.write(join(d, 'pid'), 777);
    expect(readFileSync(victim, 'utf8')).toBe('keep');
    expect(readFileSync(join(d, 'pid'), 'utf8')).toBe('777\n');
  });
  it('refuses a file held by a live process with the QSD lock message', () => {
    const p = join(temp(), 'pid');
    writeFileSync(p, `${process.pid}\n`);
    expect(() => PidFile.write(p, 1234567)).toThrow(
      'cannot create PID file: Cannot lock pid file: Resource temporarily unavailable',
    );
  });
  it('replaces a file naming a dead process', () => {
    const p = join(temp(), 'pid');
    writeFileSync(p, '99999999\n');
    PidFile.write(p, 42);
    expect(readFileSync(p, 'utf8')).toBe('42\n');
  });
  it('replaces a file with garbage contents', () => {
    const p = join(temp(), 'pid');
    writeFileSync(p, 'not a pid');
    PidFile.write(p, 42);
    expect(readFileSync(p, 'utf8')).toBe('42\n');
  });
  it('removes the file at exit only while it still names us', () => {
    const p = join(temp(), 'pid');
    const f = PidFile.write(p, 42);
    writeFileSync(p, '43\n');
    f.remove();
    expect(existsSync(p)).toBe(true);
  });
  it('resolves a relative path to absolute when written', () => {
    const d = temp();
    const cwd = process.cwd();
    process.chdir(d);
    try {
      expect(PidFile.write('rel.pid', 42).path).toBe(join(d, 'rel.pid'));
    } finally {
      process.chdir(cwd);
    }
  });
});
