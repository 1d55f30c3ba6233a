// Drawing what state.js holds: the conversation list, the open thread, who is typing, the
// message box's hint. Nothing here asks the server; clicks reach the other modules through
// the listeners app.js puts on the list and the thread (data-channel, data-action).

import { ONLINE } from "/appchat.js";
import { $, el, patchChildren, showBanner } from "./dom.js";
import { conversationTitle, dayLabel, learnName, personName, shortTime, timeFmt } from "./format.js";
import { state } from "./state.js";

// --- the conversation list --------------------------------------------------------------------

export function renderList() {
  const ul = $("conversations");
  const items = [...state.conversations.values()].sort(
    (a, b) => (a.update_at < b.update_at ? 1 : a.update_at > b.update_at ? -1 : 0),
  );
  const focused = ul.contains(document.activeElement) ? document.activeElement.dataset.channel : null;
  ul.replaceChildren(...items.map(conversationNode));
  if (focused) ul.querySelector(`[data-channel="${CSS.escape(focused)}"]`)?.focus();
  $("list-empty").hidden = state.conversations.size > 0;
  const total = items.reduce((n, c) => n + (c.unread || 0), 0);
  $("total-unread").hidden = total === 0;
  $("total-unread").textContent = String(total);
  document.title = total ? `(${total}) appchat` : "appchat";
}

function conversationNode(c) {
  const li = el("li", "conversation");
  li.dataset.channel = c.channel;
  li.classList.toggle("active", c.channel === state.openChannel);
  li.classList.toggle("unread", c.unread > 0);
  const avatar = el("div", "avatar", `#${String(c.application_id).slice(-3)}`);
  const body = el("div");
  body.append(el("div", "title", conversationTitle(c)));
  const typingNow = state.typists.get(c.channel)?.size;
  const sub = el(
    "div",
    typingNow ? "sub typing-now" : "sub",
    typingNow ? "typing…" : c.joined || !state.me.staff ? `Last activity ${shortTime(c.update_at)}` : "Not joined yet",
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
  if (c.channel === state.openChannel) li.setAttribute("aria-current", "true");
  li.setAttribute(
    "aria-label",
    `${conversationTitle(c)}${c.unread > 0 ? `, ${c.unread} unread` : ""}${typingNow ? ", typing" : ""}`,
  );
  return li;
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
    node.dataset.sig = JSON.stringify([m.status, m.failed || null, m.content, Boolean(m.preview), node.querySelector(".sender")?.textContent || ""]);
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

function messageNode(m) {
  const own = m.sender_id === state.me.sid;
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
  li.append(bubble);
  return li;
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
  $("input").placeholder = offline ? "Offline: messages are sent when the connection is back" : "Write a message…";
}
