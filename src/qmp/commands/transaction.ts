/**
 * `transaction`: run several actions all-or-nothing (QEMU's qmp_transaction).
 *
 * Every action is prepared in order; a prepared action has already taken effect (so later
 * actions see it) and says how to commit or undo itself. The first failure undoes every
 * prepared action in reverse order and becomes the command's error; otherwise all are
 * committed in order, then cleaned up. Other modules add their actions (bitmap.ts: the
 * block-dirty-bitmap-* ones; blockdev-backup, blockdev-snapshot, ...) with
 * {@link registerTransactionAction} when they load; this module imports none of them.
 */
import { QmpError } from '../../util/errors.js';
import { defineCommand, type CommandContext, type CommandDef } from '../types.js';

/** What a prepared action leaves behind. Every member is optional. */
export interface PreparedAction {
  /** Make the change final (all actions prepared successfully). */
  commit?(): void | Promise<void>;
  /** Undo the change (a later action failed). Must not throw for a state it created itself. */
  abort?(): void | Promise<void>;
  /** Runs after commit or abort (release temporary resources). */
  clean?(): void | Promise<void>;
}

export type CompletionMode = 'individual' | 'grouped';

/** The transaction-wide properties each action sees. */
export interface TransactionProperties {
  completionMode: CompletionMode;
}

export interface TransactionActionDef {
  /** The `type` of TransactionAction (`block-dirty-bitmap-add`, `blockdev-backup`, ...). */
  readonly type: string;
  /** Jobs can complete as a group; every other action refuses `completion-mode: grouped`. */
  readonly supportsGrouped?: boolean;
  /** Do the change (or fail without side effects) and return how to commit or undo it. */
  prepare(
    data: Record<string, unknown>,
    ctx: CommandContext,
    props: TransactionProperties,
  ): PreparedAction | Promise<PreparedAction>;
}

/** `abort`: always fails, which rolls the whole transaction back. */
const abortAction: TransactionActionDef = {
  type: 'abort',
  supportsGrouped: true,
  prepare: () => {
    throw new QmpError('Transaction aborted using Abort action');
  },
};

const registry = new Map<string, TransactionActionDef>();
registry.set(abortAction.type, abortAction);

/** Add (or replace) a transaction action. */
export function registerTransactionAction(def: TransactionActionDef): void {
  registry.set(def.type, def);
}

/** The action types currently implemented. */
export function transactionActionTypes(): string[] {
  return [...registry.keys()];
}

interface TransactionArgs {
  actions: Array<{ type: string; data?: Record<string, unknown> }>;
  properties?: { 'completion-mode'?: CompletionMode };
}

/** Run a list of actions all-or-nothing. Exported for in-process users (CLI, tests). */
export async function runTransaction(args: TransactionArgs, ctx: CommandContext): Promise<void> {
  const props: TransactionProperties = {
    completionMode: args.properties?.['completion-mode'] ?? 'individual',
  };
  const prepared: PreparedAction[] = [];
  try {
    for (const action of args.actions) {
      const def = registry.get(action.type);
      if (!def) throw new QmpError(`Transaction action '${action.type}' is not supported by blockd`);
      if (props.completionMode === 'grouped' && !def.supportsGrouped) {
        throw new QmpError(
          `Action '${action.type}' does not support Transaction property completion-mode = grouped`,
        );
      }
      prepared.push(await def.prepare(action.data ?? {}, ctx, props));
    }
  } catch (err) {
    for (const p of prepared.reverse()) {
      try {
        await p.abort?.();
      } catch (undoErr) {
        ctx.log.error({ err: undoErr }, 'transaction rollback step failed');
      }
    }
    for (const p of prepared) await runClean(p, ctx);
    throw err;
  }
  for (const p of prepared) await p.commit?.();
  for (const p of prepared) await runClean(p, ctx);
}

async function runClean(p: PreparedAction, ctx: CommandContext): Promise<void> {
  try {
    await p.clean?.();
  } catch (err) {
    ctx.log.warn({ err }, 'transaction clean-up step failed');
  }
}

export const transactionCommands: readonly CommandDef[] = [
  defineCommand<TransactionArgs>('transaction', async (a, ctx) => {
    await runTransaction(a, ctx);
    return {};
  }),
];
