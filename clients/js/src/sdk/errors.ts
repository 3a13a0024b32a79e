import type { ErrorCode } from "./wire.js";

/**
 * Every failure the SDK reports is one of these, with the protocol's stable `code`
 * to switch on (docs/protocol.md, "Errors") or one of the SDK's own for what never
 * reached the server: `unreachable`, `connection_lost`, `unexpected_response`.
 */
export class MqchatError extends Error {
  constructor(
    readonly code: ErrorCode | "unreachable" | "connection_lost" | "unexpected_response" | "refused",
    readonly detail: string,
    /** The uplink's id, where the refusal names one. */
    readonly id?: string | null,
    /** The HTTP status, for the history API's answers. */
    readonly status?: number,
    /** Seconds to wait, from a 429's `Retry-After`. */
    readonly retryAfter?: number,
  ) {
    super(`${code}: ${detail}`);
    this.name = "MqchatError";
  }
}
