/**
 * The history API (docs/history_api.md) over `fetch`, in browsers and Node.js alike:
 * sign-up, sign-in, conversations, pages of messages, cursors, presence, and the
 * short-lived MQTT credential that stands in for the password on the broker.
 *
 * It keeps the bearer token, never the password: `signIn` uses the password once.
 */

import { MqchatError } from "./errors.js";
import type { DownMessage, ErrorCode, Presence } from "./wire.js";

export interface LastMessage {
  id: string;
  seq: number;
  from: string;
  body: string;
  sent_at: string;
}

export interface Conversation {
  id: string;
  kind: "direct" | "group";
  name: string | null;
  members: string[];
  member: boolean;
  last_message: LastMessage | null;
  unread: number;
}

export interface Page {
  messages: DownMessage[];
  has_more: boolean;
}

export interface Member {
  username: string;
  role: "admin" | "member";
  since_seq: number;
}

export interface DeviceCursor {
  conversation: string;
  delivered: number;
  read: number;
}

export interface UserPresence extends Presence {
  username: string;
}

/** The answer of `POST /v1/mqtt-credentials`: what the device signs in to MQTT with. */
export interface MqttCredential {
  username: string;
  client_id: string;
  password: string;
  expires_at: string;
}

export interface Trace {
  members: number;
  delivered: number;
  read: number;
}

export interface Token {
  access_token: string;
  token_type: string;
  expires_in: number;
}

export class HistoryApi {
  /** The bearer token of the signed-in user; persist it (not the password) to stay signed in. */
  token: string | null;
  /** Called when the API answers 401 to the token: the app signs in again. */
  onUnauthorized: (() => void) | null = null;

  constructor(
    readonly baseUrl: string,
    token: string | null = null,
    private readonly fetchImpl: typeof fetch = globalThis.fetch.bind(globalThis),
  ) {
    this.baseUrl = baseUrl.replace(/\/$/, "");
    this.token = token;
  }

  /** Create an account; resolves to its normal form (the name to use everywhere). */
  async signUp(username: string, password: string): Promise<string> {
    const body = await this.request<{ username: string }>("POST", "/v1/users", {
      json: { username, password },
    });
    return body.username;
  }

  /** Sign in with the password (used here once, not kept); keeps the bearer token. */
  async signIn(username: string, password: string): Promise<Token> {
    const token = await this.request<Token>("POST", "/v1/tokens", {
      form: { username, password },
    });
    this.token = token.access_token;
    return token;
  }

  /** A short-lived MQTT credential for this user's device (issue 17's contract). */
  mqttCredential(device: string): Promise<MqttCredential> {
    return this.request("POST", "/v1/mqtt-credentials", { json: { device }, auth: true });
  }

  conversations(): Promise<Conversation[]> {
    return this.request("GET", "/v1/conversations", { auth: true });
  }

  /** One page of a conversation, ascending by seq (`after`: forwards, `before`: back). */
  messages(conversation: string, page: { after?: number; before?: number; limit?: number } = {}): Promise<Page> {
    const query = new URLSearchParams();
    for (const [key, value] of Object.entries(page)) {
      if (value !== undefined) query.set(key, String(value));
    }
    const q = query.size ? `?${query}` : "";
    return this.request("GET", `/v1/conversations/${encodeURIComponent(conversation)}/messages${q}`, { auth: true });
  }

  /** Every message with `after < seq (< before)`, ascending, across pages. */
  async messagesBetween(conversation: string, after: number, before?: number): Promise<DownMessage[]> {
    const out: DownMessage[] = [];
    for (;;) {
      const page = await this.messages(conversation, { after, before, limit: 200 });
      out.push(...page.messages);
      const last = page.messages.at(-1);
      if (!page.has_more || last === undefined) return out;
      after = last.seq;
    }
  }

  members(conversation: string): Promise<Member[]> {
    return this.request("GET", `/v1/conversations/${encodeURIComponent(conversation)}/members`, { auth: true });
  }

  /** Where this device left off, per conversation. */
  async cursors(device: string): Promise<DeviceCursor[]> {
    const body = await this.request<{ cursors: DeviceCursor[] }>(
      "GET", `/v1/devices/${encodeURIComponent(device)}/cursors`, { auth: true },
    );
    return body.cursors;
  }

  presence(username: string): Promise<UserPresence & { at: string | null }> {
    return this.request("GET", `/v1/users/${encodeURIComponent(username)}/presence`, { auth: true });
  }

  /** How far one message got: how many of its recipients have it and have read it. */
  trace(messageId: string): Promise<Trace> {
    return this.request("GET", `/v1/messages/${encodeURIComponent(messageId)}`, { auth: true });
  }

  private async request<T>(
    method: string,
    path: string,
    options: { json?: unknown; form?: Record<string, string>; auth?: boolean },
  ): Promise<T> {
    const headers: Record<string, string> = {};
    let body: string | undefined;
    if (options.json !== undefined) {
      headers["content-type"] = "application/json";
      body = JSON.stringify(options.json);
    } else if (options.form !== undefined) {
      headers["content-type"] = "application/x-www-form-urlencoded";
      body = new URLSearchParams(options.form).toString();
    }
    if (options.auth) {
      if (this.token === null) throw new MqchatError("unauthorized", "not signed in", null, 401);
      headers.authorization = `Bearer ${this.token}`;
    }
    let response: Response;
    try {
      response = await this.fetchImpl(`${this.baseUrl}${path}`, { method, headers, body });
    } catch (exc) {
      throw new MqchatError("unreachable", `history API at ${this.baseUrl}: ${String(exc)}`);
    }
    const text = await response.text();
    let parsed: unknown = undefined;
    try {
      parsed = text ? JSON.parse(text) : undefined;
    } catch {
      // not the API's JSON: reported below
    }
    if (response.status >= 400) {
      const error = (parsed as { error?: { code?: string; detail?: string } } | undefined)?.error;
      const retry = Number(response.headers.get("retry-after") ?? NaN);
      if (response.status === 401 && options.auth) this.onUnauthorized?.();
      if (error?.code === undefined) {
        throw new MqchatError("unexpected_response", text.slice(0, 200), null, response.status);
      }
      throw new MqchatError(
        error.code as ErrorCode, error.detail ?? "", null, response.status,
        Number.isFinite(retry) ? retry : undefined,
      );
    }
    if (parsed === undefined && response.status !== 204) {
      throw new MqchatError("unexpected_response", text.slice(0, 200), null, response.status);
    }
    return parsed as T;
  }
}
