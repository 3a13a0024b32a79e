export { ChatClient, passwordCredential } from "./client.js";
export type { ChatEvents, ChatOptions, ConnectionState, Sent } from "./client.js";
export { MqchatError } from "./errors.js";
export { HistoryApi } from "./history.js";
export type { Conversation, DeviceCursor, LastMessage, Member, MqttCredential, Page, Token, Trace, UserPresence } from "./history.js";
export * from "./wire.js";
export { storageOutbox } from "./outbox.js";
export type { KeyValueStorage, OutboxStore, StoredOutgoing } from "./outbox.js";
