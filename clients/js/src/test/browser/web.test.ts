// The web app in Debian's chromium (playwright-core, executablePath; never a browser
// download), served by a real `mqchat up`: two people chat, ticks move, one goes
// offline and comes back, a reload keeps the history, a third person is kept out.
// Screenshots go to build/screenshots/, or to MQCHAT_SCREENSHOTS_DIR (`make screenshots`
// points it at docs/img/): message times come from the server, so every run's pictures
// differ and a plain test run must not touch the tree. Round-trip times are printed
// (docs/benchmarks.md).
import assert from "node:assert/strict";
import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, test } from "node:test";

import { chromium, type Browser, type BrowserContext, type Page } from "playwright-core";

import { REPO, Relay, startStack, until, type Stack } from "../stack.js";

const FLAGS = [
  "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
];
const IMG = process.env.MQCHAT_SCREENSHOTS_DIR || join(REPO, "build", "screenshots");
const PHONE = { width: 390, height: 760 };
const WAIT = 20_000;

let stack: Stack;
let browser: Browser;
const people: { name: string; context: BrowserContext; page: Page }[] = [];
let conversation = "";

before(async () => {
  stack = await startStack();
  // launch() gives every run a fresh --user-data-dir of its own (a temp dir).
  browser = await chromium.launch({ executablePath: "/usr/bin/chromium", headless: true, args: FLAGS });
  mkdirSync(IMG, { recursive: true });
});

after(async () => {
  await browser?.close();
  await stack?.close();
});

async function signUp(prefix: string): Promise<{ name: string; context: BrowserContext; page: Page }> {
  // One clock face and language everywhere: the pictures differ only in the server's times.
  const context = await browser.newContext({ viewport: PHONE, timezoneId: "UTC", locale: "en-GB" });
  const page = await context.newPage();
  page.setDefaultTimeout(WAIT);
  await page.goto(`${stack.apiUrl}/`);
  const name = prefix; // a fresh stack per run: fixed names keep the screenshots stable
  await page.getByLabel("Username", { exact: true }).fill(name);
  await page.getByLabel("Password", { exact: true }).fill(`password-${name}`);
  if (people.length === 0) await page.screenshot({ path: join(IMG, "web-sign-in.png") });
  await page.getByRole("button", { name: "Create account" }).click();
  await page.locator("#list").waitFor();
  const person = { name, context, page };
  people.push(person);
  return person;
}

/** Wait for the connection line to say `text`; if it never does, say what it said. */
async function statusShows(page: Page, text: string): Promise<void> {
  try {
    await page.locator("#status", { hasText: text }).waitFor();
  } catch (error) {
    const box = page.locator("#status");
    const shown = `${JSON.stringify(await box.textContent())}${(await box.isHidden()) ? " (hidden)" : ""}`;
    throw new Error(`the status never said ${JSON.stringify(text)}; it says ${shown}: ${String(error)}`);
  }
}

function tickOf(page: Page, body: string) {
  return page.locator("#messages li", { hasText: body }).locator(".tick");
}

async function bodies(page: Page): Promise<string[]> {
  return page.locator("#messages li:not(.event) .body").allTextContents();
}

test("two people chat; ticks go sent, delivered, read; typing shows", async () => {
  const alice = await signUp("alice");
  const bob = await signUp("bob");
  await alice.page.getByLabel("Start a chat with (username)", { exact: true }).fill(bob.name);
  await alice.page.getByRole("button", { name: "Chat", exact: true }).click();
  await alice.page.getByLabel("Message", { exact: true }).fill("hello bob");
  await alice.page.getByRole("button", { name: "Send" }).click();
  await alice.page.waitForURL(/#\/c\//);
  conversation = decodeURIComponent(alice.page.url().split("#/c/")[1]!);
  // Bob's device has it (his SDK acks delivered) though he has not opened it.
  await tickOf(alice.page, "hello bob").and(alice.page.locator('[data-state="delivered"]')).waitFor();
  await bob.page.locator("#conversations .badge", { hasText: "1" }).waitFor();
  await bob.page.screenshot({ path: join(IMG, "web-conversations.png") });
  await bob.page.getByRole("link", { name: new RegExp(alice.name) }).click();
  await bob.page.locator("#messages li", { hasText: "hello bob" }).waitFor();
  await tickOf(alice.page, "hello bob").and(alice.page.locator('[data-state="read"]')).waitFor();
  await bob.page.getByLabel("Message", { exact: true }).pressSequentially("hi");
  await alice.page.locator("#subtitle", { hasText: "typing…" }).waitFor();
  await bob.page.getByLabel("Message", { exact: true }).fill("hi alice");
  await bob.page.getByRole("button", { name: "Send" }).click();
  await alice.page.locator("#messages li", { hasText: "hi alice" }).waitFor();
  await alice.page.screenshot({ path: join(IMG, "web-conversation.png") });
});

test("round trip in the browser: send to sent, and to the other tab's display", async () => {
  const [alice, bob] = [people[0]!, people[1]!];
  const toSent: number[] = [];
  const toOther: number[] = [];
  for (let i = 0; i < 30; i++) {
    const body = `rt ${i}`;
    const shown = bob.page.evaluate((text) => new Promise<number>((resolve) => {
      const observer = new MutationObserver(() => {
        for (const el of document.querySelectorAll("#messages li .body")) {
          if (el.textContent === text) {
            observer.disconnect();
            resolve(Date.now());
          }
        }
      });
      observer.observe(document.getElementById("messages")!, { childList: true, subtree: true });
    }), body);
    const [start, sentAt] = await alice.page.evaluate((text) => new Promise<[number, number]>((resolve) => {
      const box = document.getElementById("composer-text") as HTMLInputElement;
      const list = document.getElementById("messages")!;
      const start = Date.now();
      const observer = new MutationObserver(() => {
        for (const li of list.querySelectorAll("li")) {
          if (li.querySelector(".body")?.textContent === text && li.querySelector('.tick[data-state="sent"], .tick[data-state="delivered"], .tick[data-state="read"]')) {
            observer.disconnect();
            resolve([start, Date.now()]);
          }
        }
      });
      observer.observe(list, { childList: true, subtree: true });
      box.value = text;
      (document.getElementById("composer") as HTMLFormElement).requestSubmit();
    }), body);
    toSent.push(sentAt - start);
    toOther.push((await shown) - start);
  }
  const pct = (xs: number[], p: number) => [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor((p / 100) * xs.length))]!;
  const report = {
    messages: toSent.length,
    send_to_sent_ms: { p50: pct(toSent, 50), p99: pct(toSent, 99) },
    send_to_other_tab_ms: { p50: pct(toOther, 50), p99: pct(toOther, 99) },
  };
  console.log(`browser round trip: ${JSON.stringify(report)}`);
  writeFileSync(join(REPO, "clients", "js", "dist", "browser-round-trip.json"), JSON.stringify(report, null, 2));
  assert.equal(new Set(await bodies(bob.page)).size, (await bodies(bob.page)).length, "no duplicates");
});

test("offline: bob misses messages and gets them all, in order; alice's wait as sending…", async () => {
  const [alice, bob] = [people[0]!, people[1]!];
  await bob.context.setOffline(true);
  await statusShows(bob.page, "offline");
  for (const body of ["while away 1", "while away 2", "while away 3"]) {
    await alice.page.getByLabel("Message", { exact: true }).fill(body);
    await alice.page.getByRole("button", { name: "Send" }).click();
    await tickOf(alice.page, body).and(alice.page.locator('[data-state="sent"]')).waitFor();
  }
  await bob.context.setOffline(false);
  await bob.page.locator("#messages li", { hasText: "while away 3" }).waitFor();
  const seen = await bodies(bob.page);
  assert.deepEqual(seen.slice(-3), ["while away 1", "while away 2", "while away 3"]);

  await alice.context.setOffline(true);
  await statusShows(alice.page, "offline");
  await alice.page.getByLabel("Message", { exact: true }).fill("typed offline");
  await alice.page.getByRole("button", { name: "Send" }).click();
  await tickOf(alice.page, "typed offline").and(alice.page.locator('[data-state="sending"]')).waitFor();
  await alice.page.screenshot({ path: join(IMG, "web-offline.png") });
  await alice.context.setOffline(false);
  await tickOf(alice.page, "typed offline").and(alice.page.locator('[data-state="sent"], [data-state="delivered"], [data-state="read"]')).waitFor();
  await bob.page.locator("#messages li", { hasText: "typed offline" }).waitFor();
});

test("the outbox outlives the page: typed while cut off, reloaded, sent once on return, in order", async () => {
  const [alice, bob] = [people[0]!, people[1]!];
  // Alice's page reaches the broker through a relay that the test cuts: her broker
  // connection drops as on a real network, while the history API stays reachable,
  // so the page itself still reloads.
  const broker = new URL(stack.mqttUrl);
  const relay = await Relay.start({ host: broker.hostname, port: Number(broker.port) });
  await alice.context.route("**/app/config.json", async (route) => {
    const config = (await (await route.fetch()).json()) as Record<string, unknown>;
    await route.fulfill({ json: { ...config, mqtt_url: `ws://{host}:${relay.port}${broker.pathname}` } });
  });
  try {
    await alice.page.reload(); // the page's connection now goes through the relay
    await alice.page.locator("#messages li", { hasText: "typed offline" }).waitFor();
    await until(() => relay.passed > 0, "alice's connection, through the relay");
    relay.cut();
    await statusShows(alice.page, "retrying");
    for (const body of ["kept 1", "kept 2"]) {
      await alice.page.getByLabel("Message", { exact: true }).fill(body);
      await alice.page.getByRole("button", { name: "Send" }).click();
      await tickOf(alice.page, body).and(alice.page.locator('[data-state="sending"]')).waitFor();
    }
    await alice.page.reload();
    for (const body of ["kept 1", "kept 2"]) {
      await tickOf(alice.page, body).and(alice.page.locator('[data-state="sending"]')).waitFor();
    }
    relay.heal(); // the app's next attempt gets through
    for (const body of ["kept 1", "kept 2"]) {
      await tickOf(alice.page, body).and(alice.page.locator('[data-state="sent"], [data-state="delivered"], [data-state="read"]')).waitFor();
    }
    await bob.page.locator("#messages li", { hasText: "kept 2" }).waitFor();
    const seen = await bodies(bob.page);
    assert.deepEqual(seen.filter((b) => b.startsWith("kept ")), ["kept 1", "kept 2"], "once each, in order");
    assert.deepEqual(seen.slice(-2), ["kept 1", "kept 2"]);
    assert.deepEqual(await alice.page.evaluate(() => Object.keys(localStorage).filter((k) => k.startsWith("mqchat.outbox."))), [], "nothing left to send");
  } finally {
    // The later tests use alice's page: give it back its direct connection.
    relay.heal();
    await alice.context.unroute("**/app/config.json");
    await alice.page.reload();
    await relay.close();
  }
});

test("a reload restores the conversation from the history, in order", async () => {
  const bob = people[1]!;
  const before = await bodies(bob.page);
  await bob.page.reload();
  await bob.page.locator("#messages li", { hasText: "typed offline" }).waitFor();
  const after = await bodies(bob.page);
  // The newest page (30) after the reload, the same messages in the same order.
  assert.deepEqual(after, before.slice(-after.length));
  await bob.page.getByRole("button", { name: "Load older messages" }).click();
  await bob.page.locator("#messages li", { hasText: "hello bob" }).waitFor();
  assert.deepEqual(await bodies(bob.page), before);
});

test("a third person cannot open their conversation", async () => {
  const carol = await signUp("carol");
  await carol.page.goto(`${stack.apiUrl}/#/c/${encodeURIComponent(conversation)}`);
  await carol.page.locator("#conversation-error", { hasText: "doesn't exist, or isn't yours" }).waitFor();
  assert.equal(await carol.page.locator("#messages li").count(), 0);
});

test("a group: create it, see the members, add one", async () => {
  const [alice, bob, carol] = [people[0]!, people[1]!, people[2]!];
  await alice.page.getByRole("button", { name: "Back to chats" }).click();
  await alice.page.locator("#new-group-box summary").click();
  await alice.page.getByLabel("Group name", { exact: true }).fill("climbing");
  await alice.page.getByLabel("Members (usernames, comma-separated)", { exact: true }).fill(bob.name);
  await alice.page.getByRole("button", { name: "Create group" }).click();
  await alice.page.waitForURL(/#\/c\//);
  await alice.page.getByRole("button", { name: "Members" }).click();
  await alice.page.getByLabel("Add member (username)", { exact: true }).fill(carol.name);
  await alice.page.getByRole("button", { name: "Add", exact: true }).click();
  await alice.page.locator("#members li", { hasText: carol.name }).waitFor();
  await alice.page.getByLabel("Message", { exact: true }).fill("ropes at 8?");
  await alice.page.getByRole("button", { name: "Send" }).click();
  await carol.page.goto(`${stack.apiUrl}/`);
  await carol.page.getByRole("link", { name: /climbing/ }).click();
  await carol.page.locator("#messages li", { hasText: "ropes at 8?" }).waitFor();
  await alice.page.screenshot({ path: join(IMG, "web-group.png") });
});

test("a group's admins promote, demote and rename; the others see it and get no such buttons", async () => {
  const [alice, bob, carol] = [people[0]!, people[1]!, people[2]!];
  // Alice is on the group's screen with its members shown (the test before).
  await alice.page.getByRole("button", { name: `Make admin: ${bob.name}` }).click();
  await alice.page.locator("#members li", { hasText: `${bob.name} (admin)` }).waitFor();
  await alice.page.getByLabel("New group name", { exact: true }).fill("bouldering");
  await alice.page.getByRole("button", { name: "Rename", exact: true }).click();
  await alice.page.locator("#title", { hasText: "bouldering" }).waitFor();
  await carol.page.locator("#messages li.event", { hasText: "bouldering" }).waitFor();
  await carol.page.getByRole("button", { name: "Members" }).click();
  await carol.page.locator("#members li", { hasText: `${bob.name} (admin)` }).waitFor();
  assert.equal(await carol.page.locator("#rename-group").isVisible(), false);
  assert.equal(await carol.page.getByRole("button", { name: /^(Make admin|Dismiss as admin|Remove)/ }).count(), 0);
  await alice.page.getByRole("button", { name: `Dismiss as admin: ${bob.name}` }).click();
  await alice.page.getByRole("button", { name: `Make admin: ${bob.name}` }).waitFor();
  await carol.page.getByRole("button", { name: "Back to chats" }).click();
  await carol.page.getByRole("link", { name: /bouldering/ }).waitFor();
});
