/**
 * Page-cache pages lent to sockets by reference.
 *
 * A READ reply sent with sendfile() does not copy the file's bytes: the socket keeps references
 * to the page-cache pages until the peer has read them, and a segment that waits for the socket
 * is read from the file only when it is sent. Until then, whatever is written to those file
 * offsets shows in the reply. For a raw image that is a write to the very range being read,
 * which NBD leaves undefined. A qcow2 image, though, can free a host cluster (discard, then the
 * write-back of the change) and reuse it for another guest offset: the reply would then carry
 * that other offset's bytes. So a driver whose host ranges can change owners hands out its file
 * ranges with a PageLoans; a sender that used one registers how far its stream had got
 * (`lend`), and the driver keeps freed clusters from reuse until a fence taken at the free has
 * passed: every borrower's peer has read up to the mark it had then (qcow2/held-clusters.ts).
 */

/** A sender that can tell how much of its stream the peer has taken. */
export interface PageBorrower {
  /** Position in the stream after everything written so far (bytes). */
  loanMark(): number;
  /**
   * True once the peer has read every byte up to `mark`, or the stream is closed (what a closed
   * stream's peer still has to read is no longer known).
   */
  loanReturned(mark: number): boolean;
}

/** Passes once every borrower of a PageLoans, as it was when the fence was taken, has returned. */
export interface LoanFence {
  passed(): boolean;
}

const PASSED: LoanFence = { passed: () => true };

class SnapshotFence implements LoanFence {
  constructor(private readonly open: Array<[PageBorrower, number]>) {}

  passed(): boolean {
    const open = this.open;
    while (open.length > 0) {
      const [b, mark] = open[open.length - 1]!;
      if (!b.loanReturned(mark)) return false;
      open.pop();
    }
    return true;
  }
}

const shared = new Map<string, PageLoans>();

/**
 * The PageLoans of an image file, `key` being its identity (BlockDriver.imageIdentity): shared
 * by every driver instance that opens the file in this process, so that a reopened driver still
 * follows what an earlier one lent. Without a key, a PageLoans of its own.
 */
export function pageLoansOf(key: string | undefined): PageLoans {
  if (key === undefined) return new PageLoans();
  let loans = shared.get(key);
  if (loans === undefined) shared.set(key, (loans = new PageLoans()));
  return loans;
}

/** Borrowers tracked before lend() first drops those that have returned everything. */
const SWEEP_MIN = 64;

export class PageLoans {
  /** Borrower -> its stream position after the last range it sent. */
  private readonly out = new Map<PageBorrower, number>();
  private sweepAt = SWEEP_MIN;

  /**
   * `b` has just queued bytes of a range from this lender (call after writing them). Borrowers
   * stay tracked until they have returned everything (a closed one has): dropped by fence(), and
   * here once there are many, so a lender that never frees keeps no closed connections alive.
   */
  lend(b: PageBorrower): void {
    this.out.set(b, b.loanMark());
    if (this.out.size >= this.sweepAt) {
      this.dropReturned();
      this.sweepAt = Math.max(SWEEP_MIN, 2 * this.out.size);
    }
  }

  /** Forget the borrowers whose peers have read everything they were lent. */
  private dropReturned(): void {
    for (const [b, mark] of this.out) if (b.loanReturned(mark)) this.out.delete(b);
  }

  /** Borrowers still tracked (tests, stats). */
  get borrowers(): number {
    return this.out.size;
  }

  /**
   * A fence over everything lent so far: ranges sent before this call are read by their peers
   * once it passes. Borrowers that have returned everything are dropped here.
   */
  fence(): LoanFence {
    this.dropReturned();
    return this.out.size === 0 ? PASSED : new SnapshotFence([...this.out]);
  }
}
