// The conversations and their threads: loading them from the server, opening one, reading
// it, and the pushes (messages, read receipts, typing) that change them. The staff inbox
// follows the desk live (Event.SubscribeInbox, then ConversationUpdated pushes: desk.js);
// from a server without it, it polls.

import { ONLINE } from "/appchat.js";
import { followAgentAvailability, followDesk, mergeConversation, someoneAnswered } from "./desk.js";
import { $, isOffline, showBanner } from "./dom.js";
import { conversationTitle, learnName } from "./format.js";
import { customerWrote } from "./notify.js";
import { renderComposerHint, renderIfOpen, renderList, renderThread, renderTyping, showView } from "./render.js";
import { state } from "./state.js";

const PAGE = 30; // messages per history page
const TYPING_SHOWN_MS = 5000; // how long "is typing" shows without news
const INBOX_REFRESH_MS = 30000; // staff, from a server without SubscribeInbox: poll the list

// Online (again): load the lists now; offline: stop. Staff subscribe to the inbox first
// (a subscription made before is made again by appchat.js, whose "inbox" event then
// reloads the list: onInboxSubscribed), so that no change falls between the list and the
// pushes; a customer's page asks whether an agent is there.
export function followLists(online) {
  clearTimeout(state.timers.inbox);
  clearInterval(state.timers.inbox);
  clearInterval(state.timers.presence);
  if (!online) return;
  if (!state.me.staff) {
    loadLists();
    followAgentAvailability();
    return;
  }
  followDesk();
  if (state.inbox.mode === "polling") pollInbox();
  else if (state.chat.inboxFilter === null) subscribeInbox();
}

async function subscribeInbox() {
  const { chat, inbox, timers } = state;
  try {
    await chat.subscribeInbox("all"); // the tabs are drawn from every conversation
    inbox.mode = "live";
    inbox.attempt = 0;
  } catch (err) {
    if (isOffline(err)) return; // again once online
    if (err.code === "unknown_event") {
      pollInbox();
      return;
    }
    // A busy server: load the list meanwhile and ask again, less and less often.
    timers.inbox = setTimeout(subscribeInbox, Math.min(15000, 1000 * 2 ** inbox.attempt));
    inbox.attempt += 1;
  }
  loadLists();
}

function pollInbox() {
  state.inbox.mode = "polling";
  clearInterval(state.timers.inbox);
  loadLists();
  state.timers.inbox = setInterval(loadLists, INBOX_REFRESH_MS);
}

// appchat.js subscribed again (a new connection, Event.Resync): pushes may have been
// missed meanwhile, so the list is loaded again. filter null: the server no longer offers it.
export function onInboxSubscribed({ filter }) {
  if (filter === null) pollInbox();
  else loadLists();
}

async function loadLists() {
  const { chat, me, conversations, timers } = state;
  try {
    if (!me.staff) {
      // A customer joins their request's conversation (creating it if need be), so that
      // replies reach them as pushes from the first one on.
      await chat.call("Event.AddConversation", { application_id: me.application });
    }
    const list = await chat.call("Event.GetConversationList", me.staff ? { all: true } : {});
    const unread = await chat.call("Event.GetUnreadInfo", {});
    const counts = new Map(unread.conversations.map((u) => [u.session_channel, u.unread]));
    for (const doc of list.conversations) {
      const c = mergeConversation(doc);
      c.joined = counts.has(c.channel) || c.joined;
      c.unread = c.channel === state.openChannel ? 0 : counts.get(c.channel) || 0;
      if (c.joined) c.fresh = 0; // counted in unread now
    }
    timers.listsAttempt = 0;
    renderList();
    if (!state.openChannel && !me.staff && conversations.size) openConversation(list.conversations[0].session_channel);
    if (state.openChannel) markRead();
  } catch (err) {
    if (isOffline(err)) return; // loaded again once online
    if (["timeout", "unavailable", "rate_limited"].includes(err.code) && chat.state === ONLINE) {
      // A server too busy to answer in time: ask again, less and less often.
      clearTimeout(timers.lists);
      timers.lists = setTimeout(loadLists, Math.min(15000, 1000 * 2 ** timers.listsAttempt));
      timers.listsAttempt += 1;
      return;
    }
    showBanner(`Could not load conversations: ${err.message}`);
  }
}

export async function openConversation(channel) {
  const { chat, me } = state;
  if (state.openChannel !== channel) {
    // Another conversation: no edit, deletion or note mode carried over to it.
    state.editing = null;
    state.confirmDelete = null;
    state.highlight = null;
    state.noteMode = false;
    renderComposerHint();
  }
  state.openChannel = channel;
  showView("thread");
  const c = state.conversations.get(channel);
  $("no-thread").hidden = true;
  $("thread").hidden = false;
  $("thread-title").textContent = c ? conversationTitle(c) : `Request #${channel}`;
  $("thread-sub").textContent = me.staff ? `Conversation of request ${channel}` : "Our support team answers here";
  renderList();
  renderTyping();
  let thread = state.threads.get(channel);
  if (!thread) {
    thread = { messages: new Map(), hasMore: false, loadingOlder: false, readUpTo: 0, loaded: false };
    state.threads.set(channel, thread);
  }
  renderThread({ stick: true });
  try {
    if (c) c.fresh = 0;
    if (me.staff && c && !c.joined) {
      // Opening a conversation joins it: its messages then arrive live and count as unread.
      await chat.call("Event.AddConversation", { application_id: c.application_id });
      c.joined = true;
    }
    renderList();
    loadPresence(channel);
    if (!thread.loaded) {
      $("history-status").textContent = "Loading…";
      const page = await chat.history(channel, { limit: PAGE });
      for (const m of page.messages) remember(thread, m);
      thread.hasMore = page.hasMore;
      thread.loaded = true;
      renderIfOpen(channel, { stick: true });
      await fillViewport(channel);
    }
    markRead();
  } catch (err) {
    $("history-status").textContent = "";
    if (!isOffline(err)) showBanner(`Could not open the conversation: ${err.message}`);
  }
  focusComposer();
}

// The composer takes the focus once a conversation has opened, unless the user went on
// typing in another field that shows (the search box, say: its Enter must not go to the
// composer). A field of a form that is gone (the sign-in's) does not count.
function focusComposer() {
  const active = document.activeElement;
  const typing = active && active !== $("input") && active.matches("input, textarea, select, [contenteditable]");
  if (typing && active.offsetParent !== null) return;
  $("input").focus();
}

async function loadPresence(channel) {
  if (!state.presenceAnswered) return;
  try {
    const result = await state.chat.call("Event.GetPresence", { session_channel: channel });
    for (const p of result.participants || []) {
      state.roles.set(p.user_id, Boolean(p.staff));
      if (typeof p.name === "string" && p.name.trim()) state.names.set(p.user_id, p.name.trim());
    }
    if (state.openChannel === channel) {
      renderThread();
      renderTyping();
    }
  } catch (err) {
    if (err.code === "unknown_event") state.presenceAnswered = false;
  }
}

export function loadOlder(channel) {
  const thread = state.threads.get(channel);
  if (!thread || !thread.hasMore || !thread.messages.size) return Promise.resolve();
  if (!thread.loadingOlder) thread.loadingOlder = loadOlderPage(channel, thread);
  return thread.loadingOlder;
}

async function loadOlderPage(channel, thread) {
  $("history-status").textContent = "Loading earlier messages…";
  try {
    const oldest = Math.min(...thread.messages.keys());
    const page = await state.chat.history(channel, { beforeId: oldest, limit: PAGE });
    for (const m of page.messages) remember(thread, m);
    thread.hasMore = page.hasMore;
    if (state.openChannel === channel) {
      const box = $("messages");
      const fromBottom = box.scrollHeight - box.scrollTop;
      renderThread();
      box.scrollTop = box.scrollHeight - fromBottom; // keep what the user looks at in place
    }
  } finally {
    thread.loadingOlder = null;
  }
}

// A search result: open its conversation, load earlier pages until the message is there,
// and show it in the middle of the thread, highlighted and focused.
export async function revealMessage(channel, id) {
  await openConversation(channel);
  const thread = state.threads.get(channel);
  if (!thread || state.openChannel !== channel) return false;
  while (!thread.messages.has(id) && thread.hasMore && state.openChannel === channel) {
    const before = thread.messages.size;
    try {
      await loadOlder(channel);
    } catch (err) {
      if (!isOffline(err)) showBanner(`Could not load earlier messages: ${err.message}`);
      return false;
    }
    if (thread.messages.size === before && thread.hasMore) return false; // no progress
  }
  if (!thread.messages.has(id) || state.openChannel !== channel) return false;
  state.highlight = id;
  renderThread();
  const node = $("message-list").querySelector(`li[data-id="${id}"]`);
  if (!node) return false;
  node.scrollIntoView({ block: "center" });
  const box = $("messages");
  state.scroll.atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
  state.scroll.lastTop = box.scrollTop;
  node.focus({ preventScroll: true });
  return true;
}

async function fillViewport(channel) {
  const box = $("messages");
  while (state.openChannel === channel && state.threads.get(channel)?.hasMore && box.scrollHeight <= box.clientHeight) {
    await loadOlder(channel);
  }
}

export function markRead() {
  const channel = state.openChannel;
  const thread = state.threads.get(channel);
  if (!thread || !thread.messages.size || document.visibilityState !== "visible") return;
  const newest = Math.max(...thread.messages.keys());
  const c = state.conversations.get(channel);
  if (newest > thread.readUpTo) {
    thread.readUpTo = newest;
    state.chat.read(channel, newest).catch(() => {
      thread.readUpTo = 0; // try again on the next occasion
    });
  }
  if (c && c.unread) {
    c.unread = 0;
    renderList();
  }
}

// Keep a copy of a message the server sent. A read receipt (MessageRead) may have arrived
// after the server wrote this copy and before it got here: status only ever grows. An edit
// or a deletion the page knows of already (a higher rev) stays.
function remember(thread, m) {
  const known = thread.messages.get(m.id);
  if (!known) {
    thread.messages.set(m.id, m);
    return;
  }
  const newer = (known.rev ?? 0) > (m.rev ?? 0) ? known : m;
  thread.messages.set(m.id, { ...newer, status: Math.max(known.status ?? 0, m.status ?? 0) });
}

// A message was edited or deleted (Event.MessageUpdated, our own edit's reply, or what the
// catch-up after a reconnect found): the copy with the higher rev wins, in the thread and
// as the conversation's last message.
export function onMessageUpdated(m) {
  const channel = String(m.session_channel);
  const thread = state.threads.get(channel);
  if (thread && thread.messages.has(m.id)) remember(thread, m);
  const c = state.conversations.get(channel);
  if (c && c.last_message && c.last_message.id === m.id && (c.last_message.rev ?? 0) <= (m.rev ?? 0)) {
    c.last_message = m;
    renderList();
  }
  if (m.deleted && state.editing?.id === m.id) state.editing = null;
  if (m.deleted && state.confirmDelete === m.id) state.confirmDelete = null;
  renderIfOpen(channel);
}

// After a reconnect: read ticks that changed while we were away.
export async function refreshStatuses() {
  for (const [channel, thread] of state.threads) {
    if (!thread.loaded) continue;
    try {
      const page = await state.chat.call("Event.GetMessageList", { session_channel: channel, limit: PAGE });
      for (const m of page.Messages) if (thread.messages.has(m.id)) remember(thread, m);
    } catch {
      return;
    }
  }
  renderThread();
}

// --- pushes -----------------------------------------------------------------------------------

export function onMessage(m) {
  const { me } = state;
  const channel = m.session_channel;
  let c = state.conversations.get(channel);
  if (!c) {
    c = { channel, application_id: Number(channel), update_at: m.create_at, unread: 0, fresh: 0, joined: true };
    state.conversations.set(channel, c);
  }
  c.joined = true; // pushes reach participants only
  if (m.create_at > c.update_at) c.update_at = m.create_at;
  if (!c.last_message || m.id > c.last_message.id) c.last_message = m;
  if (m.client_msg_id && m.sender_id === me.sid) state.pending.delete(m.client_msg_id);
  learnName(m);
  const thread = state.threads.get(channel);
  if (thread && thread.loaded) remember(thread, m);
  if (m.sender_id !== me.sid) {
    customerWrote(m);
    someoneAnswered();
    clearTyping(channel, m.sender_id);
    if (channel === state.openChannel && document.visibilityState === "visible") markRead();
    else c.unread = (c.unread || 0) + 1;
  }
  renderList();
  renderIfOpen(channel, { stick: m.sender_id === me.sid });
}

export function onRead({ session_channel: channel, reader_id: reader, message_id: upTo }) {
  const thread = state.threads.get(channel);
  if (reader === state.me.sid) {
    // read on another device of ours
    const c = state.conversations.get(channel);
    if (c) c.unread = 0;
    renderList();
    return;
  }
  if (!thread) return;
  for (const [id, m] of thread.messages) {
    if (id <= upTo && m.sender_id !== reader && m.status < 1) thread.messages.set(id, { ...m, status: 1 });
  }
  renderIfOpen(channel);
}

export function onTyping({ session_channel: channel, user_id: userId }) {
  if (userId === state.me.sid) return;
  let who = state.typists.get(channel);
  if (!who) state.typists.set(channel, (who = new Map()));
  clearTimeout(who.get(userId));
  who.set(userId, setTimeout(() => clearTyping(channel, userId), TYPING_SHOWN_MS));
  renderTyping();
  renderList();
}

function clearTyping(channel, userId) {
  const who = state.typists.get(channel);
  if (!who || !who.has(userId)) return;
  clearTimeout(who.get(userId));
  who.delete(userId);
  if (!who.size) state.typists.delete(channel);
  renderTyping();
  renderList();
}
