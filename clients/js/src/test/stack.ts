/**
 * A real `mqchat up` (embedded broker, bridge, history API on SQLite) on free
 * loopback ports in a temp dir, for one test file: the SDK and the web app are tested
 * against the server a person runs, never against mocks.
 */

import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { connect, createServer, type Server, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

import { ChatClient, HistoryApi, type ChatOptions } from "../sdk/index.js";

export const REPO = fileURLToPath(new URL("../../../../", import.meta.url));
const MQCHAT = process.env.MQCHAT_BIN ?? join(REPO, ".venv", "bin", "mqchat");

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const address = server.address();
      server.close(() => resolve(typeof address === "object" && address ? address.port : 0));
    });
  });
}

export class Stack {
  private counter = 0;
  constructor(
    readonly apiUrl: string,
    readonly mqttUrl: string,
    private readonly child: ChildProcess,
    private readonly dir: string,
    readonly output: () => string,
  ) {}

  /** A new account with a name unique to this run; its password is `password-<name>`. */
  async newUser(prefix = "u"): Promise<{ username: string; password: string }> {
    this.counter += 1;
    const username = `${prefix}${this.counter}_${Math.random().toString(36).slice(2, 7)}`;
    const password = `password-${username}`;
    await new HistoryApi(this.apiUrl).signUp(username, password);
    return { username, password };
  }

  /** A signed-in, connected client for `user` on `device`. */
  async client(
    user: { username: string; password: string },
    device = "node",
    options: Partial<ChatOptions> = {},
    connect = true,
  ): Promise<ChatClient> {
    const api = new HistoryApi(this.apiUrl);
    await api.signIn(user.username, user.password);
    const client = new ChatClient({
      api, mqttUrl: this.mqttUrl, device, resendAfter: 1000, holdBack: 500,
      ...options,
    });
    if (connect) await client.connect();
    return client;
  }

  async close(): Promise<void> {
    if (this.child.exitCode === null) {
      const exited = new Promise((resolve) => this.child.once("exit", resolve));
      this.child.kill("SIGTERM");
      await Promise.race([exited, new Promise((r) => setTimeout(r, 20_000))]);
      if (this.child.exitCode === null) this.child.kill("SIGKILL");
    }
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/**
 * Start `mqchat up` and wait until it says where everything listens (at most 90 s).
 * A port found free can be taken before the broker binds it (another test's server, or
 * an outgoing connection's ephemeral port: CI once lost one so), so a start that fails
 * on a busy port is tried again on fresh ports, up to three times.
 */
export async function startStack(): Promise<Stack> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await startStackOnce();
    } catch (error) {
      if (attempt >= 3 || !/address already in use|in use/.test(String(error))) throw error;
    }
  }
}

async function startStackOnce(): Promise<Stack> {
  const dir = mkdtempSync(join(tmpdir(), "mqchat-js-"));
  const [mqtt, ws, api] = [await freePort(), await freePort(), await freePort()];
  const child = spawn(
    MQCHAT,
    ["up", "--data-dir", join(dir, "data"), "--mqtt-port", String(mqtt), "--ws-port", String(ws), "--api-port", String(api)],
    { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, NO_COLOR: "1" } },
  );
  let out = "";
  child.stdout.on("data", (chunk: Buffer) => (out += chunk.toString()));
  child.stderr.on("data", (chunk: Buffer) => (out += chunk.toString()));
  const stack = new Stack(`http://127.0.0.1:${api}`, `ws://127.0.0.1:${ws}/mqtt`, child, dir, () => out);
  const deadline = Date.now() + 90_000;
  while (!/^logs\s/m.test(out)) {
    if (child.exitCode !== null || Date.now() > deadline) {
      await stack.close();
      throw new Error(`mqchat up did not start:\n${out}`);
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  return stack;
}

/** Resolve when `predicate` holds, polling; fail after `ms` with `what`. */
export async function until(predicate: () => boolean, what: string, ms = 15_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/**
 * A TCP relay in front of a listener (the broker's WebSocket port): `cut()` closes every
 * connection through it and closes each new one as soon as it arrives, as a network
 * that drops a device's traffic does, until `heal()`. A real socket closes: the browser
 * sees what it sees on a real network, not a mocked WebSocket.
 */
export class Relay {
  private reachable = true;
  private readonly sockets = new Set<Socket>();
  /** Connections let through to the target since the relay started. */
  passed = 0;

  private constructor(private readonly server: Server, readonly port: number) {}

  static async start(target: { host: string; port: number }): Promise<Relay> {
    const server = createServer();
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen(0, "127.0.0.1", () => resolve());
    });
    const address = server.address();
    const relay = new Relay(server, typeof address === "object" && address ? address.port : 0);
    server.on("connection", (inbound) => relay.accept(inbound, target));
    return relay;
  }

  private accept(inbound: Socket, target: { host: string; port: number }): void {
    if (!this.reachable) return void inbound.destroy();
    this.passed += 1;
    const outbound = connect(target.port, target.host);
    for (const [from, to] of [[inbound, outbound], [outbound, inbound]] as const) {
      this.sockets.add(from);
      from.pipe(to);
      from.on("error", () => to.destroy());
      from.on("close", () => {
        this.sockets.delete(from);
        to.destroy();
      });
    }
  }

  cut(): void {
    this.reachable = false;
    for (const socket of this.sockets) socket.destroy();
  }

  heal(): void {
    this.reachable = true;
  }

  async close(): Promise<void> {
    this.cut();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}
