// The appchat web client: sign in, conversation list, message view. Built on appchat.js.
import {
  AppChat, AppChatError, checkToken, tokenClaims, CONNECTING, ONLINE, OFFLINE, TOKEN_EXPIRED, REFUSED,
} from "/appchat.js";

const SESSION_KEY = "appchat.session";
const PAGE = 30; // messages per history page
const TYPING_SHOWN_MS = 5000; // how long "is typing" shows without news
const TYPING_EVERY_MS = 2000; // how often we tell others while the user types
const TYPING_IDLE_MS = 3000; // the user stopped typing this long ago: stop telling
const INBOX_REFRESH_MS = 30000; // staff: conversations nobody pushed to us about

const $ = (id) => document.getElementById(id);
const el = (tag, cls, text) => {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
};

let chat = null;
let me = null; // {sid, staff, application}
const conversations = new Map(); // channel -> {channel, application_id, update_at, unread, joined}
const threads = new Map(); // channel -> {messages: Map id -> message, hasMore, loadingOlder, readUpTo}
const pending = new Map(); // client_msg_id -> {channel, content, create_at, failed}
const typists = new Map(); // channel -> Map user_id -> timer
let openChannel = null;
let lastTypingSent = 0;
let lastInputAt = 0;
let typingTimer = null;
let inboxTimer = null;
let listsTimer = null;
let listsAttempt = 0;
let atBottom = true; // the thread was scrolled to its newest message (kept there as it grows)
let lastScrollTop = 0;

// --- formatting -------------------------------------------------------------------------------

const timeFmt = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });
const dayFmt = new Intl.DateTimeFormat(undefined, { weekday: "long", month: "long", day: "numeric" });

function dayLabel(date) {
  const today = new Date();
  const yesterday = new Date(Date.now() - 86400000);
  if (date.toDateString() === today.toDateString()) return "Today";
  if (date.toDateString() === yesterday.toDateString()) return "Yesterday";
  return dayFmt.format(date);
}

function shortTime(iso) {
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return "";
  if (date.toDateString() === new Date().toDateString()) return timeFmt.format(date);
  return date.toLocaleDateString(undefined, { month: "short", day: "numeric" });
}

// Who is who. A message may carry its sender's display name (`sender_name`, from the
// token's `name` claim); GetPresence, where the server has it, says which participants
// are staff. Without that news, the others in a customer's conversation are support, and
// those in a staff member's view customers.
const names = new Map(); // user id -> display name
const roles = new Map(); // user id -> true for staff, false for a customer (from GetPresence)
let presenceAnswered = true; // false once the server said it has no GetPresence

function learnName(m) {
  if (typeof m.sender_name === "string" && m.sender_name.trim()) names.set(m.sender_id, m.sender_name.trim());
}

function personName(userId) {
  if (userId === me.sid) return "You";
  const name = names.get(userId);
  const staff = roles.has(userId) ? roles.get(userId) : !me.staff;
  if (staff) return name ? `${name} (support)` : `Support #${userId}`;
  return name || "Customer";
}

async function loadPresence(channel) {
  if (!presenceAnswered) return;
  try {
    const result = await chat.call("Event.GetPresence", { session_channel: channel });
    for (const p of result.participants || []) {
      roles.set(p.user_id, Boolean(p.staff));
      if (typeof p.name === "string" && p.name.trim()) names.set(p.user_id, p.name.trim());
    }
    if (openChannel === channel) {
      renderThread();
      renderTyping();
    }
  } catch (err) {
    if (err.code === "unknown_event") presenceAnswered = false;
  }
}

function conversationTitle(c) {
  return `Request #${c.application_id}`;
}

function randomId() {
  if (globalThis.crypto && typeof crypto.randomUUID === "function") return crypto.randomUUID();
  return Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");
}

// --- signing in -------------------------------------------------------------------------------

function showSignin(error) {
  $("app").hidden = true;
  $("signin").hidden = false;
  $("signin-error").hidden = !error;
  $("signin-error").textContent = error || "";
}

async function devToken(body) {
  const response = await fetch("/dev/token", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  const doc = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(doc.error || `the server answered ${response.status}`);
  return doc;
}

async function joinDev(body) {
  try {
    const { token, sid } = await devToken(body);
    start({ token, sid, dev: body });
  } catch (err) {
    showSignin(`Could not join: ${err.message}`);
  }
}

async function signinWithToken(event) {
  event.preventDefault();
  const form = event.target;
  const token = form.token.value.trim();
  const claims = tokenClaims(token);
  if (claims.admin_id == null && claims.request_id == null) {
    showSignin("This does not look like an appchat token (no admin_id or request_id claim).");
    return;
  }
  if (Number(claims.exp) * 1000 <= Date.now()) {
    showSignin("This token has expired. Ask for a new one.");
    return;
  }
  const sid = Number(form.sid.value || claims.sid || claims.sub || claims.admin_id);
  if (!Number.isSafeInteger(sid) || sid < 1) {
    showSignin("This token names no participant: enter your participant id.");
    return;
  }
  // Only the server can tell a token it refuses (another key, its clock, the sid): ask it
  // before signing in, since a browser cannot read why a WebSocket handshake failed.
  const button = form.querySelector("button[type=submit]");
  button.disabled = true;
  const verdict = await checkToken(location.origin, token, sid);
  button.disabled = false;
  if (verdict && !verdict.ok) {
    showSignin(`This token was refused: ${verdict.message}.`);
    return;
  }
  start({ token, sid });
}

function signOut() {
  sessionStorage.removeItem(SESSION_KEY);
  location.reload();
}

// --- the session ------------------------------------------------------------------------------

function start(session) {
  sessionStorage.setItem(SESSION_KEY, JSON.stringify(session));
  const claims = tokenClaims(session.token);
  me = {
    sid: Number(session.sid),
    staff: claims.admin_id != null,
    application: claims.request_id != null ? Number(claims.request_id) : null,
  };
  $("signin").hidden = true;
  $("app").hidden = false;
  $("who").textContent = me.staff
    ? `Staff member #${me.sid}`
    : `Customer #${me.sid} · request #${me.application}`;
  $("list-title").textContent = me.staff ? "Inbox" : "Your request";
  document.body.dataset.role = me.staff ? "staff" : "customer";

  const scheme = location.protocol === "https:" ? "wss" : "ws";
  chat = new AppChat({
    url: `${scheme}://${location.host}/ws?sid=${me.sid}`,
    token: session.token,
    backoffMax: 8000,
    // A dev session mints its next token itself; a real page would ask its backend.
    getToken: session.dev
      ? async () => {
          const { token } = await devToken(session.dev);
          sessionStorage.setItem(SESSION_KEY, JSON.stringify({ ...session, token }));
          return token;
        }
      : null,
  });
  chat.on("state", onState);
  chat.on("message", ({ message }) => onMessage(message));
  chat.on("read", onRead);
  chat.on("typing", onTyping);
  chat.on("resumed", () => {
    if (chat.state === ONLINE) $("status").textContent = "Online";
    refreshStatuses();
  });
  chat.on("error", ({ error, during, retryIn }) => {
    if (during === "resume" && retryIn !== undefined) {
      // appchat.js tries again by itself: say so, quietly.
      const seconds = Math.max(1, Math.round(retryIn / 1000));
      $("status").textContent = `Catching up · retrying in ${seconds}s`;
      return;
    }
    if (error && error.code && !["offline", "disconnected"].includes(error.code)) {
      showBanner(`Something went wrong: ${error.message}`);
    }
  });
  chat.start();
}

function onState({ state, retryIn, reason }) {
  const status = $("status");
  status.dataset.state = state;
  $("retry").hidden = state !== OFFLINE;
  if (state === ONLINE) {
    status.textContent = "Online";
    hideBanner();
    loadLists();
    clearInterval(inboxTimer);
    if (me.staff) inboxTimer = setInterval(loadLists, INBOX_REFRESH_MS);
  } else if (state === CONNECTING) {
    status.textContent = "Connecting…";
  } else if (state === OFFLINE) {
    const seconds = Math.max(1, Math.round((retryIn || 0) / 1000));
    status.textContent = `Offline · retrying in ${seconds}s`;
    clearInterval(inboxTimer);
  } else if (state === TOKEN_EXPIRED) {
    status.textContent = "Session expired";
    clearInterval(inboxTimer);
    showBanner("Your session has expired.", "Sign in again", signOut);
  } else if (state === REFUSED) {
    status.textContent = "Signed out";
    clearInterval(inboxTimer);
    showBanner(`This token was refused: ${reason}.`, "Sign in again", signOut);
  }
  renderComposerHint();
}

function showBanner(text, action, onAction) {
  const banner = $("banner");
  banner.textContent = text;
  if (action) {
    const button = el("button", "", action);
    button.type = "button";
    button.addEventListener("click", onAction);
    banner.append(button);
  }
  banner.hidden = false;
}

function hideBanner() {
  $("banner").hidden = true;
}

// --- the conversation list --------------------------------------------------------------------

async function loadLists() {
  try {
    if (!me.staff) {
      // A customer joins their request's conversation (creating it if need be), so that
      // replies reach them as pushes from the first one on.
      await chat.call("Event.AddConversation", { application_id: me.application });
    }
    const list = await chat.call("Event.GetConversationList", me.staff ? { all: true } : {});
    const unread = await chat.call("Event.GetUnreadInfo", {});
    const counts = new Map(unread.conversations.map((u) => [u.session_channel, u.unread]));
    for (const c of list.conversations) {
      const known = conversations.get(c.session_channel) || {};
      conversations.set(c.session_channel, {
        ...known,
        channel: c.session_channel,
        application_id: c.application_id,
        update_at: c.update_at,
        joined: counts.has(c.session_channel) || Boolean(known.joined),
        unread: c.session_channel === openChannel ? 0 : counts.get(c.session_channel) || 0,
      });
    }
    listsAttempt = 0;
    renderList();
    if (!openChannel && !me.staff && conversations.size) openConversation(list.conversations[0].session_channel);
    if (openChannel) markRead();
  } catch (err) {
    if (["offline", "disconnected"].includes(err.code)) return; // loaded again once online
    if (["timeout", "unavailable", "rate_limited"].includes(err.code) && chat.state === ONLINE) {
      // A server too busy to answer in time: ask again, less and less often.
      clearTimeout(listsTimer);
      listsTimer = setTimeout(loadLists, Math.min(15000, 1000 * 2 ** listsAttempt));
      listsAttempt += 1;
      return;
    }
    showBanner(`Could not load conversations: ${err.message}`);
  }
}

function renderList() {
  const ul = $("conversations");
  const items = [...conversations.values()].sort(
    (a, b) => (a.update_at < b.update_at ? 1 : a.update_at > b.update_at ? -1 : 0),
  );
  const focused = ul.contains(document.activeElement) ? document.activeElement.dataset.channel : null;
  ul.replaceChildren(
    ...items.map((c) => {
      const li = el("li", "conversation");
      li.dataset.channel = c.channel;
      li.classList.toggle("active", c.channel === openChannel);
      li.classList.toggle("unread", c.unread > 0);
      const avatar = el("div", "avatar", `#${String(c.application_id).slice(-3)}`);
      const body = el("div");
      body.append(el("div", "title", conversationTitle(c)));
      const typingNow = typists.get(c.channel)?.size;
      const sub = el(
        "div",
        typingNow ? "sub typing-now" : "sub",
        typingNow ? "typing…" : c.joined || !me.staff ? `Last activity ${shortTime(c.update_at)}` : "Not joined yet",
      );
      body.append(sub);
      const side = el("div", "side");
      const time = el("time", "", shortTime(c.update_at));
      time.dateTime = c.update_at;
      side.append(time);
      if (c.unread > 0) side.append(el("span", "badge", String(c.unread)));
      li.append(avatar, body, side);
      // A row is a button for the keyboard and screen readers: Tab reaches it, Enter or
      // Space opens it.
      li.tabIndex = 0;
      li.setAttribute("role", "button");
      if (c.channel === openChannel) li.setAttribute("aria-current", "true");
      li.setAttribute(
        "aria-label",
        `${conversationTitle(c)}${c.unread > 0 ? `, ${c.unread} unread` : ""}${typingNow ? ", typing" : ""}`,
      );
      li.addEventListener("click", () => openConversation(c.channel));
      li.addEventListener("keydown", (event) => {
        if (event.key === "Enter" || event.key === " ") {
          event.preventDefault();
          openConversation(c.channel);
        }
      });
      return li;
    }),
  );
  if (focused) ul.querySelector(`[data-channel="${CSS.escape(focused)}"]`)?.focus();
  $("list-empty").hidden = conversations.size > 0;
  const total = items.reduce((n, c) => n + (c.unread || 0), 0);
  $("total-unread").hidden = total === 0;
  $("total-unread").textContent = String(total);
  document.title = total ? `(${total}) appchat` : "appchat";
}

// --- the message view -------------------------------------------------------------------------

// On a narrow screen the page shows the list or the thread, not both (style.css).
function showView(view) {
  document.body.dataset.view = view;
}

async function openConversation(channel) {
  openChannel = channel;
  showView("thread");
  const c = conversations.get(channel);
  $("no-thread").hidden = true;
  $("thread").hidden = false;
  $("thread-title").textContent = c ? conversationTitle(c) : `Request #${channel}`;
  $("thread-sub").textContent = me.staff ? `Conversation of request ${channel}` : "Our support team answers here";
  renderList();
  renderTyping();
  let thread = threads.get(channel);
  if (!thread) {
    thread = { messages: new Map(), hasMore: false, loadingOlder: false, readUpTo: 0, loaded: false };
    threads.set(channel, thread);
  }
  renderThread({ stick: true });
  try {
    if (me.staff && c && !c.joined) {
      // Opening a conversation joins it: its messages then arrive live and count as unread.
      await chat.call("Event.AddConversation", { application_id: c.application_id });
      c.joined = true;
      renderList();
    }
    loadPresence(channel);
    if (!thread.loaded) {
      $("history-status").textContent = "Loading…";
      const page = await chat.history(channel, { limit: PAGE });
      for (const m of page.messages) thread.messages.set(m.id, m);
      thread.hasMore = page.hasMore;
      thread.loaded = true;
      if (openChannel === channel) renderThread({ stick: true });
      await fillViewport(channel);
    }
    markRead();
  } catch (err) {
    $("history-status").textContent = "";
    if (!["offline", "disconnected"].includes(err.code)) showBanner(`Could not open the conversation: ${err.message}`);
  }
  $("input").focus();
}

async function loadOlder(channel) {
  const thread = threads.get(channel);
  if (!thread || !thread.hasMore || thread.loadingOlder || !thread.messages.size) return;
  thread.loadingOlder = true;
  $("history-status").textContent = "Loading earlier messages…";
  try {
    const oldest = Math.min(...thread.messages.keys());
    const page = await chat.history(channel, { beforeId: oldest, limit: PAGE });
    for (const m of page.messages) thread.messages.set(m.id, m);
    thread.hasMore = page.hasMore;
    if (openChannel === channel) {
      const box = $("messages");
      const fromBottom = box.scrollHeight - box.scrollTop;
      renderThread();
      box.scrollTop = box.scrollHeight - fromBottom; // keep what the user looks at in place
    }
  } finally {
    thread.loadingOlder = false;
  }
}

async function fillViewport(channel) {
  const box = $("messages");
  while (openChannel === channel && threads.get(channel)?.hasMore && box.scrollHeight <= box.clientHeight) {
    await loadOlder(channel);
  }
}

function renderThread({ stick = false } = {}) {
  const thread = threads.get(openChannel);
  if (!thread) return;
  const box = $("messages");
  const nearBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
  const items = [...thread.messages.values()].sort((a, b) => a.id - b.id);
  const waiting = [...pending.entries()]
    .filter(([, p]) => p.channel === openChannel)
    .map(([clientMsgId, p]) => ({ ...p, client_msg_id: clientMsgId, sender_id: me.sid, status: -1 }));
  const nodes = [];
  let day = null;
  for (const m of [...items, ...waiting]) {
    learnName(m);
    const date = new Date(m.create_at);
    if (date.toDateString() !== day) {
      day = date.toDateString();
      const sep = el("li", "day", dayLabel(date));
      sep.dataset.key = `${openChannel}:day:${day}`;
      sep.dataset.sig = sep.textContent;
      nodes.push(sep);
    }
    const node = messageNode(m);
    node.dataset.key = `${openChannel}:${m.id || m.client_msg_id}`;
    node.dataset.sig = JSON.stringify([m.status, m.failed || null, m.content, Boolean(m.preview), node.querySelector(".sender")?.textContent || ""]);
    nodes.push(node);
  }
  patchChildren($("message-list"), nodes);
  $("thread-empty").hidden = !thread.loaded || nodes.length > 0;
  $("history-status").textContent = thread.hasMore ? "Scroll up for earlier messages" : thread.loaded && items.length ? "Beginning of the conversation" : "";
  if (stick || nearBottom) {
    box.scrollTop = box.scrollHeight;
    atBottom = true;
  }
}

// Make parent's children `nodes` (each with data-key and data-sig), keeping every child
// whose key and sig are unchanged where it is: the list is an aria-live region, and a
// screen reader should hear the new messages, not the whole thread again.
function patchChildren(parent, nodes) {
  const old = new Map([...parent.children].map((n) => [n.dataset.key, n]));
  const wanted = nodes.map((n) => {
    const kept = old.get(n.dataset.key);
    return kept && kept.dataset.sig === n.dataset.sig ? kept : n;
  });
  const keep = new Set(wanted);
  for (const n of [...parent.children]) if (!keep.has(n)) n.remove();
  let cursor = parent.firstElementChild;
  for (const n of wanted) {
    if (n === cursor) cursor = cursor.nextElementSibling;
    else parent.insertBefore(n, cursor);
  }
}

// Images get their height only once loaded, after the thread was scrolled: a reader at the
// newest message stays there whatever grows above it.
function keepAtBottom() {
  const box = $("messages");
  if (atBottom) box.scrollTop = box.scrollHeight;
}

function messageNode(m) {
  const own = m.sender_id === me.sid;
  const li = el("li", `msg ${own ? "own" : "theirs"}`);
  if (m.id) li.dataset.id = String(m.id);
  if (m.client_msg_id) li.dataset.client = m.client_msg_id;
  const bubble = el("div", "bubble");
  if (!own) bubble.append(el("div", "sender", personName(m.sender_id)));
  bubble.append(contentNode(m));
  const meta = el("div", "meta");
  const time = el("time", "", timeFmt.format(new Date(m.create_at)));
  time.dateTime = m.create_at;
  meta.append(time);
  let actions = null;
  if (own) {
    const ticks = el("span", "ticks");
    if (m.status === -1 && m.failed) {
      li.classList.add("failed");
      ticks.textContent = `Not sent: ${m.failed}`;
      ticks.dataset.state = "failed";
      actions = el("div", "failed-actions");
      const retry = el("button", "", "Retry");
      retry.type = "button";
      retry.addEventListener("click", () => sendPending(m.client_msg_id));
      const dismiss = el("button", "", "Dismiss");
      dismiss.type = "button";
      dismiss.title = "Remove it; its text goes back into the message box";
      dismiss.addEventListener("click", () => dismissPending(m.client_msg_id));
      actions.append(retry, dismiss);
    } else if (m.status === -1) {
      li.classList.add("pending");
      ticks.textContent = "Sending…";
    } else {
      ticks.textContent = m.status >= 1 ? "✓✓" : "✓";
      ticks.dataset.read = String(m.status >= 1);
      ticks.title = m.status >= 1 ? "Read" : "Delivered";
    }
    meta.append(ticks);
  }
  bubble.append(meta);
  if (actions) bubble.append(actions);
  li.append(bubble);
  return li;
}

// content_type 1 is text; 2 is an image: the reference of an upload (/files/<app>/<id>),
// fetched with the token (downloads need it) and shown through a blob: URL. Any other
// image content (a client of the original server sends its own backend's URL, or a file
// name) is shown as text, never fetched: no tracking pixel, no mixed content.
const IMAGE_REFERENCE = /^\/files\/([1-9][0-9]{0,18})\/[0-9a-f]{32}$/;
const imageUrls = new Map(); // path -> Promise of a blob: URL

function imageUrl(path) {
  let url = imageUrls.get(path);
  if (!url) {
    url = chat.fetchImage(path).then((blob) => URL.createObjectURL(blob));
    url.catch(() => imageUrls.delete(path)); // try again when shown again
    imageUrls.set(path, url);
  }
  return url;
}

function contentNode(m) {
  if (m.content_type === 2 && m.preview) {
    const img = el("img", "image");
    img.src = m.preview; // our own pending upload, still on this device
    img.alt = "image being sent";
    return img;
  }
  if (m.content_type === 2 && isUpload(m)) {
    const link = el("a", "image-link");
    link.href = "#";
    link.title = "Open the full image";
    const img = el("img", "image loading");
    img.alt = "image";
    link.append(img);
    imageUrl(`${m.content}/thumb`).then(
      (url) => {
        img.src = url;
        img.classList.remove("loading");
      },
      () => link.replaceChildren(el("div", "text image-missing", "Image unavailable")),
    );
    link.addEventListener("click", async (event) => {
      event.preventDefault();
      try {
        window.open(await imageUrl(m.content), "_blank", "noopener");
      } catch (err) {
        showBanner(`Could not open the image: ${err.message}`);
      }
    });
    return link;
  }
  if (m.content_type === 2) return foreignImage(m.content);
  return el("div", "text", m.content);
}

// An upload of this message's own conversation: the only image content fetched.
function isUpload(m) {
  const match = IMAGE_REFERENCE.exec(m.content);
  return Boolean(match) && match[1] === String(m.session_channel);
}

// An image the server does not hold: a link the user may follow (http or https), else
// the text as it came. The page itself requests nothing.
function foreignImage(content) {
  const box = el("div", "text foreign-image");
  let url = null;
  try {
    url = new URL(content);
  } catch {
    url = null;
  }
  if (url && (url.protocol === "https:" || url.protocol === "http:")) {
    const link = el("a", "image-url", content);
    link.href = url.href;
    link.target = "_blank";
    link.rel = "noopener noreferrer nofollow";
    link.title = "An image on another site (not loaded here)";
    box.append(link);
  } else {
    box.textContent = content;
  }
  return box;
}

function markRead() {
  const channel = openChannel;
  const thread = threads.get(channel);
  if (!thread || !thread.messages.size || document.visibilityState !== "visible") return;
  const newest = Math.max(...thread.messages.keys());
  const c = conversations.get(channel);
  if (newest > thread.readUpTo) {
    thread.readUpTo = newest;
    chat.read(channel, newest).catch(() => {
      thread.readUpTo = 0; // try again on the next occasion
    });
  }
  if (c && c.unread) {
    c.unread = 0;
    renderList();
  }
}

// After a reconnect: read ticks that changed while we were away.
async function refreshStatuses() {
  for (const [channel, thread] of threads) {
    if (!thread.loaded) continue;
    try {
      const page = await chat.call("Event.GetMessageList", { session_channel: channel, limit: PAGE });
      for (const m of page.Messages) if (thread.messages.has(m.id)) thread.messages.set(m.id, m);
    } catch {
      return;
    }
  }
  renderThread();
}

// --- pushes -----------------------------------------------------------------------------------

function onMessage(m) {
  const channel = m.session_channel;
  let c = conversations.get(channel);
  if (!c) {
    c = { channel, application_id: Number(channel), update_at: m.create_at, unread: 0, joined: true };
    conversations.set(channel, c);
  }
  if (m.create_at > c.update_at) c.update_at = m.create_at;
  if (m.client_msg_id && m.sender_id === me.sid) pending.delete(m.client_msg_id);
  learnName(m);
  const thread = threads.get(channel);
  if (thread && thread.loaded) thread.messages.set(m.id, m);
  if (m.sender_id !== me.sid) {
    clearTyping(channel, m.sender_id);
    if (channel === openChannel && document.visibilityState === "visible") markRead();
    else c.unread = (c.unread || 0) + 1;
  }
  renderList();
  if (channel === openChannel) renderThread({ stick: m.sender_id === me.sid });
}

function onRead({ session_channel: channel, reader_id: reader, message_id: upTo }) {
  const thread = threads.get(channel);
  if (reader === me.sid) {
    // read on another device of ours
    const c = conversations.get(channel);
    if (c) c.unread = 0;
    renderList();
    return;
  }
  if (!thread) return;
  for (const [id, m] of thread.messages) {
    if (id <= upTo && m.sender_id !== reader && m.status < 1) thread.messages.set(id, { ...m, status: 1 });
  }
  if (channel === openChannel) renderThread();
}

function onTyping({ session_channel: channel, user_id: userId }) {
  if (userId === me.sid) return;
  let who = typists.get(channel);
  if (!who) typists.set(channel, (who = new Map()));
  clearTimeout(who.get(userId));
  who.set(userId, setTimeout(() => clearTyping(channel, userId), TYPING_SHOWN_MS));
  renderTyping();
  renderList();
}

function clearTyping(channel, userId) {
  const who = typists.get(channel);
  if (!who || !who.has(userId)) return;
  clearTimeout(who.get(userId));
  who.delete(userId);
  if (!who.size) typists.delete(channel);
  renderTyping();
  renderList();
}

function renderTyping() {
  const who = [...(typists.get(openChannel)?.keys() || [])];
  $("typing").textContent = who.length ? `${who.map(personName).join(", ")} ${who.length > 1 ? "are" : "is"} typing…` : "";
}

// --- sending ----------------------------------------------------------------------------------

function renderComposerHint() {
  const offline = chat && chat.state !== ONLINE;
  $("input").placeholder = offline ? "Offline: messages are sent when the connection is back" : "Write a message…";
}

function submit(event) {
  event.preventDefault();
  const input = $("input");
  const content = input.value.trim();
  const channel = openChannel;
  if (!content || !channel) return;
  input.value = "";
  showComposerError(null);
  const clientMsgId = randomId();
  pending.set(clientMsgId, { channel, content, create_at: new Date().toISOString(), content_type: 1 });
  sendPending(clientMsgId);
}

// Send (or send again, with the same client_msg_id: never stored twice) a message
// waiting in `pending`; an image is uploaded first. A failure stays shown, with Retry and
// Dismiss, until one of them is chosen.
function sendPending(clientMsgId) {
  const p = pending.get(clientMsgId);
  if (!p) return;
  p.failed = null;
  if (p.channel === openChannel) renderThread({ stick: true });
  const sending = p.file
    ? chat.sendImage(p.channel, p.file, { clientMsgId })
    : chat.send(p.channel, p.content, { clientMsgId });
  sending.then(
    () => {
      pending.delete(clientMsgId);
      if (p.preview) URL.revokeObjectURL(p.preview);
      if (p.channel === openChannel) renderThread();
    },
    (err) => {
      if (pending.get(clientMsgId) !== p) return; // dismissed meanwhile
      p.failed = err instanceof AppChatError ? err.message : String(err);
      if (p.channel === openChannel) renderThread();
    },
  );
}

// Give up on a failed message: its text goes back into the message box (if that is
// empty), so nothing typed is lost.
function dismissPending(clientMsgId) {
  const p = pending.get(clientMsgId);
  if (!p) return;
  pending.delete(clientMsgId);
  if (p.preview) URL.revokeObjectURL(p.preview);
  const input = $("input");
  if (p.content_type === 1 && !input.value.trim()) input.value = p.content;
  renderThread();
  input.focus();
}

function showComposerError(text) {
  $("composer-error").hidden = !text;
  $("composer-error").textContent = text || "";
}

// What POST /upload takes (by content; the browser's type is checked here first, so that
// a PDF is refused at once instead of showing as a broken image).
const IMAGE_TYPES = ["image/png", "image/jpeg", "image/webp", "image/gif"];

// An image from the file picker: shown at once as pending, uploaded, then sent as a message.
function attach(event) {
  const input = event.target;
  const file = input.files && input.files[0];
  input.value = ""; // the same file may be picked again
  const channel = openChannel;
  if (!file || !channel) return;
  if (!IMAGE_TYPES.includes(file.type)) {
    showComposerError(`${file.name} is not an image that can be sent: choose a PNG, JPEG, WebP or GIF file.`);
    return;
  }
  showComposerError(null);
  const clientMsgId = randomId();
  const preview = URL.createObjectURL(file);
  pending.set(clientMsgId, { channel, content: "", content_type: 2, file, preview, create_at: new Date().toISOString() });
  sendPending(clientMsgId);
}

// While the user types, and for a few seconds after the last keystroke, tell the others every
// TYPING_EVERY_MS: twice the server's interval, so that a frame the network delayed is never
// dropped as too soon after the one before.
function onInput() {
  lastInputAt = Date.now();
  typingTick();
  if (!typingTimer) typingTimer = setInterval(typingTick, 500);
}

function typingTick() {
  const now = Date.now();
  const typing = openChannel && $("input").value.trim() && now - lastInputAt < TYPING_IDLE_MS;
  if (!typing) {
    clearInterval(typingTimer);
    typingTimer = null;
    return;
  }
  if (chat.state !== ONLINE || now - lastTypingSent < TYPING_EVERY_MS) return;
  lastTypingSent = now;
  chat.typing(openChannel).catch(() => {});
}

// --- wiring -----------------------------------------------------------------------------------

async function boot() {
  $("token-form").addEventListener("submit", signinWithToken);
  $("join-customer").addEventListener("submit", (event) => {
    event.preventDefault();
    const f = event.target.elements;
    joinDev({ role: "customer", id: Number(f.user.value), application_id: Number(f.application.value) });
  });
  $("join-staff").addEventListener("submit", (event) => {
    event.preventDefault();
    joinDev({ role: "staff", id: Number(event.target.elements.user.value) });
  });
  $("signout").addEventListener("click", signOut);
  $("back").addEventListener("click", () => {
    showView("list");
    $("conversations").querySelector(".active")?.focus();
  });
  $("retry").addEventListener("click", () => chat && chat.retryNow());
  $("composer").addEventListener("submit", submit);
  $("attach").addEventListener("change", attach);
  $("attach-button").addEventListener("click", () => $("attach").click());
  $("input").addEventListener("input", onInput);
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) submit(event);
  });
  $("messages").addEventListener("scroll", () => {
    const box = $("messages");
    // Only the reader scrolling up leaves the end: the browser also scrolls down by itself
    // (scroll anchoring) when something above the view grows.
    const up = box.scrollTop < lastScrollTop;
    lastScrollTop = box.scrollTop;
    if (box.scrollHeight - box.scrollTop - box.clientHeight < 80) atBottom = true;
    else if (up) atBottom = false;
    if (box.scrollTop < 40 && openChannel) loadOlder(openChannel);
  });
  new ResizeObserver(keepAtBottom).observe($("message-list"));
  document.addEventListener("visibilitychange", () => openChannel && markRead());

  let config = { dev: false };
  try {
    config = await (await fetch("/client-config.json")).json();
  } catch {
    // an older server: no dev buttons
  }
  $("dev-join").hidden = !config.dev;
  const saved = JSON.parse(sessionStorage.getItem(SESSION_KEY) || "null");
  if (saved && saved.token && !(Number(tokenClaims(saved.token).exp) * 1000 <= Date.now() && !saved.dev)) {
    start(saved);
  } else {
    showSignin();
  }
}

boot();
