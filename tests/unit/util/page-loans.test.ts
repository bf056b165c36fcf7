import { describe, expect, it } from 'vitest';
import { PageLoans, pageLoansOf, type PageBorrower } from '../../../src/util/page-loans.js';

/** A stream whose peer has read `read` of the `written` bytes. */
class Stream implements PageBorrower {
  written = 0;
  read = 0;
  closed = false;
  calls = 0;
  loanMark(): number {
    return this.written;
  }
  loanReturned(mark: number): boolean {
    this.calls++;
    return this.closed || this.read >= mark;
  }
}

/** A stream that has just written `written` bytes of a range lent by `loans`. */
function lent(loans: PageLoans, written: number): Stream {
  const s = new Stream();
  s.written = written;
  loans.lend(s);
  return s;
}

describe('PageLoans', () => {
  it('passes at once with nothing lent, or everything lent already read', () => {
    const loans = new PageLoans();
    expect(loans.fence().passed()).toBe(true);
    const s = lent(loans, 100);
    s.read = 100;
    expect(loans.fence().passed()).toBe(true);
    expect(loans.borrowers).toBe(0); // dropped by the fence
  });

  it('waits for each borrower to read up to where it was when the fence was taken', () => {
    const loans = new PageLoans();
    const a = lent(loans, 1000);
    const b = lent(loans, 500);
    const f = loans.fence();
    // Later sends move the borrowers on, not this fence.
    a.written = 5000;
    loans.lend(a);
    expect(f.passed()).toBe(false);
    a.read = 1000;
    expect(f.passed()).toBe(false); // b still has not read
    b.read = 499;
    expect(f.passed()).toBe(false);
    b.read = 500;
    expect(f.passed()).toBe(true);
    // A fence taken now waits for a's newer mark.
    const g = loans.fence();
    expect(g.passed()).toBe(false);
    a.read = 5000;
    expect(g.passed()).toBe(true);
  });

  it('does not ask a borrower again once it has returned', () => {
    const loans = new PageLoans();
    const a = lent(loans, 10);
    const b = lent(loans, 10);
    const f = loans.fence();
    b.read = 10;
    expect(f.passed()).toBe(false);
    const callsB = b.calls;
    expect(f.passed()).toBe(false);
    expect(b.calls).toBe(callsB);
    a.read = 10;
    expect(f.passed()).toBe(true);
  });

  it('treats a closed borrower as returned', () => {
    const loans = new PageLoans();
    const a = lent(loans, 10);
    const f = loans.fence();
    a.closed = true;
    expect(f.passed()).toBe(true);
  });

  it('drops borrowers that have returned everything once many are tracked', () => {
    const loans = new PageLoans();
    const live = lent(loans, 1);
    for (let i = 0; i < 200; i++) lent(loans, 5).closed = true; // connections that read and went away
    // Swept whenever the count reached the threshold: never more than a sweep's worth.
    expect(loans.borrowers).toBeLessThan(70);
    expect(loans.fence().passed()).toBe(false); // the live one is still tracked
    live.read = 1;
    expect(loans.fence().passed()).toBe(true);
    expect(loans.borrowers).toBe(0);
  });

  it('is shared by image identity, and private without one', () => {
    expect(pageLoansOf('8:1:123')).toBe(pageLoansOf('8:1:123'));
    expect(pageLoansOf('8:1:124')).not.toBe(pageLoansOf('8:1:123'));
    expect(pageLoansOf(undefined)).not.toBe(pageLoansOf(undefined));
  });
});
