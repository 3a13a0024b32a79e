/**
 * One device's chat connection, the counterpart of the Python SDK's `ChatClient`
 * (clients/mqchat/_client.py), with the same guarantees:
 *
 *   send() ─▶ outbox lane (per target) ─▶ up/msg ─▶ … ─▶ down/receipt "sent" ─▶ send() resolves
 *                     ▲ resent with the same id until "sent"
 *   down/msg ─▶ per conversation: drop seen seqs, hold back gaps, fill them from the
 *               history API ─▶ "message" events, in seq order, once each
 *
 * A message leaves the outbox only on its `sent` receipt (a PUBACK says only that the
 * broker has it). Within a lane the next message goes out once the previous one is
 * stored, so a resend can never land behind a later message. Every connection is a
 * fresh MQTT.js client with the same client id and `clean: false`: the broker keeps
 * the device's session and queue in between, and each attempt can sign in with a
 * fresh short-lived credential, which MQTT.js's own reconnect could not fetch.
 */

import mqtt from "mqtt";
import type { MqttClient } from "mqtt";

import { MqchatError } from "./errors.js";
import type { HistoryApi, MqttCredential } from "./history.js";
import type { OutboxStore, StoredOutgoing } from "./outbox.js";
import {
  MAX_BODY_CHARS,
  MAX_PAYLOAD_BYTES,
  topics,
  type DownMessage,
  type DownPresence,
  type DownTyping,
  type ErrorPayload,
  type GroupOp,
  type Presence,
  type Receipt,
  type UpAck,
  type UpGroup,
  type UpMessage,
  type UpPresence,
  type UpTyping,
} from "./wire.js";

/** The bridge stored it: its place in the conversation. */
export interface Sent {
  id: string;
  conversation: string;
  seq: number;
}

export interface ChatOptions {
  /** The history API, signed in (its token fetches credentials, cursors and gaps). */
  api: HistoryApi;
  /** MQTT over WebSocket, e.g. `ws://127.0.0.1:8083/mqtt`. */
  mqttUrl: string;
  /** Names this device; keep one per installation (a user may have 16). */
  device: string;
  /** Where the MQTT credential comes from; by default `api.mqttCredential(device)`. */
  credential?: () => Promise<MqttCredential>;
  /** Milliseconds without a `sent` receipt before the same id is resent (doubling, up to 8×). */
  resendAfter?: number;
  /** Milliseconds to wait for a missing seq before filling the gap from the history API. */
  holdBack?: number;
  /** Seconds between MQTT pings. */
  keepalive?: number;
  /** Milliseconds between `online` announcements (the bridge times a silent device out). */
  presenceInterval?: number;
  /** Send `delivered` acks as messages reach the app. */
  ackDelivered?: boolean;
  /** Longest wait between two connection attempts, in milliseconds. */
  maxReconnectDelay?: number;
  /**
   * Keeps the outbox across restarts (e.g. `storageOutbox(localStorage, key)`): what
   * was not yet `sent` is resent by the next `connect()`, same id, same order.
   */
  outbox?: OutboxStore;
}

export interface ConnectionState {
  connected: boolean;
  /** Why the connection is down; empty when connected. */
  reason: string;
  /** Milliseconds until the next attempt, while down. */
  retryIn?: number;
}

export interface ChatEvents {
  /** A stored message or group event, per conversation in seq order, each once. */
  message: DownMessage;
  /** Receipts: `sent` (also for messages this device awaits), `delivered`, `read`, group aggregates. */
  receipt: Receipt;
  typing: DownTyping;
  /** A contact's presence (someone this user shares a conversation with), from `down/presence`. */
  presence: Presence & { user: string };
  /** A refusal nobody awaits (an ack's, typing's, or of a send whose caller left). */
  error: MqchatError;
  connection: ConnectionState;
}

type Listener<T> = (event: T) => void;

interface Outgoing {
  id: string;
  lane: string;
  topic: string;
  payload: string;
  body?: string;
  resolve: (sent: Sent) => void;
  reject: (error: MqchatError) => void;
  done: boolean;
}

interface Held {
  delivered: number | undefined;
  pending: Map<number, DownMessage>;
  timer: ReturnType<typeof setTimeout> | undefined;
}

function newId(): string {
  return globalThis.crypto.randomUUID().replaceAll("-", "");
}

function codePoints(text: string): number {
  let n = 0;
  for (const _ of text) n++;
  return n;
}

export class ChatClient {
  readonly api: HistoryApi;
  readonly device: string;
  username = "";
  private readonly opts: Required<Omit<ChatOptions, "api" | "device" | "credential" | "mqttUrl" | "outbox">>;
  private readonly store: OutboxStore | undefined;
  private restored = false;
  private saving: Promise<void> = Promise.resolve();
  private readonly mqttUrl: string;
  private readonly credentialSource: () => Promise<MqttCredential>;
  private credential: MqttCredential | undefined;
  private mqtt: MqttClient | undefined;
  private connected = false;
  private closed = false;
  private generation = 0;
  private attempt = 0;
  private reconnectTimer: ReturnType<typeof setTimeout> | undefined;
  private presenceTimer: ReturnType<typeof setInterval> | undefined;
  private readonly listeners = new Map<keyof ChatEvents, Set<Listener<never>>>();
  private readonly outbox = new Map<string, Outgoing>();
  private readonly lanes = new Map<string, Outgoing[]>();
  private readonly kicks = new Map<string, () => void>();
  private readonly held = new Map<string, Held>();
  /** Each contact's latest presence, as `down/presence` told it. */
  readonly contacts = new Map<string, Presence>();
  private toAck = new Map<string, number>();
  private catchingUp: Promise<void> | undefined;

  constructor(options: ChatOptions) {
    this.api = options.api;
    this.device = options.device;
    this.mqttUrl = options.mqttUrl;
    this.credentialSource = options.credential ?? (() => this.api.mqttCredential(this.device));
    this.store = options.outbox;
    this.opts = {
      resendAfter: options.resendAfter ?? 5000,
      holdBack: options.holdBack ?? 2000,
      keepalive: options.keepalive ?? 30,
      presenceInterval: options.presenceInterval ?? 120_000,
      ackDelivered: options.ackDelivered ?? true,
      maxReconnectDelay: options.maxReconnectDelay ?? 30_000,
    };
  }

  on<K extends keyof ChatEvents>(kind: K, listener: Listener<ChatEvents[K]>): () => void {
    let set = this.listeners.get(kind);
    if (set === undefined) this.listeners.set(kind, (set = new Set()));
    set.add(listener as Listener<never>);
    return () => set.delete(listener as Listener<never>);
  }

  private emit<K extends keyof ChatEvents>(kind: K, event: ChatEvents[K]): void {
    for (const listener of this.listeners.get(kind) ?? []) {
      try {
        (listener as Listener<ChatEvents[K]>)(event);
      } catch (exc) {
        console.error("mqchat: a listener failed", exc);
      }
    }
  }

  get isConnected(): boolean {
    return this.connected;
  }

  /**
   * What is still in the outbox (not yet stored), oldest first, with its body and
   * target: the app shows these as "sending…", also those restored by `connect()`.
   */
  get pending(): { id: string; body?: string; conversation?: string; to?: string }[] {
    return [...this.outbox.values()].map((o) => {
      const up = JSON.parse(o.payload) as { conversation?: string; to?: string };
      return { id: o.id, body: o.body, conversation: up.conversation, to: up.to };
    });
  }

  /**
   * Read this device's cursors, connect, subscribe, and catch up from the history
   * API; then stay connected, reconnecting by itself. Rejects if the first attempt
   * fails (wrong credential, broker unreachable): the app decides whether to retry.
   */
  async connect(): Promise<void> {
    await this.restoreOutbox();
    for (const cursor of await this.api.cursors(this.device)) {
      const held = this.heldFor(cursor.conversation);
      held.delivered = Math.max(held.delivered ?? 0, cursor.delivered);
    }
    await this.connectOnce();
  }

  /** Say `offline` (a clean disconnect fires no will) and disconnect for good. */
  async close(): Promise<void> {
    this.closed = true;
    clearTimeout(this.reconnectTimer);
    clearInterval(this.presenceTimer);
    for (const held of this.held.values()) clearTimeout(held.timer);
    for (const kick of this.kicks.values()) kick();
    const client = this.mqtt;
    this.mqtt = undefined;
    this.connected = false;
    await this.saving;
    if (client !== undefined) {
      if (client.connected) {
        await client.publishAsync(topics.up(this.username, "presence"), this.presencePayload("offline"), { qos: 1 }).catch(() => {});
      }
      await client.endAsync().catch(() => {});
    }
  }

  /**
   * Drop the connection without saying `offline` (the will says it) and stay away
   * until `resume()`: what a page does when the browser reports the network gone.
   */
  pause(): void {
    clearTimeout(this.reconnectTimer);
    this.reconnectTimer = undefined;
    this.paused = true;
    this.mqtt?.end(true);
  }

  /** Reconnect now after `pause()` or during a backoff wait. */
  resume(): void {
    this.paused = false;
    if (this.closed || this.connected) return;
    clearTimeout(this.reconnectTimer);
    this.reconnectTimer = undefined;
    this.attempt = 0;
    void this.connectOnce().catch(() => {});
  }

  private paused = false;

  // -- connecting -----------------------------------------------------------------

  private async freshCredential(): Promise<MqttCredential> {
    const expires = this.credential ? Date.parse(this.credential.expires_at) : 0;
    // Renew a minute early rather than be refused on the boundary.
    if (this.credential === undefined || !(expires - Date.now() > 60_000)) {
      this.credential = await this.credentialSource();
    }
    return this.credential;
  }

  private connectOnce(): Promise<void> {
    // One attempt at a time: two connections with one client id take the session
    // from each other. A second caller shares the attempt under way and learns how it
    // ended, rather than being told "connected" while it is still open.
    if (this.closed) return Promise.resolve();
    this.connecting ??= this.attemptConnection().finally(() => {
      this.connecting = undefined;
    });
    return this.connecting;
  }

  private connecting: Promise<void> | undefined;

  private async attemptConnection(): Promise<void> {
    let client: MqttClient | undefined;
    try {
      const credential = await this.freshCredential();
      this.username = credential.username;
      client = mqtt.connect(this.mqttUrl, {
        protocolVersion: 4,
        clientId: credential.client_id,
        username: credential.username,
        password: credential.password,
        clean: false,
        keepalive: this.opts.keepalive,
        reconnectPeriod: 0,
        connectTimeout: 10_000,
        will: {
          topic: topics.up(credential.username, "presence"),
          payload: this.presencePayload("offline"),
          qos: 1,
          retain: false,
        },
      });
      this.mqtt = client;
      await new Promise<void>((resolve, reject) => {
        client!.once("connect", () => resolve());
        client!.once("error", (exc) => reject(exc));
        client!.once("close", () => reject(new Error("connection closed before CONNACK")));
      });
      client.on("message", (topic, payload) => this.onIncoming(topic, payload.toString()));
      client.on("error", () => {}); // a refusal or a broken socket: "close" follows
      client.on("close", () => this.onLost(client!, "connection lost"));
      await client.subscribeAsync(topics.downAll(credential.username), { qos: 1 });
    } catch (exc) {
      client?.end(true);
      if (this.mqtt === client) this.mqtt = undefined;
      const error = exc instanceof MqchatError ? exc : this.connectError(exc);
      if (error.code === "refused" || error.code === "unauthorized") this.credential = undefined;
      if (this.generation === 0) throw error;
      this.scheduleReconnect(error.detail);
      return;
    }
    if (this.closed || this.paused) {
      // Paused while this attempt was under way: stay away until resume().
      if (this.mqtt === client) this.mqtt = undefined;
      client.end(true);
      return;
    }
    this.connected = true;
    this.attempt = 0;
    this.generation += 1;
    this.emit("connection", { connected: true, reason: "" });
    this.publish("presence", this.presencePayload("online"), 1);
    clearInterval(this.presenceTimer);
    this.presenceTimer = setInterval(() => {
      if (this.connected) this.publish("presence", this.presencePayload("online"), 1);
    }, this.opts.presenceInterval);
    // Resend the head of every lane now rather than after resendAfter.
    for (const kick of this.kicks.values()) kick();
    // Whatever the broker dropped while we were away comes from the history.
    this.catchingUp = this.catchUpQuietly();
  }

  private connectError(exc: unknown): MqchatError {
    const code = (exc as { code?: unknown }).code;
    if (typeof code === "number" && code > 0) {
      // CONNACK 5: not authorised (an expired credential, say); 3: throttled, try later.
      return new MqchatError("refused", `broker refused the connection (CONNACK ${code})`);
    }
    return new MqchatError("unreachable", `broker at ${this.mqttUrl}: ${String((exc as Error)?.message ?? exc)}`);
  }

  private onLost(client: MqttClient, reason: string): void {
    if (this.mqtt !== client) return;
    this.mqtt = undefined;
    this.connected = false;
    clearInterval(this.presenceTimer);
    client.end(true);
    if (this.closed) return;
    this.scheduleReconnect(reason);
  }

  private scheduleReconnect(reason: string): void {
    if (this.closed || this.reconnectTimer !== undefined) return;
    // Exponential with full jitter: a restarted broker is not stampeded by every tab.
    const ceiling = Math.min(this.opts.maxReconnectDelay, 500 * 2 ** this.attempt);
    const delay = Math.round(ceiling / 2 + (Math.random() * ceiling) / 2);
    this.attempt += 1;
    this.emit("connection", { connected: false, reason, retryIn: this.paused ? undefined : delay });
    if (this.paused) return;
    this.reconnectTimer = setTimeout(() => {
      this.reconnectTimer = undefined;
      void this.connectOnce().catch(() => {});
    }, delay);
  }

  private presencePayload(state: UpPresence["state"]): string {
    const presence: UpPresence = { device: this.device, state };
    return JSON.stringify(presence);
  }

  private publish(kind: Parameters<typeof topics.up>[1], payload: string, qos: 0 | 1): void {
    const client = this.mqtt;
    if (client === undefined || !this.connected) return;
    client.publish(topics.up(this.username, kind), payload, { qos }, () => {});
  }

  // -- sending --------------------------------------------------------------------

  /**
   * Send a message; resolves once it is stored, rejects with a refusal
   * (`unknown_recipient`, `body_too_large`, …). While offline it waits in the
   * outbox and goes out on reconnect, with the same id.
   */
  send(body: string, target: { to: string } | { conversation: string }, id: string = newId()): Promise<Sent> {
    if (codePoints(body) > MAX_BODY_CHARS) {
      return Promise.reject(new MqchatError("body_too_large", `over ${MAX_BODY_CHARS} characters`, id));
    }
    if (body.length === 0) return Promise.reject(new MqchatError("invalid_payload", "empty body", id));
    const up: UpMessage = "to" in target ? { id, to: target.to, body } : { id, conversation: target.conversation, body };
    const lane = "to" in target ? `to:${target.to}` : `conversation:${target.conversation}`;
    return this.submit(up, "msg", lane, body);
  }

  /** Create a group with this user as its first admin; resolves to its conversation id. */
  async createGroup(name: string, members: string[] = [], id: string = newId()): Promise<string> {
    const sent = await this.group({ id, op: "create", name, members }, `create:${id}`);
    return sent.conversation;
  }

  addMembers(conversation: string, members: string[], id = newId()): Promise<Sent> {
    return this.groupOp("add", conversation, { members }, id);
  }

  removeMembers(conversation: string, members: string[], id = newId()): Promise<Sent> {
    return this.groupOp("remove", conversation, { members }, id);
  }

  promote(conversation: string, members: string[], id = newId()): Promise<Sent> {
    return this.groupOp("promote", conversation, { members }, id);
  }

  demote(conversation: string, members: string[], id = newId()): Promise<Sent> {
    return this.groupOp("demote", conversation, { members }, id);
  }

  rename(conversation: string, name: string, id = newId()): Promise<Sent> {
    return this.groupOp("rename", conversation, { name }, id);
  }

  leaveGroup(conversation: string, id = newId()): Promise<Sent> {
    return this.groupOp("leave", conversation, {}, id);
  }

  private groupOp(op: GroupOp, conversation: string, fields: Partial<UpGroup>, id: string): Promise<Sent> {
    // A change rides its group's lane, so a message sent before it is stored first.
    return this.group({ id, op, conversation, ...fields }, `conversation:${conversation}`);
  }

  private group(up: UpGroup, lane: string): Promise<Sent> {
    return this.submit(up, "group", lane);
  }

  private submit(up: UpMessage | UpGroup, kind: "msg" | "group", lane: string, body?: string): Promise<Sent> {
    const payload = JSON.stringify(up);
    if (new TextEncoder().encode(payload).length > MAX_PAYLOAD_BYTES) {
      return Promise.reject(new MqchatError("payload_too_large", `${payload.length} bytes`, up.id));
    }
    return new Promise<Sent>((resolve, reject) => {
      this.enqueue({ id: up.id, lane, topic: kind, payload, body, resolve, reject, done: false });
      this.persist();
    });
  }

  /**
   * Put back what an earlier run left unsent (once; `connect()` does it too), so an app
   * can show it before the broker answers. Nobody awaits these: a refusal is an `error` event.
   */
  async restoreOutbox(): Promise<void> {
    if (this.store === undefined || this.restored) return;
    this.restored = true;
    let items: StoredOutgoing[];
    try {
      items = await this.store.load();
    } catch (exc) {
      console.error("mqchat: the saved outbox could not be read", exc);
      return;
    }
    for (const stored of items) {
      if (this.outbox.has(stored.id)) continue;
      this.enqueue({
        id: stored.id, lane: stored.lane, topic: stored.kind, payload: stored.payload, body: stored.body,
        resolve: () => {}, reject: (error) => this.emit("error", error), done: false,
      });
    }
  }

  /** Hand the store the whole outbox, in order, one write after another. */
  private persist(): void {
    const store = this.store;
    if (store === undefined) return;
    const items: StoredOutgoing[] = [...this.outbox.values()].map((o) => ({
      id: o.id, lane: o.lane, kind: o.topic as "msg" | "group", payload: o.payload, body: o.body,
    }));
    this.saving = this.saving.then(async () => {
      try {
        await store.save(items);
      } catch (exc) {
        console.error("mqchat: the outbox could not be saved", exc);
      }
    });
  }

  private enqueue(item: Outgoing): void {
    this.outbox.set(item.id, item);
    const queue = this.lanes.get(item.lane);
    if (queue === undefined) {
      const fresh = [item];
      this.lanes.set(item.lane, fresh);
      void this.runLane(item.lane, fresh);
    } else {
      queue.push(item);
    }
  }

  private async runLane(lane: string, queue: Outgoing[]): Promise<void> {
    while (queue.length > 0 && !this.closed) {
      const item = queue[0]!;
      let wait = this.opts.resendAfter;
      while (!item.done && !this.closed) {
        let kicked = false;
        if (this.connected) this.publish(item.topic as "msg" | "group", item.payload, 1);
        await new Promise<void>((resolve) => {
          const timer = setTimeout(resolve, this.connected ? wait : 2 ** 31 - 1);
          const finish = () => {
            clearTimeout(timer);
            resolve();
          };
          this.kicks.set(lane, () => {
            kicked = true;
            finish();
          });
          (item as Outgoing & { wake?: () => void }).wake = finish;
        });
        // A bridge that is slow, or says rate_limited, must not be buried in resends:
        // double the wait up to 8×, with jitter; a reconnect resends at once.
        wait = kicked ? this.opts.resendAfter : Math.min(wait * 2, this.opts.resendAfter * 8) * (0.8 + Math.random() * 0.2);
      }
      queue.shift();
    }
    this.lanes.delete(lane);
    this.kicks.delete(lane);
  }

  private settle(item: Outgoing, outcome: { sent: Sent } | { error: MqchatError }): void {
    if (item.done) return;
    item.done = true;
    if (this.outbox.get(item.id) === item) {
      this.outbox.delete(item.id);
      this.persist();
    }
    if ("sent" in outcome) item.resolve(outcome.sent);
    else item.reject(outcome.error);
    (item as Outgoing & { wake?: () => void }).wake?.();
  }

  // -- acks, typing, presence -------------------------------------------------------

  /** Tell the others (and this user's other devices) that everything up to `seq` is read. */
  markRead(conversation: string, seq: number): void {
    const ack: UpAck = { conversation, read: seq, device: this.device };
    this.publish("ack", JSON.stringify(ack), 1);
  }

  /** Show the others that this user is (or stopped) typing; QoS 0, best effort. */
  setTyping(conversation: string, typing = true): void {
    const event: UpTyping = { conversation, typing };
    this.publish("typing", JSON.stringify(event), 0);
  }

  /**
   * Kept for apps written before issue 19: presence now comes by itself on
   * `down/presence`, for contacts alone (the bridge closed `chat/v1/presence/{user}`,
   * and refuses subscriptions to it), so there is nothing to follow.
   */
  watchPresence(_user: string): void {}

  // -- receiving --------------------------------------------------------------------

  private onIncoming(topic: string, text: string): void {
    let payload: unknown;
    try {
      payload = JSON.parse(text);
    } catch {
      return;
    }
    if (typeof payload !== "object" || payload === null) return;
    const kind = topic.split("/").at(-1);
    if (kind === "presence") {
      for (const word of (payload as DownPresence).users ?? []) {
        const known = this.contacts.get(word.username);
        // A snapshot taken before a change can arrive after it: the later word wins.
        if (known !== undefined && (payload as DownPresence).snapshot && word.at < known.at) continue;
        this.contacts.set(word.username, { state: word.state, at: word.at });
        this.emit("presence", { state: word.state, at: word.at, user: word.username });
      }
      return;
    }
    if (kind === "msg") this.onMessage(payload as DownMessage);
    else if (kind === "receipt") this.onReceipt(payload as Receipt);
    else if (kind === "typing") this.emit("typing", payload as DownTyping);
    else if (kind === "error") this.onError(payload as ErrorPayload);
  }

  private onReceipt(receipt: Receipt): void {
    if (receipt.status === "sent" && receipt.id) {
      const item = this.outbox.get(receipt.id);
      if (item !== undefined) {
        this.settle(item, { sent: { id: receipt.id, conversation: receipt.conversation, seq: receipt.seq } });
      }
    }
    this.emit("receipt", receipt);
  }

  private onError(payload: ErrorPayload): void {
    const error = new MqchatError(payload.code, payload.detail, payload.id);
    const item = payload.id ? this.outbox.get(payload.id) : undefined;
    if (item !== undefined && payload.code === "rate_limited") {
      return; // not stored, not refused: resent after the (growing) wait
    }
    if (item !== undefined && !item.done) {
      this.settle(item, { error });
      return;
    }
    this.emit("error", error);
  }

  private heldFor(conversation: string): Held {
    let held = this.held.get(conversation);
    if (held === undefined) {
      this.held.set(conversation, (held = { delivered: undefined, pending: new Map(), timer: undefined }));
    }
    return held;
  }

  private onMessage(message: DownMessage): void {
    const held = this.heldFor(message.conversation);
    // First sight of this conversation on this device: everything before it is a gap to fill.
    held.delivered ??= 0;
    if (message.seq <= held.delivered || held.pending.has(message.seq)) return; // seen
    held.pending.set(message.seq, message);
    this.drain(held);
    if (held.pending.size > 0 && held.timer === undefined) {
      held.timer = setTimeout(() => void this.fillGap(message.conversation), this.opts.holdBack);
    }
  }

  private drain(held: Held): void {
    for (;;) {
      const next = held.pending.get((held.delivered ?? 0) + 1);
      if (next === undefined) break;
      held.pending.delete(next.seq);
      held.delivered = next.seq;
      this.emit("message", next);
      if (this.opts.ackDelivered) this.scheduleAck(next.conversation, next.seq);
    }
    if (held.pending.size === 0 && held.timer !== undefined) {
      clearTimeout(held.timer);
      held.timer = undefined;
    }
  }

  private scheduleAck(conversation: string, seq: number): void {
    // One delivered ack per conversation for everything that arrived together.
    if (this.toAck.size === 0) {
      setTimeout(() => {
        const pending = this.toAck;
        this.toAck = new Map();
        for (const [conv, delivered] of pending) {
          const ack: UpAck = { conversation: conv, delivered, device: this.device };
          this.publish("ack", JSON.stringify(ack), 1);
        }
      }, 0);
    }
    this.toAck.set(conversation, seq);
  }

  private async fillGap(conversation: string): Promise<void> {
    const held = this.heldFor(conversation);
    held.timer = undefined;
    if (held.pending.size === 0) return;
    const first = Math.min(...held.pending.keys());
    try {
      for (const message of await this.api.messagesBetween(conversation, held.delivered ?? 0, first)) {
        this.onMessage(message);
      }
    } catch {
      if (!this.closed) held.timer = setTimeout(() => void this.fillGap(conversation), this.opts.holdBack);
      return;
    }
    if (held.pending.size > 0 && Math.min(...held.pending.keys()) > (held.delivered ?? 0) + 1) {
      // The history does not have them either: show what came after.
      held.delivered = Math.min(...held.pending.keys()) - 1;
      this.drain(held);
    }
  }

  /** Fetch from the history API everything after this device's cursors. */
  async catchUp(): Promise<void> {
    for (const state of await this.api.conversations()) {
      const have = this.heldFor(state.id).delivered ?? 0;
      if ((state.last_message?.seq ?? 0) <= have) continue;
      for (const message of await this.api.messagesBetween(state.id, have)) this.onMessage(message);
    }
  }

  /** Resolves once the catch-up after the latest (re)connect is over. */
  caughtUp(): Promise<void> {
    return this.catchingUp ?? Promise.resolve();
  }

  private async catchUpQuietly(): Promise<void> {
    // Retried on a timer, not left to the next gap: what the broker dropped may be
    // the end of a conversation, and then no later message reveals the gap.
    for (let attempt = 0; !this.closed; attempt++) {
      try {
        await this.catchUp();
        return;
      } catch (exc) {
        const error = exc as MqchatError;
        if (error.status !== undefined && error.status < 500) return; // retrying will not help
        await new Promise((r) => setTimeout(r, Math.min(5000, 250 * 2 ** attempt)));
      }
    }
  }
}

/**
 * A credential made of the account's password, for Node.js tools talking to a
 * server without `POST /v1/mqtt-credentials`. Never in a page: a page must not keep
 * the password.
 */
export function passwordCredential(username: string, password: string, device: string): () => Promise<MqttCredential> {
  return async () => ({
    username,
    client_id: `${username}:${device}`,
    password,
    expires_at: new Date(Date.now() + 365 * 86_400_000).toISOString(),
  });
}
