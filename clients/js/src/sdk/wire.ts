/**
 * The payloads of protocol v1 (docs/protocol.md), with the wire's own property names,
 * so what the SDK hands an app is what the broker carried, and a reader of the
 * protocol page needs no mapping. `test/sdk/wire.test.ts` checks every field list
 * below against protocol/asyncapi.yaml, so the two cannot drift apart unnoticed.
 */

export type ErrorCode =
  | "already_admin" | "already_member" | "body_too_large" | "forbidden" | "group_full"
  | "id_reused" | "internal_error" | "invalid_json" | "invalid_name" | "invalid_payload"
  | "invalid_username" | "invalid_utf8" | "last_admin" | "method_not_allowed" | "not_admin"
  | "not_member" | "not_supported" | "payload_too_large" | "rate_limited"
  | "too_many_devices" | "unauthorized" | "unknown_conversation" | "unknown_message"
  | "unknown_recipient" | "unknown_route" | "unknown_topic" | "unknown_user"
  | "username_taken" | "weak_password" | "wrong_password";

export type GroupEvent = "created" | "added" | "removed" | "left" | "promoted" | "demoted" | "renamed";
export type GroupOp = "create" | "add" | "remove" | "leave" | "promote" | "demote" | "rename";
export type ReceiptStatus = "sent" | "delivered" | "read";
export type PresenceState = "online" | "offline";

/** `up/msg`: exactly one of `to` and `conversation`. */
export interface UpMessage {
  id: string;
  to?: string | null;
  conversation?: string | null;
  body: string;
}

/** `up/ack`: this device's cursors in one conversation ("up to and including"). */
export interface UpAck {
  conversation: string;
  delivered?: number;
  read?: number;
  device?: string;
}

export interface UpTyping {
  conversation: string;
  typing?: boolean;
}

export interface UpGroup {
  id: string;
  op: GroupOp;
  conversation?: string | null;
  name?: string | null;
  members?: string[] | null;
}

export interface UpPresence {
  device: string;
  state: PresenceState;
}

/** `down/msg`, and a message of the history API's pages. */
export interface DownMessage {
  id: string;
  conversation: string;
  seq: number;
  from: string;
  body: string;
  sent_at: string;
  event?: GroupEvent | null;
  users?: string[] | null;
  name?: string | null;
  promoted?: string[] | null;
}

/** `down/receipt`; `delivered`, `read` and `members` only on a group's aggregate. */
export interface Receipt {
  status: ReceiptStatus;
  conversation: string;
  seq: number;
  id?: string | null;
  by: string;
  at: string;
  delivered?: number | null;
  read?: number | null;
  members?: number | null;
}

export interface DownTyping {
  conversation: string;
  from: string;
  typing: boolean;
}

export interface ErrorPayload {
  id?: string | null;
  code: ErrorCode;
  detail: string;
}

/** A user's presence as `GET /v1/users/{user}/presence` says it. */
export interface Presence {
  state: PresenceState;
  at: string;
}

/** One contact's presence, on `down/presence`. */
export interface ContactPresence extends Presence {
  username: string;
}

/** `down/presence`: contacts' changes, or a snapshot of them all after coming online. */
export interface DownPresence {
  users: ContactPresence[];
  snapshot?: boolean;
}

// Every property of T, listed once: a missing or unknown name fails to compile.
type FieldsOf<T> = readonly (keyof T)[];
type Covers<T, L extends FieldsOf<T>> = Exclude<keyof T, L[number]> extends never ? L : never;
function fields<T>() {
  return <const L extends FieldsOf<T>>(list: Covers<T, L>): L => list;
}

/** Each payload's property names, as the AsyncAPI schema of the same title has them. */
export const WIRE_FIELDS = {
  UpMessage: fields<UpMessage>()(["id", "to", "conversation", "body"]),
  UpAck: fields<UpAck>()(["conversation", "delivered", "read", "device"]),
  UpTyping: fields<UpTyping>()(["conversation", "typing"]),
  UpGroup: fields<UpGroup>()(["id", "op", "conversation", "name", "members"]),
  UpPresence: fields<UpPresence>()(["device", "state"]),
  DownMessage: fields<DownMessage>()(
    ["id", "conversation", "seq", "from", "body", "sent_at", "event", "users", "name", "promoted"],
  ),
  Receipt: fields<Receipt>()(
    ["status", "conversation", "seq", "id", "by", "at", "delivered", "read", "members"],
  ),
  DownTyping: fields<DownTyping>()(["conversation", "from", "typing"]),
  ErrorPayload: fields<ErrorPayload>()(["id", "code", "detail"]),
  Presence: fields<Presence>()(["state", "at"]),
  DownPresence: fields<DownPresence>()(["users", "snapshot"]),
} as const;

/** The enums, for the same check. */
export const WIRE_ENUMS = {
  GroupEvent: ["created", "added", "removed", "left", "promoted", "demoted", "renamed"],
  GroupOp: ["create", "add", "remove", "leave", "promote", "demote", "rename"],
  ReceiptStatus: ["sent", "delivered", "read"],
  PresenceState: ["online", "offline"],
  ErrorCode: [
    "already_admin", "already_member", "body_too_large", "forbidden", "group_full",
    "id_reused", "internal_error", "invalid_json", "invalid_name", "invalid_payload",
    "invalid_username", "invalid_utf8", "last_admin", "method_not_allowed", "not_admin",
    "not_member", "not_supported", "payload_too_large", "rate_limited",
    "too_many_devices", "unauthorized", "unknown_conversation", "unknown_message",
    "unknown_recipient", "unknown_route", "unknown_topic", "unknown_user",
    "username_taken", "weak_password", "wrong_password",
  ],
} as const satisfies {
  ErrorCode: readonly ErrorCode[];
  GroupEvent: readonly GroupEvent[];
  GroupOp: readonly GroupOp[];
  ReceiptStatus: readonly ReceiptStatus[];
  PresenceState: readonly PresenceState[];
};

export const MAX_BODY_CHARS = 4096;
export const MAX_PAYLOAD_BYTES = 32768;

export const topics = {
  up: (user: string, kind: "msg" | "ack" | "typing" | "presence" | "group") => `chat/v1/u/${user}/up/${kind}`,
  downAll: (user: string) => `chat/v1/u/${user}/down/#`,
};
