/**
 * The JSON form of an option argument (`--blockdev '{"driver": ...}'`): QEMU's JSON
 * dialect, which also accepts single-quoted strings (and `\'` in them), with its error
 * texts (`JSON parse error, premature EOI`, `... expecting value`, `Expecting at most one
 * JSON value`, ...). Written from the behaviour observed with qemu-storage-daemon 7.2.
 */
import { CliError } from '../util/errors.js';

const MAX_DEPTH = 1024;

type Tok =
  | { kind: 'punct'; text: '{' | '}' | '[' | ']' | ',' | ':' }
  | { kind: 'string'; value: string }
  | { kind: 'number'; value: number }
  | { kind: 'keyword'; text: string }
  | { kind: 'eoi' };

const parseError = (msg: string): never => {
  throw new CliError(`JSON parse error, ${msg}`, 'JSON');
};

class Lexer {
  pos = 0;
  constructor(private readonly s: string) {}

  private stray(start: number, end: number): never {
    return parseError(`stray '${this.s.slice(start, Math.min(end, this.s.length))}'`);
  }

  next(): Tok {
    const s = this.s;
    while (this.pos < s.length && ' \t\n\r'.includes(s[this.pos] as string)) this.pos++;
    if (this.pos >= s.length) return { kind: 'eoi' };
    const start = this.pos;
    const c = s[start] as string;
    if ('{}[],:'.includes(c)) {
      this.pos++;
      return { kind: 'punct', text: c as '{' };
    }
    if (c === '"' || c === "'") return this.string(c);
    if (c === '-' || (c >= '0' && c <= '9')) return this.number(start);
    if (/[A-Za-z]/.test(c)) {
      let e = start;
      while (e < s.length && /[A-Za-z]/.test(s[e] as string)) e++;
      this.pos = e;
      return { kind: 'keyword', text: s.slice(start, e) };
    }
    return this.stray(start, start + 1);
  }

  /**
   * A number, by the JSON grammar's states. A character no state accepts makes the text
   * so far plus that character "stray" (also a leading zero followed by a digit), as
   * QEMU's lexer reports it; a number simply ends at any other delimiter.
   */
  private number(start: number): Tok {
    const s = this.s;
    type St = 'start' | 'sign' | 'zero' | 'int' | 'dot' | 'frac' | 'e' | 'esign' | 'exp';
    const done: ReadonlySet<St> = new Set<St>(['zero', 'int', 'frac', 'exp']);
    let st = 'start' as St;
    let p = start;
    const digit = (ch: string | undefined): boolean => ch !== undefined && ch >= '0' && ch <= '9';
    for (;;) {
      const ch = s[p];
      let next: St | 'end' | 'error';
      switch (st) {
        case 'start':
          next = ch === '-' ? 'sign' : ch === '0' ? 'zero' : 'int';
          break;
        case 'sign':
          next = ch === '0' ? 'zero' : digit(ch) ? 'int' : 'error';
          break;
        case 'zero':
          next = ch === '.' ? 'dot' : ch === 'e' || ch === 'E' ? 'e' : digit(ch) ? 'error' : 'end';
          break;
        case 'int':
          next = digit(ch) ? 'int' : ch === '.' ? 'dot' : ch === 'e' || ch === 'E' ? 'e' : 'end';
          break;
        case 'dot':
          next = digit(ch) ? 'frac' : 'error';
          break;
        case 'frac':
          next = digit(ch) ? 'frac' : ch === 'e' || ch === 'E' ? 'e' : 'end';
          break;
        case 'e':
          next = ch === '+' || ch === '-' ? 'esign' : digit(ch) ? 'exp' : 'error';
          break;
        case 'esign':
          next = digit(ch) ? 'exp' : 'error';
          break;
        case 'exp':
          next = digit(ch) ? 'exp' : 'end';
          break;
      }
      if (next === 'end' && done.has(st)) {
        this.pos = p;
        return { kind: 'number', value: Number(s.slice(start, p)) };
      }
      if (next === 'error' || next === 'end' || ch === undefined) return this.stray(start, p + 1);
      st = next;
      p++;
    }
  }

  private string(quote: string): Tok {
    const s = this.s;
    const start = this.pos;
    let p = start + 1;
    let out = '';
    for (;;) {
      if (p >= s.length) return this.stray(start, s.length);
      const c = s[p] as string;
      if (c === quote) {
        this.pos = p + 1;
        return { kind: 'string', value: out };
      }
      if (c !== '\\') {
        out += c;
        p++;
        continue;
      }
      const e = s[p + 1];
      if (e === undefined) return this.stray(start, s.length);
      const simple: Record<string, string> = {
        '"': '"',
        "'": "'",
        '\\': '\\',
        '/': '/',
        b: '\b',
        f: '\f',
        n: '\n',
        r: '\r',
        t: '\t',
      };
      const mapped = simple[e];
      if (mapped !== undefined) {
        out += mapped;
        p += 2;
        continue;
      }
      if (e === 'u') {
        const hex = s.slice(p + 2, p + 6);
        if (!/^[0-9a-fA-F]{4}$/.test(hex)) {
          return parseError(`\\u${s.slice(p + 2, p + 5)} is not a valid Unicode character`);
        }
        let cp = Number.parseInt(hex, 16);
        let used = 6;
        if (cp >= 0xd800 && cp <= 0xdbff) {
          const low = /^\\u([dD][c-fC-F][0-9a-fA-F]{2})/.exec(s.slice(p + 6));
          if (low === null) return parseError(`\\u${hex} is not a valid Unicode character`);
          cp = 0x10000 + ((cp - 0xd800) << 10) + (Number.parseInt(low[1] ?? '0', 16) - 0xdc00);
          used = 12;
        } else if ((cp >= 0xdc00 && cp <= 0xdfff) || cp === 0) {
          return parseError(`\\u${hex} is not a valid Unicode character`);
        }
        out += String.fromCodePoint(cp);
        p += used;
        continue;
      }
      return parseError('invalid escape sequence in string');
    }
  }
}

class Parser {
  private tok: Tok;
  constructor(private readonly lex: Lexer) {
    this.tok = lex.next();
  }

  private advance(): Tok {
    const t = this.tok;
    this.tok = this.lex.next();
    return t;
  }

  value(depth: number): unknown {
    if (depth > MAX_DEPTH) parseError('nesting too deep');
    const t = this.advance();
    switch (t.kind) {
      case 'eoi':
        return parseError('premature EOI');
      case 'string':
      case 'number':
        return t.value;
      case 'keyword':
        if (t.text === 'true') return true;
        if (t.text === 'false') return false;
        if (t.text === 'null') return null;
        return parseError(`invalid keyword '${t.text}'`);
      case 'punct':
        if (t.text === '{') return this.object(depth);
        if (t.text === '[') return this.array(depth);
        return parseError('expecting value');
    }
  }

  private object(depth: number): Record<string, unknown> {
    const out: Record<string, unknown> = {};
    if (this.tok.kind === 'punct' && this.tok.text === '}') {
      this.advance();
      return out;
    }
    for (;;) {
      const k = this.advance();
      if (k.kind === 'eoi') parseError('premature EOI');
      if (k.kind === 'keyword') parseError(`invalid keyword '${k.text}'`);
      if (k.kind === 'punct') parseError('expecting value');
      if (k.kind !== 'string') parseError('key is not a string in object');
      const key = (k as { value: string }).value;
      const colon = this.advance();
      if (colon.kind === 'eoi') parseError('premature EOI');
      if (!(colon.kind === 'punct' && colon.text === ':')) parseError('missing : in object pair');
      const v = this.value(depth + 1);
      if (Object.hasOwn(out, key)) parseError('duplicate key');
      Object.defineProperty(out, key, { value: v, enumerable: true, writable: true, configurable: true });
      const sep = this.advance();
      if (sep.kind === 'eoi') parseError('premature EOI');
      if (sep.kind === 'punct' && sep.text === '}') return out;
      if (!(sep.kind === 'punct' && sep.text === ',')) parseError('expected separator in dict');
    }
  }

  private array(depth: number): unknown[] {
    const out: unknown[] = [];
    if (this.tok.kind === 'punct' && this.tok.text === ']') {
      this.advance();
      return out;
    }
    for (;;) {
      out.push(this.value(depth + 1));
      const sep = this.advance();
      if (sep.kind === 'eoi') parseError('premature EOI');
      if (sep.kind === 'punct' && sep.text === ']') return out;
      if (!(sep.kind === 'punct' && sep.text === ',')) parseError('expected separator in list');
    }
  }

  atEnd(): boolean {
    return this.tok.kind === 'eoi';
  }
}

/**
 * Parse an option argument written in JSON (it starts with `{`). Returns the object;
 * throws `CliError` with QEMU's message.
 */
export function parseJsonArgument(text: string): Record<string, unknown> {
  const p = new Parser(new Lexer(text));
  const v = p.value(0);
  if (!p.atEnd()) throw new CliError('Expecting at most one JSON value', 'JSON');
  if (typeof v !== 'object' || v === null || Array.isArray(v)) {
    throw new CliError('Invalid JSON object given', 'JSON');
  }
  return v as Record<string, unknown>;
}
