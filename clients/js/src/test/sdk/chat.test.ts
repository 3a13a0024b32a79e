// The SDK against a real `mqchat up`: what an app relies on, end to end.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import type { MqttClient } from "mqtt";

import { ChatClient, MqchatError, storageOutbox, topics, type DownMessage, type Receipt } from "../../sdk/index.js";
import { startStack, until, type Stack } from "../stack.js";

let stack: Stack;
const clients: ChatClient[] = [];

before(async () => {
  stack = await startStack();
});

after(async () => {
  await Promise.all(clients.map((c) => c.close()));
  await stack?.close();
});

async function connect(user: { username: string; password: string }, device = "node"): Promise<ChatClient> {
  const client = await stack.client(user, device);
  clients.push(client);
  return client;
}

function collect<T>(subscribe: (listener: (event: T) => void) => void): T[] {
  const seen: T[] = [];
  subscribe((event) => seen.push(event));
  return seen;
}

// Two new users, each connected (device "node"), and the messages bob is shown.
async function aliceAndBob() {
  const [alice, bob] = [await stack.newUser("a"), await stack.newUser("b")];
  const a = await connect(alice);
  const b = await connect(bob);
  const got = collect<DownMessage>((l) => b.on("message", l));
  return { alice, bob, a, b, got };
}

test("a message is stored, delivered once, and acked delivered then read", async () => {
  const { alice, bob, a, b, got } = await aliceAndBob();
  const receipts = collect<Receipt>((l) => a.on("receipt", l));

  const sent = await a.send("hello", { to: bob.username });
  assert.equal(sent.seq, 1);
  // The same id again is the same message: same seq, nothing new on bob's side.
  const again = await a.send("hello", { to: bob.username }, sent.id);
  assert.deepEqual(again, sent);
  await until(() => got.length === 1, "bob's message");
  assert.equal(got[0]!.body, "hello");
  assert.equal(got[0]!.from, alice.username);

  await until(() => receipts.some((r) => r.status === "delivered" && r.seq === 1), "delivered receipt");
  b.markRead(sent.conversation, 1);
  await until(() => receipts.some((r) => r.status === "read" && r.by === bob.username), "read receipt");
  await a.send("second", { conversation: sent.conversation });
  await until(() => got.length === 2, "second message");
  assert.deepEqual(got.map((m) => m.seq), [1, 2]);
});

test("messages sent while the other is away arrive in order, once, on their return", async () => {
  const { bob, a, b, got } = await aliceAndBob();
  const first = await a.send("before", { to: bob.username });
  await until(() => got.length === 1, "first message");

  b.pause();
  for (let i = 0; i < 5; i++) await a.send(`away ${i}`, { conversation: first.conversation });
  b.resume();
  await until(() => got.length === 6, "the messages sent while away");
  assert.deepEqual(got.map((m) => m.seq), [1, 2, 3, 4, 5, 6]);
  await b.caughtUp();
  assert.equal(got.length, 6, "the catch-up added no duplicate");
});

test("the outbox keeps what is sent offline and sends it on reconnect, in order", async () => {
  const { bob, a, got } = await aliceAndBob();
  a.pause();
  const sends = [a.send("one", { to: bob.username }), a.send("two", { to: bob.username })];
  assert.equal(a.pending.length, 2);
  a.resume();
  const sent = await Promise.all(sends);
  assert.deepEqual(sent.map((s) => s.seq), [1, 2]);
  assert.equal(a.pending.length, 0);
  await until(() => got.length === 2, "both messages");
  assert.deepEqual(got.map((m) => m.body), ["one", "two"]);
});

test("the outbox outlives the client: a stored outbox is resent by the next one, same ids, once, in order", async () => {
  const [alice, bob] = [await stack.newUser("a"), await stack.newUser("b")];
  const b = await connect(bob);
  const got = collect<DownMessage>((l) => b.on("message", l));
  const saved = new Map<string, string>();
  const storage = {
    getItem: (k: string) => saved.get(k) ?? null,
    setItem: (k: string, v: string) => void saved.set(k, v),
    removeItem: (k: string) => void saved.delete(k),
  };
  const first = await stack.client(alice, "laptop", { outbox: storageOutbox(storage, "outbox") });
  first.pause();
  void first.send("one", { to: bob.username }).catch(() => {});
  void first.send("two", { to: bob.username }).catch(() => {});
  await first.close(); // the app quits with both still "sending…"
  const ids = first.pending.map((p) => p.id);
  assert.equal(ids.length, 2);

  const second = await stack.client(alice, "laptop", { outbox: storageOutbox(storage, "outbox") }, false);
  clients.push(second);
  const sent = collect<Receipt>((l) => second.on("receipt", l));
  await second.connect();
  assert.deepEqual(second.pending.map((p) => [p.id, p.body, p.to]), [[ids[0], "one", bob.username], [ids[1], "two", bob.username]]);
  await until(() => got.length === 2, "both messages at bob's");
  assert.deepEqual(got.map((m) => [m.id, m.body, m.seq]), [[ids[0], "one", 1], [ids[1], "two", 2]]);
  await until(() => second.pending.length === 0 && !saved.has("outbox"), "an empty outbox, saved");
  assert.deepEqual(sent.filter((r) => r.status === "sent").map((r) => r.id), ids);
});

test("a second connect() while one is under way shares it: it resolves connected, with one connection", async () => {
  const alice = await stack.newUser("a");
  const a = await stack.client(alice, "node", {}, false);
  clients.push(a);
  const connections = collect<{ connected: boolean }>((l) => a.on("connection", l));
  const first = a.connect();
  await a.connect(); // an app's own retry, say, while the SDK's attempt is open
  assert.deepEqual(connections.map((c) => c.connected), [true], "connected before it resolved, once");
  await first;
  assert.deepEqual(connections.map((c) => c.connected), [true]);
});

test("a gap in the live stream is filled from the history API, in seq order", async () => {
  const { bob, a, b, got } = await aliceAndBob();
  const first = await a.send("one", { to: bob.username });
  await until(() => got.length === 1, "the first message");
  // Bob's connection stops listening (the broker keeps nothing for a topic nobody
  // subscribes to), so seq 2 never reaches him over MQTT; seq 3 does, live.
  const mqttClient = (b as unknown as { mqtt: MqttClient }).mqtt;
  const down = topics.downAll(bob.username);
  await mqttClient.unsubscribeAsync(down);
  await a.send("two", { conversation: first.conversation });
  await mqttClient.subscribeAsync(down, { qos: 1 });
  const asked: [string, number, number | undefined][] = [];
  const between = b.api.messagesBetween.bind(b.api);
  b.api.messagesBetween = (conversation, after, before) => {
    asked.push([conversation, after, before]);
    return between(conversation, after, before);
  };
  await a.send("three", { conversation: first.conversation });
  await until(() => got.length === 3, "the gap filled");
  assert.deepEqual(got.map((m) => [m.seq, m.body]), [[1, "one"], [2, "two"], [3, "three"]]);
  assert.deepEqual(asked, [[first.conversation, 1, 3]], "asked the history for exactly the gap");
});

test("a new device catches up from the history API", async () => {
  const [alice, bob] = [await stack.newUser("a"), await stack.newUser("b")];
  const a = await connect(alice);
  for (let i = 1; i <= 3; i++) await a.send(`m${i}`, { to: bob.username });
  const b = await stack.client(bob, "tablet", {}, false);
  clients.push(b);
  const got = collect<DownMessage>((l) => b.on("message", l));
  await b.connect();
  await b.caughtUp();
  assert.deepEqual(got.map((m) => m.body), ["m1", "m2", "m3"]);
});

test("refusals reject the send; rate_limited is absorbed and resent", async () => {
  const alice = await stack.newUser("a");
  const a = await connect(alice);
  await assert.rejects(a.send("hi", { to: "nobody_here" }), (e: MqchatError) => e.code === "unknown_recipient");
  await assert.rejects(a.send("x".repeat(4097), { to: "nobody_here" }), (e: MqchatError) => e.code === "body_too_large");
  // 40 at once, each in its own lane: over the bridge's 20 a second, so some are
  // rate_limited first; every one still ends with its real answer.
  const results = await Promise.allSettled(
    Array.from({ length: 40 }, (_, i) => a.send("hi", { conversation: `c_none_${i}` })),
  );
  const codes = results.map((r) => (r.status === "rejected" ? (r.reason as MqchatError).code : "sent"));
  assert.deepEqual(new Set(codes), new Set(["unknown_conversation"]));
});

test("typing and presence reach the other member", async () => {
  const [alice, bob] = [await stack.newUser("a"), await stack.newUser("b")];
  const a = await connect(alice);
  const sent = await a.send("hi", { to: bob.username });
  const seen = collect<{ user: string; state: string }>((l) => a.on("presence", l));
  a.watchPresence(bob.username);
  const b = await connect(bob);
  await until(() => seen.some((p) => p.user === bob.username && p.state === "online"), "bob online");
  const typing = collect<{ from: string; typing: boolean }>((l) => a.on("typing", l));
  b.setTyping(sent.conversation);
  await until(() => typing.some((t) => t.from === bob.username && t.typing), "bob typing");
  await b.close();
  clients.splice(clients.indexOf(b), 1);
  await until(() => seen.at(-1)?.state === "offline", "bob offline");
});

test("groups: create, add, aggregate receipts, leave", async () => {
  const [alice, bob, carol] = [await stack.newUser("a"), await stack.newUser("b"), await stack.newUser("c")];
  const a = await connect(alice);
  const b = await connect(bob);
  const group = await a.createGroup("climbing", [bob.username]);
  const added = await a.addMembers(group, [carol.username]);
  assert.ok(added.seq > 1);
  const c = await connect(carol);
  const receipts = collect<Receipt>((l) => a.on("receipt", l));
  const sent = await a.send("ropes?", { conversation: group });
  b.markRead(group, sent.seq);
  c.markRead(group, sent.seq);
  await until(
    () => receipts.some((r) => r.status === "read" && r.seq === sent.seq && r.read === 2 && r.members === 2),
    "read by 2 of 2",
  );
  await assert.rejects(b.addMembers(group, [carol.username]), (e: MqchatError) => e.code === "forbidden");
  const members = await a.api.members(group);
  assert.deepEqual(members.map((m) => m.username).sort(), [alice.username, bob.username, carol.username].sort());
  await c.leaveGroup(group);
});
