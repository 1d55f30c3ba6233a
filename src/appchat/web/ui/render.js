// Drawing what state.js holds: the conversation list, the open thread, who is typing, the
// message box's hint. Nothing here asks the server; clicks reach the other modules through
// the listeners app.js puts on the list and the thread (data-channel, data-action).

import { ONLINE } from "/appchat.js";
import { $, el, patchChildren, showBanner } from "./dom.js";
import {
  AVAILABILITY_LABELS, conversationTitle, dayLabel, learnName, messagePreview, personName, shortTime, staffName,
  statusText, timeFmt,
} from "./format.js";
import { state } from "./state.js";

// --- the conversation list --------------------------------------------------------------------

// Newest activity first, then the higher id: the server's order (GetConversationList).
function byActivity(a, b) {
  if (a.update_at !== b.update_at) return a.update_at < b.update_at ? 1 : -1;
  return (b.id ?? 0) - (a.id ?? 0);
}

// The staff inbox's tabs: whose conversations (mine, unassigned, all), and which statuses
// the "Show" filter keeps (a server without the desk sends no status: open).
const TABS = {
  mine: (c) => c.assignee_id === state.me.sid,
  unassigned: (c) => c.assignee_id == null,
  all: () => true,
};
const SHOWN = {
  active: (c) => !c.status || c.status === "open" || c.status === "pending",
  snoozed: (c) => c.status === "snoozed",
  resolved: (c) => c.status === "resolved",
  any: () => true,
};

export function renderList() {
  const ul = $("conversations");
  const { inbox, me } = state;
  const every = [...state.conversations.values()].sort(byActivity);
  let items = every;
  // The tabs and the filter, once the server has answered SubscribeInbox (one without the
  // desk has no status nor assignee to sort by).
  const desk = me.staff && inbox.mode === "live";
  $("inbox-tools").hidden = !desk;
  if (desk) $("inbox-panel").setAttribute("role", "tabpanel");
  else $("inbox-panel").removeAttribute("role");
  if (desk) {
    const shown = every.filter(SHOWN[inbox.show]);
    items = shown.filter(TABS[inbox.tab]);
    for (const tab of $("inbox-tabs").querySelectorAll("[role=tab]")) {
      const selected = tab.dataset.tab === inbox.tab;
      const count = shown.filter(TABS[tab.dataset.tab]).length;
      tab.setAttribute("aria-selected", String(selected));
      tab.tabIndex = selected ? 0 : -1;
      tab.querySelector(".count").textContent = String(count);
      if (selected) $("inbox-panel").setAttribute("aria-labelledby", tab.id);
    }
  }
  const focused = ul.contains(document.activeElement) ? document.activeElement.dataset.channel : null;
  ul.replaceChildren(...items.map(conversationNode));
  if (focused) ul.querySelector(`[data-channel="${CSS.escape(focused)}"]`)?.focus();
  $("list-empty").hidden = items.length > 0;
  $("list-empty").textContent = every.length
    ? "Nothing here. Another tab or status may hold what you look for."
    : "No conversations yet. New requests show up here.";
  // Unread messages of the conversations we take part in, and customers' messages in those
  // we do not (the inbox's news): in the badge and the tab's title, "(N) appchat".
  const total = every.reduce((n, c) => n + (c.unread || 0) + (c.fresh || 0), 0);
  $("total-unread").hidden = total === 0;
  $("total-unread").textContent = String(total);
  document.title = total ? `(${total}) appchat` : "appchat";
  renderDesk();
}

function conversationNode(c) {
  const li = el("li", "conversation");
  li.dataset.channel = c.channel;
  const news = (c.unread || 0) + (c.fresh || 0);
  li.classList.toggle("active", c.channel === state.openChannel);
  li.classList.toggle("unread", news > 0);
  const avatar = el("div", "avatar", `#${String(c.application_id).slice(-3)}`);
  const body = el("div", "row-body");
  body.append(el("div", "title", conversationTitle(c)));
  const typingNow = state.typists.get(c.channel)?.size;
  let line;
  if (typingNow) line = "typing…";
  else if (c.last_message) {
    const m = c.last_message;
    line = `${m.private ? "Note: " : ""}${m.sender_id === state.me.sid ? "You: " : ""}${messagePreview(m)}`;
  } else line = c.joined || !state.me.staff ? `Last activity ${shortTime(c.update_at)}` : "Not joined yet";
  body.append(el("div", typingNow ? "sub typing-now" : "sub", line));
  const desk = state.me.staff && c.status !== undefined;
  if (desk) {
    const meta = el("div", "row-meta");
    const pill = el("span", "status-pill", statusText(c));
    pill.dataset.status = c.status;
    meta.append(pill, el("span", "assignee", c.assignee_id == null ? "Unassigned" : staffName(c.assignee_id)));
    body.append(meta);
  }
  const side = el("div", "side");
  const time = el("time", "", shortTime(c.update_at));
  time.dateTime = c.update_at;
  side.append(time);
  if (news > 0) side.append(el("span", "badge", String(news)));
  li.append(avatar, body, side);
  // A row is a button for the keyboard and screen readers: Tab reaches it, Enter or
  // Space opens it.
  li.tabIndex = 0;
  li.setAttribute("role", "button");
  if (c.channel === state.openChannel) li.setAttribute("aria-current", "true");
  const assigned = c.assignee_id == null ? "unassigned" : `assigned to ${staffName(c.assignee_id)}`;
  li.setAttribute(
    "aria-label",
    `${conversationTitle(c)}${desk ? `, ${statusText(c)}, ${assigned}` : ""}${news > 0 ? `, ${news} unread` : ""}${typingNow ? ", typing" : ""}`,
  );
  return li;
}

// --- the desk: the open conversation's status and assignee, availability ---------------------

// The status control and the assignee picker of the open conversation (staff, on a server
// that sends a status).
export function renderDesk() {
  const controls = $("desk-controls");
  const c = state.conversations.get(state.openChannel);
  const shown = Boolean(state.me.staff && c && c.status !== undefined);
  controls.hidden = !shown;
  if (!shown) return;
  const pill = $("conversation-status");
  pill.dataset.status = c.status;
  pill.textContent = statusText(c);
  for (const button of controls.querySelectorAll("[data-set-status]")) button.hidden = button.dataset.setStatus === c.status;
  $("assignee-name").textContent = c.assignee_id == null ? "Nobody" : staffName(c.assignee_id);
  if (!$("assignee-menu").hidden) renderAssigneeOptions();
}

const AVAILABILITY_ORDER = { online: 0, busy: 1, offline: 2 };

// The assignee picker's choices: me, the desk's other staff (available first), whoever
// is assigned now, and nobody; each with their availability.
export function renderAssigneeOptions() {
  const c = state.conversations.get(state.openChannel);
  if (!c) return;
  const { me, desk } = state;
  const people = [me.sid, ...[...desk.keys()].filter((id) => id !== me.sid).sort(
    (a, b) => (AVAILABILITY_ORDER[desk.get(a).availability] ?? 3) - (AVAILABILITY_ORDER[desk.get(b).availability] ?? 3) || a - b,
  )];
  if (c.assignee_id != null && !people.includes(c.assignee_id)) people.push(c.assignee_id);
  const ul = $("assignee-options");
  const focused = ul.contains(document.activeElement) ? document.activeElement.dataset.assign : null;
  const option = (key, name, availability) => {
    const current = key === "none" ? c.assignee_id == null : c.assignee_id === Number(key);
    const button = el("button", "assignee-option");
    button.type = "button";
    button.dataset.assign = key;
    button.setAttribute("aria-pressed", String(current));
    const dot = el("span", "dot");
    dot.setAttribute("aria-hidden", "true");
    if (availability) dot.dataset.availability = availability;
    button.append(dot, el("span", "name", name));
    if (key !== "none") button.append(el("span", "availability", AVAILABILITY_LABELS[availability] || "Unknown"));
    const li = el("li");
    li.append(button);
    return li;
  };
  const rows = people.map((id) => {
    const availability = id === me.sid ? state.availability : desk.get(id)?.availability;
    return option(String(id), id === me.sid ? "Me" : staffName(id), availability);
  });
  rows.push(option("none", "Nobody"));
  ul.replaceChildren(...rows);
  if (focused) ul.querySelector(`[data-assign="${CSS.escape(focused)}"]`)?.focus();
}

export function renderAvailability() {
  $("availability").value = state.availability;
  $("availability-dot").dataset.availability = state.availability;
}

// A customer's page: is someone there to answer?
export function renderAgentAvailability() {
  const box = $("agent-availability");
  box.hidden = state.me.staff || state.staffAvailable === null;
  box.dataset.available = String(Boolean(state.staffAvailable));
  box.textContent = state.staffAvailable
    ? "An agent is available"
    : "No agent is available right now: leave a message and we answer as soon as we can";
}

// On a narrow screen the page shows the list or the thread, not both (style.css).
export function showView(view) {
  document.body.dataset.view = view;
}

// --- the thread -------------------------------------------------------------------------------

export function renderThread({ stick = false } = {}) {
  const { openChannel } = state;
  const thread = state.threads.get(openChannel);
  if (!thread) return;
  const box = $("messages");
  const nearBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
  const items = [...thread.messages.values()].sort((a, b) => a.id - b.id);
  const waiting = [...state.pending.entries()]
    .filter(([, p]) => p.channel === openChannel)
    .map(([clientMsgId, p]) => ({ ...p, client_msg_id: clientMsgId, sender_id: state.me.sid, status: -1 }));
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
    node.dataset.sig = JSON.stringify([
      m.status, m.failed || null, m.content, Boolean(m.preview), node.querySelector(".sender")?.textContent || "",
      m.edited_at || null, Boolean(m.deleted), Boolean(m.private), m.rev ?? null, historySig(m),
    ]);
    nodes.push(node);
  }
  patchChildren($("message-list"), nodes);
  $("thread-empty").hidden = !thread.loaded || nodes.length > 0;
  $("history-status").textContent = thread.hasMore ? "Scroll up for earlier messages" : thread.loaded && items.length ? "Beginning of the conversation" : "";
  if (stick || nearBottom) {
    box.scrollTop = box.scrollHeight;
    state.scroll.atBottom = true;
  }
}

// The thread again, if `channel` is the one shown.
export function renderIfOpen(channel, options) {
  if (channel === state.openChannel) renderThread(options);
}

// Images get their height only once loaded, after the thread was scrolled: a reader at the
// newest message stays there whatever grows above it.
export function keepAtBottom() {
  const box = $("messages");
  if (state.scroll.atBottom) box.scrollTop = box.scrollHeight;
}

// What of the thread's edit, delete and search state shows on message m: its node is drawn
// again when that changes.
function historySig(m) {
  const { editing, confirmDelete, highlight } = state;
  return [
    editing && editing.id === m.id ? ["editing", editing.error || null, Boolean(editing.saving)] : null,
    confirmDelete === m.id,
    highlight === m.id,
  ];
}

function messageNode(m) {
  const own = m.sender_id === state.me.sid;
  const li = el("li", `msg ${own ? "own" : "theirs"}`);
  if (m.id) li.dataset.id = String(m.id);
  if (m.client_msg_id) li.dataset.client = m.client_msg_id;
  li.classList.toggle("private", Boolean(m.private));
  li.classList.toggle("deleted", Boolean(m.deleted));
  if (m.id && m.id === state.highlight) {
    li.classList.add("highlight");
    li.tabIndex = -1; // focused when a search result opens it
  }
  const bubble = el("div", "bubble");
  if (m.private) bubble.append(el("div", "note-label", "Private note"));
  if (!own) bubble.append(el("div", "sender", personName(m.sender_id)));
  const editing = !m.deleted && state.editing && m.id && state.editing.id === m.id;
  if (m.deleted) bubble.append(el("div", "text deleted-text", "Message deleted"));
  else if (editing) bubble.append(editForm(m));
  else bubble.append(contentNode(m));
  const meta = el("div", "meta");
  if (m.edited_at && !m.deleted) {
    const edited = el("span", "edited", "edited");
    edited.title = `Edited ${shortTime(m.edited_at)}`;
    meta.append(edited);
  }
  const time = el("time", "", timeFmt.format(new Date(m.create_at)));
  time.dateTime = m.create_at;
  meta.append(time);
  let actions = null;
  if (own && m.deleted) {
    // a stub: no ticks
  } else if (own) {
    const ticks = el("span", "ticks");
    if (m.status === -1 && m.failed) {
      li.classList.add("failed");
      ticks.textContent = `Not sent: ${m.failed}`;
      ticks.dataset.state = "failed";
      actions = el("div", "failed-actions");
      const retry = el("button", "", "Retry");
      retry.type = "button";
      retry.dataset.action = "retry";
      const dismiss = el("button", "", "Dismiss");
      dismiss.type = "button";
      dismiss.dataset.action = "dismiss";
      dismiss.title = "Remove it; its text goes back into the message box";
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
  if (state.confirmDelete === m.id && !m.deleted) bubble.append(confirmDeleteNode(m));
  li.append(bubble);
  const tools = messageTools(m, own);
  if (tools) li.append(tools);
  return li;
}

function actionButton(action, label, text, cls = "") {
  const button = el("button", cls, text);
  button.type = "button";
  button.dataset.action = action;
  if (label) button.setAttribute("aria-label", label);
  return button;
}

// Edit (one's own text messages) and Delete (one's own; staff: any), beside the bubble of
// a stored message that is not a stub.
function messageTools(m, own) {
  if (!m.id || m.deleted || m.status === -1 || state.editing?.id === m.id || state.confirmDelete === m.id) return null;
  const canEdit = own && m.content_type === 1;
  const canDelete = own || state.me.staff;
  if (!canEdit && !canDelete) return null;
  const tools = el("div", "msg-tools");
  tools.setAttribute("role", "group");
  tools.setAttribute("aria-label", "Message actions");
  if (canEdit) tools.append(actionButton("edit", "Edit message", "Edit"));
  if (canDelete) tools.append(actionButton("delete", "Delete message", "Delete"));
  return tools;
}

// The inline editor: Enter saves, Shift+Enter a new line, Esc cancels (history.js).
function editForm(m) {
  const { editing } = state;
  const form = el("form", "edit-form");
  const input = el("textarea", "edit-input");
  input.value = editing.draft ?? m.content;
  input.rows = Math.min(6, Math.max(1, input.value.split("\n").length));
  input.setAttribute("aria-label", "Edit message");
  input.disabled = Boolean(editing.saving);
  const hint = el("div", "edit-hint", "Enter to save · Esc to cancel");
  const buttons = el("div", "edit-buttons");
  const save = actionButton("save-edit", null, "Save", "primary");
  save.type = "submit";
  save.disabled = Boolean(editing.saving);
  buttons.append(actionButton("cancel-edit", null, "Cancel"), save);
  form.append(input, hint, buttons);
  if (editing.error) {
    const error = el("div", "edit-error", editing.error);
    error.setAttribute("role", "alert");
    form.append(error);
  }
  return form;
}

function confirmDeleteNode(m) {
  const box = el("div", "confirm-delete");
  box.setAttribute("role", "alertdialog");
  box.setAttribute("aria-label", "Delete this message?");
  const own = m.sender_id === state.me.sid;
  box.append(el("span", "", own ? "Delete this message for everyone?" : "Delete this message for everyone? (as staff)"));
  box.append(actionButton("cancel-delete", null, "Cancel"), actionButton("confirm-delete", null, "Delete", "danger"));
  return box;
}

// content_type 1 is text; 2 is an image: the reference of an upload (/files/<app>/<id>),
// fetched with the token (downloads need it) and shown through a blob: URL. Any other
// image content (a client of the original server sends its own backend's URL, or a file
// name) is shown as text, never fetched: no tracking pixel, no mixed content.
const IMAGE_REFERENCE = /^\/files\/([1-9][0-9]{0,18})\/[0-9a-f]{32}$/;

function imageUrl(path) {
  let url = state.imageUrls.get(path);
  if (!url) {
    url = state.chat.fetchImage(path).then((blob) => URL.createObjectURL(blob));
    url.catch(() => state.imageUrls.delete(path)); // try again when shown again
    state.imageUrls.set(path, url);
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

// --- typing and the message box ---------------------------------------------------------------

export function renderTyping() {
  const who = [...(state.typists.get(state.openChannel)?.keys() || [])];
  $("typing").textContent = who.length ? `${who.map(personName).join(", ")} ${who.length > 1 ? "are" : "is"} typing…` : "";
}

export function renderComposerHint() {
  const offline = state.chat && state.chat.state !== ONLINE;
  const note = Boolean(state.me?.staff && state.noteMode);
  $("composer").classList.toggle("note-mode", note);
  $("note-toggle").setAttribute("aria-pressed", String(note));
  $("note-toggle").hidden = !state.me?.staff;
  $("send").textContent = note ? "Add note" : "Send";
  if (offline) $("input").placeholder = "Offline: messages are sent when the connection is back";
  else $("input").placeholder = note ? "Private note: only staff see it…" : "Write a message…";
}
