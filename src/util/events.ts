/** A QMP event as the dispatcher hands it to monitors. */
export interface QmpEvent {
  event: string;
  data: Record<string, unknown>;
  timestamp: { seconds: number; microseconds: number };
}

export type EventListener = (ev: QmpEvent) => void;

/**
 * Broadcast bus for QMP events. Listeners are called synchronously, so an event
 * emitted while a command runs is written before that command's reply.
 */
export class EventBus {
  private readonly listeners = new Set<EventListener>();

  subscribe(fn: EventListener): () => void {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }

  emit(event: string, data: Record<string, unknown> = {}): void {
    const now = Date.now();
    const ev: QmpEvent = {
      event,
      data,
      timestamp: { seconds: Math.floor(now / 1000), microseconds: (now % 1000) * 1000 },
    };
    for (const fn of [...this.listeners]) fn(ev);
  }
}
