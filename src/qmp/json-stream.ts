/**
 * QMP's streaming JSON reader and writer, compatible with QEMU's json-lexer/json-streamer
 * behaviour (observed on qemu-storage-daemon 7.2):
 *
 * - Input is a byte stream; newlines are not delimiters. A message is one top-level value.
 *   Tokens are grouped like QEMU's streamer: a message ends when the `{}` and `[]` counters
 *   are both back to zero, or as soon as either goes negative (so `{"a":1]}` gives two
 *   errors, as in QEMU).
 * - Single-quoted strings and the `\'` escape are accepted.
 * - After a lexical error the lexer skips input until a structural character (`{}[]:,`), a control
 *   character other than TAB, or a 0xFE/0xFF byte, and starts again from there.
 * - Limits: 64 MiB of token bytes per message (and per token), 2 Mi tokens per message,
 *   nesting depth 1024. The lexer never holds more than one token, so a huge unterminated
 *   input costs bounded memory.
 *
 * Values: integers within ±2^53 are numbers, other integers within int64/uint64 are
 * bigints (echoed exactly), everything else is a double.
 */

export type JsonValue =
  | null
  | boolean
  | number
  | bigint
  | string
  | JsonValue[]
  | { [key: string]: JsonValue };

/** One result of the stream: a parsed value, or an error `desc` (QEMU wording). */
export type JsonStreamResult = { ok: true; value: JsonValue } | { ok: false; error: string };

export const MAX_TOKEN_SIZE = 64 * 1024 * 1024;
export const MAX_TOKEN_COUNT = 2 * 1024 * 1024;
export const MAX_NESTING = 1024;

type TokKind = 'lbrace' | 'rbrace' | 'lbracket' | 'rbracket' | 'comma' | 'colon' | 'string' | 'int' | 'float' | 'keyword';

type LexState =
  | 'start'
  | 'recovery'
  | 'string'
  | 'string-escape'
  | 'minus'
  | 'zero'
  | 'int'
  | 'dot'
  | 'frac'
  | 'exp'
  | 'exp-sign'
  | 'exp-digits'
  | 'keyword';

// Parser frames: what the innermost open container expects next.
type Frame =
  | { kind: 'array'; value: JsonValue[]; state: 'open' | 'value' | 'comma' }
  | {
      kind: 'object';
      value: { [key: string]: JsonValue };
      state: 'open' | 'key' | 'colon' | 'value' | 'comma';
      key: string;
      /** A non-string key is being parsed as a value (QEMU parses keys as values). */
      keyDepth: number;
    };

class ParseError extends Error {}

const isDigit = (c: number): boolean => c >= 0x30 && c <= 0x39;
const isLower = (c: number): boolean => c >= 0x61 && c <= 0x7a;

/**
 * Push parser: `push(chunk)` returns every message completed by that chunk.
 * `end()` flushes a pending message at end of input (for command-line strings).
 */
export class JsonStreamParser {
  // Lexer.
  private lex: LexState = 'start';
  private quote = 0x22;
  private tok: Buffer[] = [];
  private tokLen = 0;
  // Streamer.
  private braces = 0;
  private brackets = 0;
  private count = 0;
  private size = 0;
  // Parser.
  private stack: Frame[] = [];
  private error: string | undefined;
  private done = false;
  private result: JsonValue = null;
  private out: JsonStreamResult[] = [];

  /** Feed bytes; returns the messages (values or errors) they completed, in order. */
  push(chunk: Buffer | string): JsonStreamResult[] {
    const buf = typeof chunk === 'string' ? Buffer.from(chunk, 'utf8') : chunk;
    let tokStart = this.lex === 'start' || this.lex === 'recovery' ? -1 : 0;
    let i = 0;
    while (i < buf.length) {
      const c = buf[i] as number;
      switch (this.lex) {
        case 'recovery':
          if (structural(c) !== undefined || (c < 0x20 && c !== 0x09) || c >= 0xfe) {
            this.lex = 'start';
            continue; // look at this byte again
          }
          i++;
          continue;
        case 'start': {
          if (c === 0x20 || c === 0x09 || c === 0x0a || c === 0x0d) {
            i++;
            continue;
          }
          tokStart = i;
          const single = structural(c);
          if (single !== undefined) {
            i++;
            this.emit(single, buf.subarray(tokStart, i));
            tokStart = -1;
            continue;
          }
          if (c === 0x22 || c === 0x27) {
            this.quote = c;
            this.lex = 'string';
          } else if (c === 0x2d) this.lex = 'minus';
          else if (c === 0x30) this.lex = 'zero';
          else if (isDigit(c)) this.lex = 'int';
          else if (isLower(c)) this.lex = 'keyword';
          else {
            i++;
            this.lexError(buf.subarray(tokStart, i));
            tokStart = -1;
            continue;
          }
          i++;
          break;
        }
        case 'string': {
          // Fast scan over ordinary bytes.
          while (i < buf.length) {
            const d = buf[i] as number;
            if (d === this.quote || d === 0x5c || d < 0x20 || d >= 0xfe) break;
            i++;
          }
          if (i >= buf.length) break;
          const d = buf[i] as number;
          i++;
          if (d === this.quote) {
            this.finishToken('string', buf, tokStart, i);
            tokStart = -1;
          } else if (d === 0x5c) {
            this.lex = 'string-escape';
          } else {
            this.lexError(this.tokenBytes(buf, tokStart, i));
            tokStart = -1;
          }
          break;
        }
        case 'string-escape':
          i++;
          if (c < 0x20 || c >= 0xfe) {
            this.lexError(this.tokenBytes(buf, tokStart, i));
            tokStart = -1;
          } else this.lex = 'string';
          break;
        case 'minus':
          if (c === 0x30) {
            this.lex = 'zero';
            i++;
          } else if (isDigit(c)) {
            this.lex = 'int';
            i++;
          } else {
            i++;
            this.lexError(this.tokenBytes(buf, tokStart, i));
            tokStart = -1;
          }
          break;
        case 'zero':
        case 'int':
          if (isDigit(c) && this.lex === 'int') i++;
          else if (isDigit(c)) {
            i++;
            this.lexError(this.tokenBytes(buf, tokStart, i));
            tokStart = -1;
          } else if (c === 0x2e) {
            this.lex = 'dot';
            i++;
          } else if (c === 0x65 || c === 0x45) {
            this.lex = 'exp';
            i++;
          } else {
            this.finishToken('int', buf, tokStart, i);
            tokStart = -1;
          }
          break;
        case 'dot':
        case 'exp':
        case 'exp-sign':
          i++;
          if (isDigit(c)) this.lex = this.lex === 'dot' ? 'frac' : 'exp-digits';
          else if (this.lex === 'exp' && (c === 0x2b || c === 0x2d)) this.lex = 'exp-sign';
          else {
            this.lexError(this.tokenBytes(buf, tokStart, i));
            tokStart = -1;
          }
          break;
        case 'frac':
          if (isDigit(c)) i++;
          else if (c === 0x65 || c === 0x45) {
            this.lex = 'exp';
            i++;
          } else {
            this.finishToken('float', buf, tokStart, i);
            tokStart = -1;
          }
          break;
        case 'exp-digits':
          if (isDigit(c)) i++;
          else {
            this.finishToken('float', buf, tokStart, i);
            tokStart = -1;
          }
          break;
        case 'keyword':
          if (isLower(c)) i++;
          else {
            this.finishToken('keyword', buf, tokStart, i);
            tokStart = -1;
          }
          break;
      }
      // A single token may not grow without bound.
      if (tokStart >= 0 && this.tokLen + (i - tokStart) > MAX_TOKEN_SIZE) {
        this.tok = [];
        this.tokLen = 0;
        tokStart = -1;
        this.lex = 'start';
        this.fail('JSON token size limit exceeded');
      }
    }
    if (tokStart >= 0 && i > tokStart) {
      this.tok.push(buf.subarray(tokStart, i));
      this.tokLen += i - tokStart;
    }
    const out = this.out;
    this.out = [];
    return out;
  }

  /**
   * End of input: complete a pending number/keyword, then report an unfinished message
   * (`premature EOI`) or an unterminated token (`stray '...'`).
   */
  end(): JsonStreamResult[] {
    if (this.lex !== 'start' && this.lex !== 'recovery') {
      const bytes = Buffer.concat(this.tok);
      this.tok = [];
      this.tokLen = 0;
      const st = this.lex;
      this.lex = 'start';
      if (st === 'zero' || st === 'int') this.emit('int', bytes);
      else if (st === 'frac' || st === 'exp-digits') this.emit('float', bytes);
      else if (st === 'keyword') this.emit('keyword', bytes);
      else this.lexError(bytes);
    }
    this.lex = 'start';
    if (this.count > 0) {
      this.finish(this.error ?? 'JSON parse error, premature EOI');
    }
    const out = this.out;
    this.out = [];
    return out;
  }

  private tokenBytes(buf: Buffer, start: number, end: number): Buffer {
    const part = buf.subarray(Math.max(start, 0), end);
    if (this.tok.length === 0) return part;
    const all = Buffer.concat([...this.tok, part]);
    this.tok = [];
    this.tokLen = 0;
    return all;
  }

  private finishToken(kind: TokKind, buf: Buffer, start: number, end: number): void {
    const bytes = this.tokenBytes(buf, start, end);
    this.lex = 'start';
    this.emit(kind, bytes);
  }

  private lexError(bytes: Buffer): void {
    this.tok = [];
    this.tokLen = 0;
    this.lex = 'recovery';
    // QEMU prints the token as a C string: it stops at a NUL byte.
    const nul = bytes.indexOf(0);
    const text = (nul >= 0 ? bytes.subarray(0, nul) : bytes).toString('utf8');
    this.fail(`JSON parse error, stray '${text}'`);
  }

  /** Report an error for the current message and reset the streamer. */
  private fail(desc: string): void {
    this.out.push({ ok: false, error: desc });
    this.reset();
  }

  private reset(): void {
    this.braces = 0;
    this.brackets = 0;
    this.count = 0;
    this.size = 0;
    this.stack = [];
    this.error = undefined;
    this.done = false;
    this.result = null;
  }

  private finish(error?: string): void {
    if (error !== undefined) this.out.push({ ok: false, error });
    else this.out.push({ ok: true, value: this.result });
    this.reset();
  }

  // --- streamer ---------------------------------------------------------------------------

  private emit(kind: TokKind, bytes: Buffer): void {
    if (kind === 'lbrace') this.braces++;
    else if (kind === 'rbrace') this.braces--;
    else if (kind === 'lbracket') this.brackets++;
    else if (kind === 'rbracket') this.brackets--;
    if (this.size + bytes.length + 1 > MAX_TOKEN_SIZE) return this.fail('JSON token size limit exceeded');
    if (this.count + 1 > MAX_TOKEN_COUNT) return this.fail('JSON token count limit exceeded');
    if (this.braces + this.brackets > MAX_NESTING) return this.fail('JSON nesting depth limit exceeded');
    this.size += bytes.length;
    this.count++;
    if (this.error === undefined) {
      try {
        this.parseToken(kind, bytes);
      } catch (err) {
        if (!(err instanceof ParseError)) throw err;
        this.error = `JSON parse error, ${err.message}`;
      }
    }
    if ((this.braces > 0 || this.brackets > 0) && this.braces >= 0 && this.brackets >= 0) return;
    if (this.error === undefined && !this.done) this.error = 'JSON parse error, premature EOI';
    this.finish(this.error);
  }

  // --- parser (QEMU's grammar, fed one token at a time) -----------------------------------

  private parseToken(kind: TokKind, bytes: Buffer): void {
    if (this.done) throw new ParseError('expecting value');
    const top = this.stack[this.stack.length - 1];
    if (top !== undefined) {
      if (top.kind === 'array') {
        if (top.state === 'open' && kind === 'rbracket') return this.close();
        if (top.state === 'value') {
          if (kind === 'comma') {
            top.state = 'comma';
            return;
          }
          if (kind === 'rbracket') return this.close();
          throw new ParseError('expected separator in list');
        }
      } else {
        if (top.state === 'open' && kind === 'rbrace') return this.close();
        if (top.state === 'colon') {
          if (kind !== 'colon') throw new ParseError('missing : in object pair');
          top.state = 'value';
          return;
        }
        if (top.state === 'comma') {
          if (kind === 'comma') {
            top.state = 'key';
            return;
          }
          if (kind === 'rbrace') return this.close();
          throw new ParseError('expected separator in dict');
        }
      }
    }
    // A value is expected here.
    switch (kind) {
      case 'lbrace':
        this.stack.push({ kind: 'object', value: {}, state: 'open', key: '', keyDepth: 0 });
        return;
      case 'lbracket':
        this.stack.push({ kind: 'array', value: [], state: 'open' });
        return;
      case 'string':
        return this.value(decodeString(bytes));
      case 'int':
        return this.value(parseInteger(bytes.toString('latin1')));
      case 'float':
        return this.value(Number(bytes.toString('latin1')));
      case 'keyword': {
        const k = bytes.toString('latin1');
        if (k === 'true') return this.value(true);
        if (k === 'false') return this.value(false);
        if (k === 'null') return this.value(null);
        throw new ParseError(`invalid keyword '${k}'`);
      }
      default:
        throw new ParseError('expecting value');
    }
  }

  private close(): void {
    const f = this.stack.pop();
    if (f !== undefined) this.value(f.value);
  }

  /** A complete value: store it in the enclosing container (or finish the message). */
  private value(v: JsonValue): void {
    const top = this.stack[this.stack.length - 1];
    if (top === undefined) {
      this.result = v;
      this.done = true;
      return;
    }
    if (top.kind === 'array') {
      top.value.push(v);
      top.state = 'value';
      return;
    }
    if (top.state === 'open' || top.state === 'key') {
      if (typeof v !== 'string') throw new ParseError('key is not a string in object');
      top.key = v;
      top.state = 'colon';
      return;
    }
    // Own data property even for "__proto__".
    Object.defineProperty(top.value, top.key, { value: v, enumerable: true, writable: true, configurable: true });
    top.state = 'comma';
  }
}

function structural(c: number): TokKind | undefined {
  switch (c) {
    case 0x7b:
      return 'lbrace';
    case 0x7d:
      return 'rbrace';
    case 0x5b:
      return 'lbracket';
    case 0x5d:
      return 'rbracket';
    case 0x2c:
      return 'comma';
    case 0x3a:
      return 'colon';
    default:
      return undefined;
  }
}

const INT64_MIN = -(2n ** 63n);
const UINT64_MAX = 2n ** 64n - 1n;

function parseInteger(text: string): JsonValue {
  const big = BigInt(text);
  if (big >= INT64_MIN && big <= UINT64_MAX) {
    if (big >= BigInt(Number.MIN_SAFE_INTEGER) && big <= BigInt(Number.MAX_SAFE_INTEGER)) {
      return Number(big);
    }
    return big;
  }
  return Number(text);
}

function isNonCharacter(cp: number): boolean {
  return (cp >= 0xfdd0 && cp <= 0xfdef) || (cp & 0xfffe) === 0xfffe;
}

function hex4(s: string): number {
  return /^[0-9a-fA-F]{4}$/.test(s) ? parseInt(s, 16) : -1;
}

/** Decode a string token (quotes included) like QEMU's parser. */
function decodeString(bytes: Buffer): string {
  let out = '';
  const end = bytes.length - 1; // closing quote
  let i = 1;
  while (i < end) {
    const c = bytes[i] as number;
    if (c === 0x5c) {
      const e = bytes[i + 1] as number;
      i += 2;
      switch (e) {
        case 0x22:
          out += '"';
          break;
        case 0x27:
          out += "'";
          break;
        case 0x5c:
          out += '\\';
          break;
        case 0x2f:
          out += '/';
          break;
        case 0x62:
          out += '\b';
          break;
        case 0x66:
          out += '\f';
          break;
        case 0x6e:
          out += '\n';
          break;
        case 0x72:
          out += '\r';
          break;
        case 0x74:
          out += '\t';
          break;
        case 0x75: {
          const [cp, next] = unicodeEscape(bytes, i);
          out += String.fromCodePoint(cp);
          i = next;
          break;
        }
        default:
          throw new ParseError('invalid escape sequence in string');
      }
      continue;
    }
    if (c < 0x80) {
      out += String.fromCharCode(c);
      i++;
      continue;
    }
    const [cp, next] = utf8CodePoint(bytes, i, end);
    out += String.fromCodePoint(cp);
    i = next;
  }
  return out;
}

/** `\uXXXX` (and a surrogate pair) starting after the `u` at `i`. */
function unicodeEscape(bytes: Buffer, i: number): [number, number] {
  const text = (at: number): string =>
    bytes.subarray(at, Math.min(at + 4, bytes.length)).toString('latin1');
  const bad = (at: number): ParseError =>
    new ParseError(`\\u${text(at)} is not a valid Unicode character`);
  const cp = hex4(text(i));
  if (cp < 0) throw bad(i);
  if (cp >= 0xdc00 && cp <= 0xdfff) throw bad(i);
  if (cp >= 0xd800 && cp <= 0xdbff) {
    if (bytes[i + 4] !== 0x5c || bytes[i + 5] !== 0x75) throw bad(i);
    const lo = hex4(text(i + 6));
    if (lo < 0xdc00 || lo > 0xdfff) throw bad(i);
    const full = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
    if (isNonCharacter(full)) throw bad(i);
    return [full, i + 10];
  }
  if (isNonCharacter(cp)) throw bad(i);
  return [cp, i + 4];
}

/** Decode one UTF-8 sequence (the overlong C0 80 means NUL, as in QEMU). */
function utf8CodePoint(bytes: Buffer, i: number, end: number): [number, number] {
  const c = bytes[i] as number;
  const bad = new ParseError('invalid UTF-8 sequence in string');
  let n: number;
  let cp: number;
  let min: number;
  if (c >= 0xc0 && c <= 0xdf) {
    n = 1;
    cp = c & 0x1f;
    min = 0x80;
  } else if (c >= 0xe0 && c <= 0xef) {
    n = 2;
    cp = c & 0x0f;
    min = 0x800;
  } else if (c >= 0xf0 && c <= 0xf7) {
    n = 3;
    cp = c & 0x07;
    min = 0x10000;
  } else throw bad;
  if (i + n >= end + 1) throw bad;
  for (let k = 1; k <= n; k++) {
    const d = bytes[i + k];
    if (d === undefined || i + k >= end || (d & 0xc0) !== 0x80) throw bad;
    cp = (cp << 6) | (d & 0x3f);
  }
  if (c === 0xc0 && cp === 0) return [0, i + 2];
  if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff) || isNonCharacter(cp)) throw bad;
  return [cp, i + n + 1];
}

// --- output ----------------------------------------------------------------------------------

/** C's `%.17g`, which QEMU uses for doubles (`0.1` → `0.10000000000000001`). */
export function formatDouble(v: number): string {
  if (Number.isNaN(v)) return 'nan';
  if (!Number.isFinite(v)) return v > 0 ? 'inf' : '-inf';
  if (v === 0) return Object.is(v, -0) ? '-0' : '0';
  const sign = v < 0 ? '-' : '';
  const [mant = '', expText = '0'] = Math.abs(v).toExponential(16).split('e');
  const digits = mant.replace('.', '');
  const exp = Number(expText);
  if (exp < -4 || exp >= 17) {
    let m = `${digits[0] ?? ''}.${digits.slice(1)}`.replace(/0+$/, '').replace(/\.$/, '');
    const ae = Math.abs(exp);
    m += `e${exp < 0 ? '-' : '+'}${ae < 10 ? '0' : ''}${ae}`;
    return sign + m;
  }
  let intPart: string;
  let frac: string;
  if (exp >= 0) {
    intPart = digits.slice(0, exp + 1);
    frac = digits.slice(exp + 1);
  } else {
    intPart = '0';
    frac = '0'.repeat(-exp - 1) + digits;
  }
  frac = frac.replace(/0+$/, '');
  return sign + intPart + (frac === '' ? '' : `.${frac}`);
}

function formatNumber(v: number): string {
  if (Number.isSafeInteger(v) && !Object.is(v, -0)) return String(v);
  return formatDouble(v);
}

/** A JSON string literal in QMP's pure-ASCII form (`\u00E9`, uppercase hex). */
export function quoteString(s: string): string {
  let out = '"';
  let run = 0;
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    let esc: string | undefined;
    if (c === 0x22) esc = '\\"';
    else if (c === 0x5c) esc = '\\\\';
    else if (c >= 0x20 && c < 0x7f) continue;
    else if (c === 0x08) esc = '\\b';
    else if (c === 0x0c) esc = '\\f';
    else if (c === 0x0a) esc = '\\n';
    else if (c === 0x0d) esc = '\\r';
    else if (c === 0x09) esc = '\\t';
    else esc = `\\u${c.toString(16).toUpperCase().padStart(4, '0')}`;
    out += s.slice(run, i) + esc;
    run = i + 1;
  }
  return `${out}${s.slice(run)}"`;
}

/** Anything a reply may contain; `undefined` members are left out. */
export type Encodable = unknown;

function encodeValue(v: Encodable, pretty: boolean, level: number): string {
  if (v === null || v === undefined) return 'null';
  switch (typeof v) {
    case 'boolean':
      return v ? 'true' : 'false';
    case 'number':
      return formatNumber(v);
    case 'bigint':
      return v.toString();
    case 'string':
      return quoteString(v);
    case 'object':
      break;
    default:
      return 'null';
  }
  const nl = pretty ? `\r\n${'    '.repeat(level + 1)}` : '';
  const closeNl = pretty ? `\r\n${'    '.repeat(level)}` : '';
  if (Array.isArray(v)) {
    const parts = v.map((e) => nl + encodeValue(e, pretty, level + 1));
    return `[${parts.join(pretty ? ',' : ', ')}${closeNl}]`;
  }
  const parts: string[] = [];
  for (const [k, e] of Object.entries(v as Record<string, unknown>)) {
    if (e === undefined) continue;
    parts.push(`${nl}${quoteString(k)}: ${encodeValue(e, pretty, level + 1)}`);
  }
  return `{${parts.join(pretty ? ',' : ', ')}${closeNl}}`;
}

/** Serialise one QMP message (reply, event, greeting) the way QEMU does, CRLF included. */
export function encodeMessage(v: Encodable, pretty = false): string {
  return `${encodeValue(v, pretty, 0)}\r\n`;
}
