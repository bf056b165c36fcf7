/**
 * x-debug-query-block-graph: the graph as QEMU's bdrv_get_xdbg_block_graph() reports it.
 *
 * Ids are handed out on first sight while walking, in QEMU's order: block backends (exports,
 * jobs' users) in creation order with their `root` edge, then every node in creation order
 * with its child edges (newest child first). QEMU prepends to both lists, so they come out newest first, and each
 * permission list is written from the highest bit down.
 */
import type { BlockNodeImpl, BlockUserImpl } from './node.js';
import type { JobDebugEdge } from './jobs.js';
import { PERM_CONSISTENT_READ, PERM_RESIZE, PERM_WRITE, PERM_WRITE_UNCHANGED } from './types.js';

export type XDbgNodeType = 'block-backend' | 'block-job' | 'block-driver';

export interface XDbgNode {
  id: number;
  type: XDbgNodeType;
  name: string;
}

export interface XDbgEdge {
  parent: number;
  child: number;
  name: string;
  perm: string[];
  'shared-perm': string[];
}

export interface XDbgGraph {
  nodes: XDbgNode[];
  edges: XDbgEdge[];
}

/** BlockPermission names, lowest bit first (QAPI enum order). */
const PERM_LIST: readonly [number, string][] = [
  [PERM_CONSISTENT_READ, 'consistent-read'],
  [PERM_WRITE, 'write'],
  [PERM_WRITE_UNCHANGED, 'write-unchanged'],
  [PERM_RESIZE, 'resize'],
];

function permList(bits: number): string[] {
  return PERM_LIST.filter(([b]) => (bits & b) !== 0)
    .map(([, n]) => n)
    .reverse();
}

/** A block job's vertex: its id and its edges in the order the job took them. */
export interface XDbgJob {
  id: string;
  edges: JobDebugEdge[];
}

/** Build the graph from the nodes in creation order and the block jobs (QEMU's job list order). */
export function debugBlockGraph(nodesOldestFirst: readonly BlockNodeImpl[], jobs: readonly XDbgJob[] = []): XDbgGraph {
  const ids = new Map<object, number>();
  const idOf = (o: object): number => {
    let id = ids.get(o);
    if (id === undefined) {
      id = ids.size + 1;
      ids.set(o, id);
    }
    return id;
  };
  const nodes: XDbgNode[] = [];
  const edges: XDbgEdge[] = [];
  const edge = (parent: object, user: BlockUserImpl, name: string): void => {
    edges.push({
      parent: idOf(parent),
      child: idOf(user.node),
      name,
      perm: permList(user.perm),
      'shared-perm': permList(user.shared),
    });
  };

  const backends: BlockUserImpl[] = [];
  for (const n of nodesOldestFirst) {
    for (const u of n.parents) if (u.spec.kind !== 'node') backends.push(u);
  }
  backends.sort((a, b) => a.seq - b.seq);
  for (const u of backends) {
    nodes.push({ id: idOf(u), type: 'block-backend', name: '' });
    edge(u, u, 'root');
  }
  // QEMU walks the block jobs after the backends; a job's node list is newest first.
  for (const j of jobs) {
    nodes.push({ id: idOf(j), type: 'block-job', name: j.id });
    for (const e of [...j.edges].reverse()) {
      edges.push({
        parent: idOf(j),
        child: idOf(e.node),
        name: e.name,
        perm: permList(e.perm),
        'shared-perm': permList(e.shared),
      });
    }
  }
  for (const n of nodesOldestFirst) {
    nodes.push({ id: idOf(n), type: 'block-driver', name: n.name });
    // QEMU keeps a node's children newest first.
    for (const e of [...n.childEdges].reverse()) edge(n, e.user, e.name);
  }
  return { nodes: nodes.reverse(), edges: edges.reverse() };
}
