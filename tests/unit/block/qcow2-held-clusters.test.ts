import { describe, expect, it } from 'vitest';
import { HeldClusters, heldClustersOf } from '../../../src/block/drivers/qcow2/held-clusters.js';
import { PageLoans, type LoanFence } from '../../../src/util/page-loans.js';

function fence(): LoanFence & { open: boolean } {
  const f = { open: true, passed: () => !f.open };
  return f;
}

describe('qcow2 HeldClusters', () => {
  it('does not hold what no reply can still reference, and punches it at once', () => {
    const h = new HeldClusters();
    const f = fence();
    f.open = false;
    expect(h.hold([3, 4], [4], f)).toEqual([4]);
    expect(h.has(3) || h.has(4)).toBe(false);
  });

  it('holds freed clusters until their fence passes, then gives the lowest and the punches', () => {
    const h = new HeldClusters();
    const a = fence();
    const b = fence();
    expect(h.hold([10, 11, 12], [11], a)).toEqual([]);
    expect(h.hold([5, 11], [], b)).toEqual([]); // freed again, after a reuse: counted twice
    expect(h.size).toBe(4);
    expect(h.release()).toEqual({ lowest: -1, punch: [] });
    a.open = false;
    expect(h.release()).toEqual({ lowest: 10, punch: [11] });
    expect(h.has(10)).toBe(false);
    expect(h.has(11)).toBe(true); // still held by b
    expect(h.has(5)).toBe(true);
    b.open = false;
    expect(h.release()).toEqual({ lowest: 5, punch: [] });
    expect(h.size).toBe(0);
  });

  it('is one set per image (per shared PageLoans)', () => {
    const loans = new PageLoans();
    expect(heldClustersOf(loans)).toBe(heldClustersOf(loans));
    expect(heldClustersOf(new PageLoans())).not.toBe(heldClustersOf(loans));
  });
});
