/**
 * The web app: the SDK and a few DOM functions, no framework. It keeps the bearer
 * token and a device name in localStorage, never the password (which signs in once);
 * MQTT signs in with the short-lived credential the SDK fetches. The route is in the
 * hash (`#/c/<id>`), so a reload reopens the conversation, from the history API.
 */

import {
  ChatClient,
  HistoryApi,
  MqchatError,
  type Conversation,
  type DownMessage,
  type Receipt,
  storageOutbox,
} from "../sdk/index.js";

const $ = <T extends HTMLElement = HTMLElement>(id: string) => document.getElementById(id) as T;
const PAGE = 30;
const OFFLINE = "You are offline: messages will be sent when the connection is back.";

const FRIENDLY: Record<string, string> = {
  unauthorized: "Wrong username or password.",
  username_taken: "That username is taken.",
  invalid_username: "Usernames are 2–32 characters: a–z, 0–9, _ and . (starting with a letter or digit).",
  weak_password: "Choose a longer or less common password (at least 8 characters, not your username).",
  unknown_user: "There is no user by that name.",
  unknown_recipient: "There is no user by that name.",
  unknown_conversation: "This conversation doesn't exist, or isn't yours.",
  rate_limited: "Too many attempts: wait a moment and try again.",
  unreachable: "The server can't be reached. Check your connection.",
  forbidden: "Only the group's admins can do that.",
  already_member: "Already in the group.",
  not_member: "Not in the group.",
  too_many_devices: "Too many devices signed in to this account.",
  body_too_large: "That message is too long (4,096 characters at most).",
};

function say(error: unknown): string {
  if (error instanceof MqchatError) {
    const text = FRIENDLY[error.code] ?? error.detail;
    return error.code === "rate_limited" && error.retryAfter ? `${text} (${error.retryAfter} s)` : text;
  }
  return String(error);
}

interface Shown {
  conversation: string;
  seq?: number;
  id: string;
  from: string;
  body: string;
  sent_at?: string;
  event?: string | null;
  pending?: boolean;
  failed?: string;
  group?: { delivered: number; read: number; members: number };
}

const state = {
  api: null as HistoryApi | null,
  chat: null as ChatClient | null,
  me: "",
  conversations: new Map<string, Conversation>(),
  presence: new Map<string, { state: string; at: string }>(),
  typing: new Map<string, { from: string; until: number }>(),
  messages: new Map<string, Map<string, Shown>>(), // conversation (or "to:user") -> id -> message
  hasOlder: new Map<string, boolean>(),
  peer: new Map<string, { delivered: number; read: number }>(), // 1:1 cursors of the other
  open: null as { conversation?: string; to?: string } | null,
};

function show(screen: "auth" | "list" | "conversation"): void {
  for (const id of ["auth", "list", "conversation"]) $(id).hidden = id !== screen;
}

function status(text: string): void {
  const box = $("status");
  box.textContent = text;
  box.hidden = text === "";
}

function device(): string {
  let name = localStorage.getItem("mqchat.device");
  if (!name) {
    name = `web-${crypto.randomUUID().slice(0, 8)}`;
    localStorage.setItem("mqchat.device", name);
  }
  return name;
}

function outboxKey(): string {
  return `mqchat.outbox.${device()}`;
}

async function mqttUrl(): Promise<string> {
  const config = (await (await fetch("/app/config.json")).json()) as { mqtt_url: string };
  return config.mqtt_url.replace("{host}", location.hostname);
}

// -- signing in -----------------------------------------------------------------

async function authenticate(signUp: boolean): Promise<void> {
  const username = $<HTMLInputElement>("auth-username").value.trim();
  const passwordBox = $<HTMLInputElement>("auth-password");
  const api = new HistoryApi(location.origin);
  $("auth-error").textContent = "";
  try {
    const name = signUp ? await api.signUp(username, passwordBox.value) : username.toLowerCase();
    await api.signIn(name, passwordBox.value);
    passwordBox.value = ""; // used once; only the token stays
    localStorage.setItem("mqchat.token", api.token!);
    localStorage.setItem("mqchat.user", name);
    await start(api);
  } catch (error) {
    $("auth-error").textContent = say(error);
  }
}

async function start(api: HistoryApi): Promise<void> {
  state.api = api;
  api.onUnauthorized = () => void signOut("Your session ended: sign in again.");
  // What is still "sending…" when the page closes waits in localStorage for the next start.
  const outbox = storageOutbox(localStorage, outboxKey());
  const chat = new ChatClient({ api, mqttUrl: await mqttUrl(), device: device(), outbox });
  state.chat = chat;
  chat.on("message", onMessage);
  chat.on("receipt", onReceipt);
  chat.on("typing", (t) => {
    if (t.from === state.me) return;
    if (t.typing) state.typing.set(t.conversation, { from: t.from, until: Date.now() + 6000 });
    else state.typing.delete(t.conversation);
    renderHeader();
    setTimeout(renderHeader, 6100);
  });
  chat.on("presence", (p) => {
    state.presence.set(p.user, p);
    renderList();
    renderHeader();
  });
  chat.on("connection", (c) => {
    if (c.connected) status("");
    else if (!navigator.onLine) status(OFFLINE);
    else status(`Connection lost, retrying${c.retryIn ? ` in ${Math.ceil(c.retryIn / 1000)} s` : ""}…`);
    if (c.connected) flushPendingView();
  });
  chat.on("error", (e) => {
    const shown = e.id ? findShown(e.id) : undefined;
    if (shown) {
      // A message restored from an earlier run, refused now: nobody awaits its send().
      shown.failed = say(e);
      if (state.open) renderMessages(false);
    }
    $("list-error").textContent = say(e);
  });
  state.me = localStorage.getItem("mqchat.user") ?? "";
  const connect = async (): Promise<void> => {
    try {
      await chat.connect();
      state.me = chat.username; // the server's spelling of the name
      localStorage.setItem("mqchat.user", state.me);
      status("");
    } catch (error) {
      if (error instanceof MqchatError && error.code === "unauthorized") return signOut(say(error));
      if (state.chat !== chat) return;
      status(`${say(error)} Retrying…`);
      setTimeout(() => void connect(), 3000);
    }
  };
  // What an earlier run left unsent shows at once, as "sending…", before the broker answers.
  await chat.restoreOutbox();
  showRestored(chat);
  // The screens need only the history API: they do not wait for the broker (which may
  // be out of reach for a while, with messages still "sending…").
  const connecting = connect();
  $("me").textContent = state.me;
  route();
  await connecting;
  $("me").textContent = state.me;
}

async function signOut(message = ""): Promise<void> {
  localStorage.removeItem("mqchat.token");
  localStorage.removeItem("mqchat.user");
  const chat = state.chat;
  state.chat = null;
  state.api = null;
  await chat?.close();
  // Unsent messages are this person's: they do not wait for the next one to sign in.
  localStorage.removeItem(outboxKey());
  state.conversations.clear();
  state.messages.clear();
  location.hash = "";
  show("auth");
  $("auth-error").textContent = message;
  $("auth-username").focus();
}

// -- the conversation list --------------------------------------------------------

async function refreshList(): Promise<void> {
  if (!state.api) return;
  const list = await state.api.conversations();
  state.conversations = new Map(list.map((c) => [c.id, c]));
  for (const c of list) if (c.kind === "direct") state.chat?.watchPresence(peerOf(c));
  renderList();
}

function peerOf(c: Conversation): string {
  return c.members.find((m) => m !== state.me) ?? state.me;
}

function titleOf(c: Conversation): string {
  return c.kind === "group" ? (c.name ?? "group") : peerOf(c);
}

function renderList(): void {
  const ul = $("conversations");
  ul.replaceChildren(
    ...[...state.conversations.values()].map((c) => {
      const li = document.createElement("li");
      const a = document.createElement("a");
      a.href = `#/c/${encodeURIComponent(c.id)}`;
      const name = document.createElement("span");
      name.className = "name";
      name.textContent = titleOf(c);
      if (c.kind === "direct" && state.presence.get(peerOf(c))?.state === "online") {
        const dot = document.createElement("span");
        dot.className = "dot";
        dot.setAttribute("aria-label", "online");
        dot.setAttribute("role", "img");
        name.append(dot);
      }
      const last = document.createElement("span");
      last.className = "last";
      last.textContent = c.last_message ? `${c.last_message.from === state.me ? "You: " : ""}${c.last_message.body}` : "";
      a.append(name);
      if (c.unread > 0) {
        const badge = document.createElement("span");
        badge.className = "badge";
        badge.textContent = String(c.unread);
        badge.setAttribute("aria-label", `${c.unread} unread`);
        a.append(badge);
      }
      a.append(last);
      li.append(a);
      return li;
    }),
  );
  if (state.conversations.size === 0) {
    const li = document.createElement("li");
    li.textContent = "No chats yet: start one above.";
    li.style.padding = ".75rem";
    ul.append(li);
  }
}

async function startChat(username: string): Promise<void> {
  $("list-error").textContent = "";
  const name = username.trim().toLowerCase();
  const existing = [...state.conversations.values()].find((c) => c.kind === "direct" && peerOf(c) === name);
  if (existing) {
    location.hash = `#/c/${encodeURIComponent(existing.id)}`;
    return;
  }
  // No probe first: the API tells presence to contacts only, and a stranger is not one
  // yet. A name with nobody behind it is refused at the first message (unknown_recipient).
  state.chat?.watchPresence(name);
  location.hash = `#/to/${encodeURIComponent(name)}`;
}

// -- a conversation ---------------------------------------------------------------

function bucket(key: string): Map<string, Shown> {
  let map = state.messages.get(key);
  if (!map) state.messages.set(key, (map = new Map()));
  return map;
}

function openKey(): string | null {
  const open = state.open;
  if (!open) return null;
  return open.conversation ?? `to:${open.to}`;
}

async function openConversation(conversation: string): Promise<void> {
  state.open = { conversation };
  show("conversation");
  $("conversation-error").textContent = "";
  $("messages").replaceChildren();
  $("title").textContent = "";
  $("subtitle").textContent = "";
  const known = state.conversations.get(conversation);
  $("members-toggle").hidden = known?.kind !== "group";
  $("members-panel").hidden = true;
  try {
    const page = await state.api!.messages(conversation, { limit: PAGE });
    if (state.open?.conversation !== conversation) return;
    const map = bucket(conversation);
    for (const m of page.messages) map.set(m.id, { ...m });
    state.hasOlder.set(conversation, page.has_more);
    if (!state.conversations.has(conversation)) await refreshList();
    $("members-toggle").hidden = state.conversations.get(conversation)?.kind !== "group";
    await loadTicks(conversation);
  } catch (error) {
    $("conversation-error").textContent = say(error);
    $("composer").hidden = true;
    return;
  }
  $("composer").hidden = false;
  renderHeader();
  renderMessages(true);
  markRead();
  $("composer-text").focus();
}

async function loadTicks(conversation: string): Promise<void> {
  // Where the other side is, for the ticks of what was sent before this page loaded.
  const c = state.conversations.get(conversation);
  const mine = [...bucket(conversation).values()].filter((m) => m.from === state.me && m.seq && !m.event).at(-1);
  if (!c || !mine) return;
  const trace = await state.api!.trace(mine.id);
  if (c.kind === "direct") {
    const peer = state.peer.get(conversation) ?? { delivered: 0, read: 0 };
    if (trace.delivered >= trace.members) peer.delivered = Math.max(peer.delivered, mine.seq!);
    if (trace.read >= trace.members) peer.read = Math.max(peer.read, mine.seq!);
    state.peer.set(conversation, peer);
  } else {
    mine.group = { delivered: trace.delivered, read: trace.read, members: trace.members };
  }
}

async function loadOlder(): Promise<void> {
  const conversation = state.open?.conversation;
  if (!conversation) return;
  const map = bucket(conversation);
  const oldest = Math.min(...[...map.values()].map((m) => m.seq ?? Infinity));
  try {
    const page = await state.api!.messages(conversation, { before: oldest, limit: PAGE });
    for (const m of page.messages) map.set(m.id, { ...m });
    state.hasOlder.set(conversation, page.has_more);
    const scroller = $("scroller");
    const fromBottom = scroller.scrollHeight - scroller.scrollTop;
    renderMessages(false);
    scroller.scrollTop = scroller.scrollHeight - fromBottom;
  } catch (error) {
    $("conversation-error").textContent = say(error);
  }
}

function renderHeader(): void {
  const key = openKey();
  if (!key) return;
  const c = state.open?.conversation ? state.conversations.get(state.open.conversation) : undefined;
  const peer = c ? (c.kind === "direct" ? peerOf(c) : null) : (state.open?.to ?? null);
  $("title").textContent = c ? titleOf(c) : (peer ?? "");
  const typing = state.open?.conversation ? state.typing.get(state.open.conversation) : undefined;
  let subtitle = "";
  if (typing && typing.until > Date.now()) {
    subtitle = c?.kind === "group" ? `${typing.from} is typing…` : "typing…";
  } else if (peer) {
    const p = state.presence.get(peer);
    if (p?.state === "online") subtitle = "online";
    else if (p) subtitle = `last seen ${new Date(p.at).toLocaleString()}`;
  } else if (c) {
    subtitle = c.members.join(", ");
  }
  $("subtitle").textContent = subtitle;
}

function tick(m: Shown, c: Conversation | undefined): { text: string; label: string; read: boolean } {
  if (m.failed) return { text: "not sent", label: `not sent: ${m.failed}`, read: false };
  if (m.pending || m.seq === undefined) return { text: "sending…", label: "sending…", read: false };
  if (c?.kind === "group") {
    const g = m.group;
    if (g && g.members > 0 && g.read >= g.members) return { text: "✓✓", label: "read", read: true };
    if (g && g.members > 0 && g.delivered >= g.members) return { text: "✓✓", label: "delivered", read: false };
    return { text: "✓", label: g ? `sent, read by ${g.read} of ${g.members}` : "sent", read: false };
  }
  const peer = state.peer.get(m.conversation) ?? { delivered: 0, read: 0 };
  if (peer.read >= m.seq) return { text: "✓✓", label: "read", read: true };
  if (peer.delivered >= m.seq) return { text: "✓✓", label: "delivered", read: false };
  return { text: "✓", label: "sent", read: false };
}

function renderMessages(toBottom: boolean): void {
  const key = openKey();
  if (!key) return;
  const c = state.open?.conversation ? state.conversations.get(state.open.conversation) : undefined;
  const scroller = $("scroller");
  const atBottom = toBottom || scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 40;
  const list = [...bucket(key).values()].sort(
    (a, b) => (a.seq ?? Number.MAX_SAFE_INTEGER) - (b.seq ?? Number.MAX_SAFE_INTEGER),
  );
  $("older").hidden = !(state.open?.conversation && state.hasOlder.get(state.open.conversation));
  $("messages").replaceChildren(
    ...list.map((m) => {
      const li = document.createElement("li");
      li.dataset.id = m.id;
      if (m.seq !== undefined) li.dataset.seq = String(m.seq);
      if (m.event) {
        li.className = "event";
        li.textContent = m.body;
        return li;
      }
      const mine = m.from === state.me;
      li.className = mine ? "mine" : "";
      if (!mine && c?.kind === "group") {
        const from = document.createElement("span");
        from.className = "from";
        from.textContent = m.from;
        li.append(from);
      }
      const body = document.createElement("span");
      body.className = "body";
      body.textContent = m.body;
      const meta = document.createElement("span");
      meta.className = "meta";
      meta.textContent = m.sent_at ? new Date(m.sent_at).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }) : "";
      if (mine) {
        const t = tick(m, c);
        const span = document.createElement("span");
        span.className = `tick${t.read ? " read" : ""}`;
        span.dataset.state = t.label.split(",")[0]!.replace("…", "");
        span.textContent = ` ${t.text}`;
        span.setAttribute("aria-label", t.label);
        span.title = t.label;
        meta.append(span);
      }
      li.append(body, meta);
      return li;
    }),
  );
  if (atBottom) scroller.scrollTop = scroller.scrollHeight;
}

function markRead(): void {
  const conversation = state.open?.conversation;
  if (!conversation || document.visibilityState !== "visible" || !state.chat) return;
  const seqs = [...bucket(conversation).values()].filter((m) => m.from !== state.me && m.seq).map((m) => m.seq!);
  if (seqs.length === 0) return;
  state.chat.markRead(conversation, Math.max(...seqs));
  const c = state.conversations.get(conversation);
  if (c && c.unread) {
    c.unread = 0;
    renderList();
  }
}

function send(text: string): void {
  const chat = state.chat;
  const open = state.open;
  if (!chat || !open || text.trim() === "") return;
  const id = crypto.randomUUID().replaceAll("-", "");
  const key = openKey()!;
  const shown: Shown = { conversation: open.conversation ?? "", id, from: state.me, body: text, pending: true };
  bucket(key).set(id, shown);
  renderMessages(true);
  const target = open.conversation ? { conversation: open.conversation } : { to: open.to! };
  chat.setTyping(open.conversation ?? "", false);
  chat
    .send(text, target, id)
    .then((sent) => {
      shown.pending = false;
      shown.seq = sent.seq;
      shown.conversation = sent.conversation;
      shown.sent_at ??= new Date().toISOString();
      if (!open.conversation) {
        // The first message of a new chat: from now on it has a conversation id.
        bucket(key).delete(id);
        bucket(sent.conversation).set(id, shown);
        state.messages.delete(key);
        if (state.open === open) location.hash = `#/c/${encodeURIComponent(sent.conversation)}`;
        void refreshList();
      }
      if (openKey() === key || openKey() === sent.conversation) renderMessages(false);
    })
    .catch((error) => {
      shown.failed = say(error);
      $("conversation-error").textContent = `Not sent: ${say(error)}`;
      renderMessages(false);
    });
}

/** The outbox an earlier run of the page left behind, shown as "sending…" where it belongs. */
function showRestored(chat: ChatClient): void {
  for (const p of chat.pending) {
    if (p.body === undefined || findShown(p.id)) continue;
    const key = p.conversation ?? `to:${p.to}`;
    bucket(key).set(p.id, { conversation: p.conversation ?? "", id: p.id, from: state.me, body: p.body, pending: true });
  }
}

function findShown(id: string): Shown | undefined {
  for (const map of state.messages.values()) {
    const shown = map.get(id);
    if (shown) return shown;
  }
  return undefined;
}

function flushPendingView(): void {
  if (state.open) renderMessages(false);
}

// -- events from the SDK -----------------------------------------------------------

function onMessage(m: DownMessage): void {
  const map = bucket(m.conversation);
  const mine = map.get(m.id);
  if (mine && mine.from === m.from) Object.assign(mine, m, { pending: false });
  else map.set(m.id, { ...m });
  const c = state.conversations.get(m.conversation);
  if (!c || m.event) {
    void refreshList();
  } else {
    c.last_message = { id: m.id, seq: m.seq, from: m.from, body: m.body, sent_at: m.sent_at };
    const isOpen = state.open?.conversation === m.conversation;
    if (m.from !== state.me && !isOpen) c.unread += 1;
    // Newest activity first, as the API orders them.
    state.conversations.delete(c.id);
    state.conversations = new Map([[c.id, c], ...state.conversations]);
    renderList();
  }
  if (state.open?.conversation === m.conversation) {
    renderMessages(false);
    if (m.from !== state.me) markRead();
    state.typing.delete(m.conversation);
    renderHeader();
  }
}

function onReceipt(r: Receipt): void {
  if (r.status === "sent") {
    // Usually the send() promise says it; a message restored from an earlier run has none.
    const shown = r.id ? findShown(r.id) : undefined;
    if (shown?.pending) {
      shown.pending = false;
      shown.seq = r.seq;
      if (!shown.conversation) {
        for (const map of state.messages.values()) map.delete(shown.id);
        shown.conversation = r.conversation;
        void refreshList();
      }
      bucket(r.conversation).set(shown.id, shown);
      shown.sent_at ??= new Date().toISOString();
      if (state.open) renderMessages(false);
    }
    return;
  }
  if (r.by === state.me) {
    // This user read it on another device: the unread count goes.
    const c = state.conversations.get(r.conversation);
    if (r.status === "read" && c) {
      c.unread = 0;
      renderList();
    }
    return;
  }
  if (r.members != null) {
    const m = [...bucket(r.conversation).values()].find((x) => x.seq === r.seq);
    if (m) m.group = { delivered: r.delivered ?? 0, read: r.read ?? 0, members: r.members };
  } else {
    const peer = state.peer.get(r.conversation) ?? { delivered: 0, read: 0 };
    peer.delivered = Math.max(peer.delivered, r.seq);
    if (r.status === "read") peer.read = Math.max(peer.read, r.seq);
    state.peer.set(r.conversation, peer);
  }
  if (state.open?.conversation === r.conversation) renderMessages(false);
}

// -- groups -----------------------------------------------------------------------

async function renderMembers(): Promise<void> {
  const conversation = state.open?.conversation;
  if (!conversation) return;
  try {
    const members = await state.api!.members(conversation);
    const amAdmin = members.some((m) => m.username === state.me && m.role === "admin");
    $("add-member").hidden = !amAdmin;
    $("rename-group").hidden = !amAdmin;
    const box = $<HTMLInputElement>("rename-group-name");
    if (document.activeElement !== box) box.value = state.conversations.get(conversation)?.name ?? "";
    $("members").replaceChildren(
      ...members.map((m) => {
        const li = document.createElement("li");
        li.textContent = `${m.username}${m.role === "admin" ? " (admin)" : ""}`;
        if (amAdmin && m.username !== state.me) {
          const remove = document.createElement("button");
          remove.type = "button";
          remove.className = "secondary";
          remove.textContent = "Remove";
          remove.setAttribute("aria-label", `Remove ${m.username}`);
          remove.onclick = () => void groupOp(() => state.chat!.removeMembers(conversation, [m.username]));
          // Admins make and unmake admins (the bridge refuses removing the last one).
          const role = document.createElement("button");
          role.type = "button";
          role.className = "secondary";
          const promote = m.role !== "admin";
          role.textContent = promote ? "Make admin" : "Dismiss as admin";
          role.setAttribute("aria-label", `${promote ? "Make admin" : "Dismiss as admin"}: ${m.username}`);
          role.onclick = () =>
            void groupOp(() => (promote ? state.chat!.promote : state.chat!.demote).call(state.chat!, conversation, [m.username]));
          li.append(role, remove);
        }
        return li;
      }),
    );
  } catch (error) {
    $("conversation-error").textContent = say(error);
  }
}

async function groupOp(op: () => Promise<unknown>): Promise<void> {
  $("conversation-error").textContent = "";
  try {
    await op();
    await refreshList();
    await renderMembers();
  } catch (error) {
    $("conversation-error").textContent = say(error);
  }
}

// -- wiring -----------------------------------------------------------------------

function route(): void {
  if (!state.api) return;
  const hash = location.hash;
  const conv = /^#\/c\/(.+)$/.exec(hash);
  const to = /^#\/to\/(.+)$/.exec(hash);
  if (conv) {
    void openConversation(decodeURIComponent(conv[1]!));
  } else if (to) {
    state.open = { to: decodeURIComponent(to[1]!) };
    show("conversation");
    $("conversation-error").textContent = "";
    $("members-toggle").hidden = true;
    $("members-panel").hidden = true;
    $("composer").hidden = false;
    renderHeader();
    renderMessages(true);
    $("composer-text").focus();
  } else {
    state.open = null;
    show("list");
    void refreshList().catch((e) => ($("list-error").textContent = say(e)));
  }
}

let lastTyping = 0;

function wire(): void {
  $("auth-form").addEventListener("submit", (e) => {
    e.preventDefault();
    void authenticate(false);
  });
  $("sign-up").addEventListener("click", () => {
    if ($<HTMLFormElement>("auth-form").reportValidity()) void authenticate(true);
  });
  $("sign-out").addEventListener("click", () => void signOut());
  $("back").addEventListener("click", () => (location.hash = ""));
  $("older").addEventListener("click", () => void loadOlder());
  $("new-chat").addEventListener("submit", (e) => {
    e.preventDefault();
    void startChat($<HTMLInputElement>("new-chat-user").value);
  });
  $("new-group").addEventListener("submit", (e) => {
    e.preventDefault();
    const name = $<HTMLInputElement>("new-group-name").value;
    const members = $<HTMLInputElement>("new-group-members").value.split(",").map((s) => s.trim().toLowerCase()).filter(Boolean);
    $("list-error").textContent = "";
    state.chat!.createGroup(name, members).then(
      (id) => (location.hash = `#/c/${encodeURIComponent(id)}`),
      (error) => ($("list-error").textContent = say(error)),
    );
  });
  $("members-toggle").addEventListener("click", () => {
    const panel = $("members-panel");
    panel.hidden = !panel.hidden;
    $("members-toggle").setAttribute("aria-expanded", String(!panel.hidden));
    if (!panel.hidden) void renderMembers();
  });
  $("add-member").addEventListener("submit", (e) => {
    e.preventDefault();
    const user = $<HTMLInputElement>("add-member-user");
    const conversation = state.open!.conversation!;
    void groupOp(() => state.chat!.addMembers(conversation, [user.value.trim().toLowerCase()])).then(() => (user.value = ""));
  });
  $("rename-group").addEventListener("submit", (e) => {
    e.preventDefault();
    const conversation = state.open!.conversation!;
    const name = $<HTMLInputElement>("rename-group-name").value.trim();
    void groupOp(() => state.chat!.rename(conversation, name)).then(renderHeader);
  });
  $("leave").addEventListener("click", () => {
    const conversation = state.open!.conversation!;
    void groupOp(() => state.chat!.leaveGroup(conversation)).then(() => (location.hash = ""));
  });
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const box = $<HTMLInputElement>("composer-text");
    send(box.value);
    box.value = "";
  });
  $("composer-text").addEventListener("input", () => {
    const conversation = state.open?.conversation;
    if (conversation && Date.now() - lastTyping > 3000) {
      lastTyping = Date.now();
      state.chat?.setTyping(conversation, true);
    }
  });
  window.addEventListener("hashchange", route);
  // The browser knows first when the network goes: stop trying until it is back.
  window.addEventListener("offline", () => {
    state.chat?.pause();
    status(OFFLINE);
  });
  window.addEventListener("online", () => state.chat?.resume());
  document.addEventListener("visibilitychange", markRead);
}

wire();
const token = localStorage.getItem("mqchat.token");
if (token) {
  void start(new HistoryApi(location.origin, token));
} else {
  show("auth");
  $("auth-username").focus();
}
