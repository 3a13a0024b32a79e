/**
 * Where the outbox survives the process: a page that is closed or reloaded while a
 * message is still "sending…" must send it on its next start, with the same id (the
 * bridge stores an id once, so a resend of something already stored is harmless).
 */

/** One message or group change not yet acknowledged `sent`, as it goes on the wire. */
export interface StoredOutgoing {
  id: string;
  /** Messages of one lane go out one after another, in the order they were queued. */
  lane: string;
  kind: "msg" | "group";
  /** The JSON published to `up/<kind>`, resent unchanged. */
  payload: string;
  body?: string;
}

/**
 * The SDK's only demand on storage: read everything once at `connect()`, and be handed
 * the whole outbox (in order) whenever it changes. Whole-outbox writes keep an
 * asynchronous store (IndexedDB, a file) from ever seeing a delete overtake its put.
 */
export interface OutboxStore {
  load(): Promise<StoredOutgoing[]> | StoredOutgoing[];
  save(items: StoredOutgoing[]): Promise<void> | void;
}

/** What `localStorage` (and Node's `--experimental-webstorage`) offers. */
export interface KeyValueStorage {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
  removeItem(key: string): void;
}

/**
 * An outbox in one `localStorage` key (synchronous: a message is stored before
 * `send()` returns, so even a close right after the click keeps it). Use one key per
 * device and user; a page can remove it on sign-out.
 */
export function storageOutbox(storage: KeyValueStorage, key: string): OutboxStore {
  return {
    load() {
      try {
        const items = JSON.parse(storage.getItem(key) ?? "[]") as unknown;
        return Array.isArray(items) ? (items as StoredOutgoing[]) : [];
      } catch {
        return []; // a corrupt entry must not keep the app from starting
      }
    },
    save(items) {
      if (items.length === 0) storage.removeItem(key);
      else storage.setItem(key, JSON.stringify(items));
    },
  };
}
