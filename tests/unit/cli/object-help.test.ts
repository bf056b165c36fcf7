import { describe, it, expect } from 'vitest';
import { SchemaRegistry } from '../../../src/qmp/schema-registry.js';
import { objectListHelpText, objectTypeHelpText } from '../../../src/cli/object-help.js';

const schema = SchemaRegistry.load();

describe('--object help listings', () => {
  it('lists the creatable types under QSD\'s heading', () => {
    const text = objectListHelpText();
    expect(text.startsWith('List of user creatable objects:\n  authz-list\n')).toBe(true);
    expect(text).toContain('  secret\n');
    expect(text).toContain('  tls-creds-x509\n');
    expect(text).not.toContain('memory-backend-ram');
  });

  it('lists the secret properties exactly as QSD 7.2 does', () => {
    expect(objectTypeHelpText(schema, 'secret')).toBe(
      'secret options:\n  data=<string>\n  file=<string>\n  format=<QCryptoSecretFormat>\n  iv=<string>\n  keyid=<string>\n',
    );
  });

  it('sorts whole lines, so x-a-max-length= comes before x-a-max=', () => {
    const lines = (objectTypeHelpText(schema, 'throttle-group') ?? '').split('\n');
    expect(lines[1]).toBe('  limits=<ThrottleLimits>');
    expect(lines.indexOf('  x-bps-read-max-length=<int>')).toBeLessThan(lines.indexOf('  x-bps-read-max=<int>'));
    expect(lines.indexOf('  x-bps-read-max=<int>')).toBeLessThan(lines.indexOf('  x-bps-read=<int>'));
  });

  it('names list element types and enums by their QAPI names', () => {
    expect(objectTypeHelpText(schema, 'authz-list')).toBe(
      'authz-list options:\n  policy=<QAuthZListPolicy>\n  rules=<QAuthZListRule>\n',
    );
  });

  it('leaves out the deprecated loaded property', () => {
    expect(objectTypeHelpText(schema, 'tls-creds-anon')).toBe(
      'tls-creds-anon options:\n  dir=<string>\n  endpoint=<QCryptoTLSCredsEndpoint>\n  priority=<string>\n  verify-peer=<bool>\n',
    );
  });

  it('has no property listing for a type blockd cannot create', () => {
    expect(objectTypeHelpText(schema, 'pr-manager-helper')).toBeUndefined();
    expect(objectTypeHelpText(schema, 'bogus')).toBeUndefined();
  });
});
