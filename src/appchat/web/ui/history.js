// A thread's history: editing one's own messages inline (Enter saves, Esc cancels),
// deleting them (staff: any) after a confirmation, and the search box, whose results open
// their conversation at the message. render.js draws the editor, the confirmation and the
// results' place; appchat.js's "messageUpdated" event brings the changes (conversations.js).

import { $, el, isOffline, showBanner } from "./dom.js";
import { conversationTitle, personName, shortTime } from "./format.js";
import { revealMessage } from "./conversations.js";
import { renderThread } from "./render.js";
import { state } from "./state.js";

const SEARCH_PAGE = 20;

// --- edit and delete --------------------------------------------------------------------------

function messageOf(id) {
  return state.threads.get(state.openChannel)?.messages.get(id) || null;
}

function focusMessage(id, action) {
  const li = $("message-list").querySelector(`li[data-id="${id}"]`);
  const target = li?.querySelector(action ? `[data-action="${action}"]` : ".edit-input");
  if (target) target.focus();
  else $("input").focus();
}

export function startEdit(id) {
  const m = messageOf(id);
  if (!m || m.deleted) return;
  state.confirmDelete = null;
  state.editing = { id, draft: m.content, error: null, saving: false };
  renderThread();
  const input = $("message-list").querySelector(`li[data-id="${id}"] .edit-input`);
  if (input) {
    input.focus();
    input.setSelectionRange(input.value.length, input.value.length);
  }
}

export function cancelEdit() {
  const id = state.editing?.id;
  state.editing = null;
  renderThread();
  if (id) focusMessage(id, "edit");
}

export async function saveEdit() {
  const { editing } = state;
  if (!editing || editing.saving) return;
  const m = messageOf(editing.id);
  const content = String(editing.draft ?? "").trim();
  if (!m) {
    state.editing = null;
    renderThread();
    return;
  }
  if (content === m.content) {
    cancelEdit(); // nothing changed
    return;
  }
  if (!content) {
    editing.error = "A message cannot be empty: delete it instead.";
    renderThread();
    focusMessage(editing.id);
    return;
  }
  editing.saving = true;
  editing.error = null;
  renderThread();
  try {
    await state.chat.editMessage(editing.id, content); // "messageUpdated" shows it
    if (state.editing === editing) {
      state.editing = null;
      renderThread();
      focusMessage(editing.id, "edit");
    }
  } catch (err) {
    if (state.editing !== editing) return;
    editing.saving = false;
    editing.error = isOffline(err) ? "Offline: try again once the connection is back." : `Not saved: ${err.message}`;
    renderThread();
    focusMessage(editing.id);
  }
}

export function askDelete(id) {
  state.editing = null;
  state.confirmDelete = id;
  renderThread();
  focusMessage(id, "confirm-delete");
}

export function cancelDelete() {
  const id = state.confirmDelete;
  state.confirmDelete = null;
  renderThread();
  if (id) focusMessage(id, "delete");
}

export async function confirmDelete() {
  const id = state.confirmDelete;
  if (!id) return;
  state.confirmDelete = null;
  renderThread();
  try {
    await state.chat.deleteMessage(id); // "messageUpdated" shows the stub
    $("input").focus();
  } catch (err) {
    showBanner(isOffline(err) ? "Offline: the message was not deleted." : `Could not delete the message: ${err.message}`);
  }
}

// The thread's clicks and keys for the buttons render.js draws (data-action). True when
// the event was one of them.
export function onThreadClick(event) {
  const button = event.target.closest("button[data-action]");
  const id = Number(button?.closest("li.msg")?.dataset.id);
  if (!button || !id) return false;
  switch (button.dataset.action) {
    case "edit":
      startEdit(id);
      return true;
    case "cancel-edit":
      cancelEdit();
      return true;
    case "save-edit":
      event.preventDefault();
      saveEdit();
      return true;
    case "delete":
      askDelete(id);
      return true;
    case "cancel-delete":
      cancelDelete();
      return true;
    case "confirm-delete":
      confirmDelete();
      return true;
    default:
      return false;
  }
}

export function setupHistory() {
  const list = $("message-list");
  list.addEventListener("submit", (event) => {
    if (!event.target.closest(".edit-form")) return;
    event.preventDefault();
    saveEdit();
  });
  list.addEventListener("input", (event) => {
    if (event.target.classList.contains("edit-input") && state.editing) state.editing.draft = event.target.value;
  });
  list.addEventListener("keydown", (event) => {
    if (event.target.classList.contains("edit-input")) {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        saveEdit();
      } else if (event.key === "Escape") {
        event.preventDefault();
        cancelEdit();
      }
    } else if (event.key === "Escape" && state.confirmDelete) {
      event.preventDefault();
      cancelDelete();
    }
  });
  setupSearch();
}

// --- search -----------------------------------------------------------------------------------

function setupSearch() {
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const query = $("search-input").value.trim();
    if (query) search(query);
    else closeSearch();
  });
  $("search-input").addEventListener("keydown", (event) => {
    if (event.key === "Escape" && state.search) {
      event.preventDefault();
      closeSearch();
    }
  });
  // A cleared box (the field's own ✕) closes the results.
  $("search-input").addEventListener("input", () => {
    if (!$("search-input").value.trim() && state.search) closeSearch(false);
  });
  $("search-close").addEventListener("click", () => closeSearch());
  $("search-more").addEventListener("click", () => state.search && search(state.search.query, true));
  $("search-list").addEventListener("click", (event) => {
    const button = event.target.closest("button[data-message]");
    if (button) openResult(button.dataset.channel, Number(button.dataset.message));
  });
}

// Staff search every conversation; a customer their own (the server decides which).
async function search(query, more = false) {
  const previous = state.search;
  const s = more && previous ? previous : { query, results: [], hasMore: false, nextCursor: null };
  s.loading = true;
  s.error = null;
  state.search = s;
  renderSearch();
  try {
    const page = await state.chat.searchMessages(query, { limit: SEARCH_PAGE, cursor: more ? s.nextCursor : null });
    if (state.search !== s) return; // another search meanwhile
    s.results.push(...page.results.filter((r) => r && r.message));
    s.hasMore = page.hasMore && page.nextCursor !== null;
    s.nextCursor = page.nextCursor;
  } catch (err) {
    if (state.search !== s) return;
    if (isOffline(err)) s.error = "Offline: search again once the connection is back.";
    else if (err.code === "unknown_event") s.error = "This server cannot search messages.";
    else s.error = `Search failed: ${err.message}`;
  }
  s.loading = false;
  renderSearch();
}

function closeSearch(clear = true) {
  state.search = null;
  if (clear) $("search-input").value = "";
  renderSearch();
  if (clear) $("search-input").focus();
}

async function openResult(channel, id) {
  const shown = await revealMessage(String(channel), id);
  if (!shown && state.openChannel === String(channel)) {
    showBanner("That message is no longer in the conversation.");
  }
}

export function renderSearch() {
  const s = state.search;
  $("list-pane").classList.toggle("searching", Boolean(s));
  $("search-results").hidden = !s;
  if (!s) return;
  const count = s.results.length;
  let head;
  if (s.loading && !count) head = "Searching…";
  else if (s.error) head = s.error;
  else if (!count) head = `No messages match “${s.query}”`;
  else head = `${count}${s.hasMore ? "+" : ""} ${count === 1 ? "message matches" : "messages match"} “${s.query}”`;
  $("search-summary").textContent = head;
  $("search-list").replaceChildren(...s.results.map((r) => resultNode(r, s.query)));
  $("search-more").hidden = !s.hasMore || Boolean(s.error);
  $("search-more").disabled = Boolean(s.loading);
}

function resultNode(result, query) {
  const m = result.message;
  const channel = String(m.session_channel);
  const c = state.conversations.get(channel) || { application_id: Number(channel) };
  const button = el("button", "result");
  button.type = "button";
  button.dataset.channel = channel;
  button.dataset.message = String(m.id);
  const head = el("div", "result-head");
  head.append(el("span", "result-title", conversationTitle(c)));
  const time = el("time", "", shortTime(m.create_at));
  time.dateTime = m.create_at;
  head.append(time);
  const who = el("div", "result-who", `${personName(m.sender_id)}${m.private ? " · Private note" : ""}`);
  const text = el("div", "result-text");
  const snippet = typeof result.snippet === "string" && result.snippet.trim() ? result.snippet : m.content;
  text.append(...marked(snippet, query));
  button.append(head, who, text);
  button.setAttribute("aria-label", `${conversationTitle(c)}, ${personName(m.sender_id)}: ${snippet}`);
  const li = el("li");
  if (m.private) li.className = "private";
  li.append(button);
  return li;
}

// The text with the query's words in <mark>, built as text nodes (never as HTML).
function marked(text, query) {
  // The query's words as the server takes them: runs of letters and digits of any script.
  const words = (query.match(/[\p{L}\p{N}\p{M}]+/gu) || []).filter((w) => w.length > 1);
  if (!words.length) return [document.createTextNode(text)];
  const pattern = new RegExp(`(${words.join("|")})`, "giu");
  return text.split(pattern).map((part, i) => (i % 2 ? el("mark", "", part) : document.createTextNode(part)));
}
