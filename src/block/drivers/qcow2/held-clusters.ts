/**
 * Host clusters freed while READ replies sent by reference may still show their pages
 * (util/page-loans.ts). Their refcount is already 0, so the image stays consistent and nothing
 * leaks, but allocation passes over them (Refcounts, RefcountHost.skipFree) until the fence
 * taken when they were freed has passed: every client that had been sent bytes of the image by
 * then has read that far. Kept per image file (by its shared PageLoans), so that a driver
 * reopened on the same file honours what an earlier instance freed.
 */
import type { LoanFence, PageLoans } from '../../../util/page-loans.js';

export class HeldClusters {
  private entries: Array<{ clusters: number[]; punch: number[]; fence: LoanFence }> = [];
  /** Cluster index -> how many entries hold it. */
  private readonly count = new Map<number, number>();

  /**
   * Hold `clusters` (just freed) until `fence` passes; `punch`, those of them to be discarded in
   * the file (pass-discard-request), waits as well: a hole punched under a page that a reply
   * still references would zero the bytes in it. Returns the clusters that do not have to wait
   * (the fence has passed already) and are to be punched now.
   */
  hold(clusters: number[], punch: number[], fence: LoanFence): number[] {
    if (clusters.length === 0 || fence.passed()) return punch;
    this.entries.push({ clusters, punch, fence });
    for (const c of clusters) this.count.set(c, (this.count.get(c) ?? 0) + 1);
    return [];
  }

  /**
   * Let go of the clusters whose fence has passed (before an allocation looks for free ones):
   * the lowest of them (-1: none), and those to be punched now.
   */
  release(): { lowest: number; punch: number[] } {
    let lowest = -1;
    const punch: number[] = [];
    if (this.entries.length === 0) return { lowest, punch };
    this.entries = this.entries.filter((e) => {
      if (!e.fence.passed()) return true;
      for (const c of e.clusters) {
        const n = this.count.get(c)! - 1;
        if (n === 0) this.count.delete(c);
        else this.count.set(c, n);
        if (lowest < 0 || c < lowest) lowest = c;
      }
      punch.push(...e.punch);
      return false;
    });
    return { lowest, punch };
  }

  has(cluster: number): boolean {
    return this.count.has(cluster);
  }

  /** Clusters held now. */
  get size(): number {
    return this.count.size;
  }
}

const byImage = new WeakMap<PageLoans, HeldClusters>();

/** The held clusters of the image whose PageLoans is `loans` (util/page-loans.ts, pageLoansOf). */
export function heldClustersOf(loans: PageLoans): HeldClusters {
  let held = byImage.get(loans);
  if (held === undefined) byImage.set(loans, (held = new HeldClusters()));
  return held;
}
