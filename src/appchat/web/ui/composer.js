// The message box: text and images go out through one path (queue, then sendPending, which
// Retry calls again), and while the user types the others are told so.

import { AppChatError, ONLINE, randomId } from "/appchat.js";
import { $ } from "./dom.js";
import { renderComposerHint, renderIfOpen, renderThread } from "./render.js";
import { state } from "./state.js";

const TYPING_EVERY_MS = 2000; // how often we tell others while the user types
const TYPING_IDLE_MS = 3000; // the user stopped typing this long ago: stop telling

// What POST /upload takes (by content; the browser's type is checked here first, so that
// a PDF is refused at once instead of showing as a broken image).
const IMAGE_TYPES = ["image/png", "image/jpeg", "image/webp", "image/gif"];

export function submit(event) {
  event.preventDefault();
  const input = $("input");
  const content = input.value.trim();
  const channel = state.openChannel;
  if (!content || !channel) return;
  input.value = "";
  queue(channel, { content, content_type: 1, ...noteFlag() });
}

// An image from the file picker: shown at once as pending, uploaded, then sent as a message.
export function attach(event) {
  const input = event.target;
  const file = input.files && input.files[0];
  input.value = ""; // the same file may be picked again
  const channel = state.openChannel;
  if (!file || !channel) return;
  if (!IMAGE_TYPES.includes(file.type)) {
    showComposerError(`${file.name} is not an image that can be sent: choose a PNG, JPEG, WebP or GIF file.`);
    return;
  }
  queue(channel, { content: "", content_type: 2, file, preview: URL.createObjectURL(file), ...noteFlag() });
}

// Staff in "Note" mode write private notes (only staff see them).
function noteFlag() {
  return state.me.staff && state.noteMode ? { private: true } : {};
}

// The composer's "Note" toggle (staff).
export function toggleNote(on = !state.noteMode) {
  state.noteMode = Boolean(on);
  renderComposerHint();
}

// A new message: waiting in state.pending (shown as "Sending…") under a client_msg_id of
// its own, then sent.
function queue(channel, message) {
  showComposerError(null);
  const clientMsgId = randomId();
  state.pending.set(clientMsgId, { channel, create_at: new Date().toISOString(), ...message });
  sendPending(clientMsgId);
}

// Send (or send again, with the same client_msg_id: never stored twice) a message
// waiting in state.pending; an image is uploaded first. A failure stays shown, with Retry
// and Dismiss, until one of them is chosen.
export function sendPending(clientMsgId) {
  const p = state.pending.get(clientMsgId);
  if (!p) return;
  p.failed = null;
  renderIfOpen(p.channel, { stick: true });
  const options = { clientMsgId, private: Boolean(p.private) };
  const sending = p.file
    ? state.chat.sendImage(p.channel, p.file, options)
    : state.chat.send(p.channel, p.content, options);
  sending.then(
    () => {
      settle(clientMsgId, p);
      renderIfOpen(p.channel);
    },
    (err) => {
      if (state.pending.get(clientMsgId) !== p) return; // dismissed meanwhile
      p.failed = err instanceof AppChatError ? err.message : String(err);
      renderIfOpen(p.channel);
    },
  );
}

// Give up on a failed message: its text goes back into the message box (if that is
// empty), so nothing typed is lost.
export function dismissPending(clientMsgId) {
  const p = state.pending.get(clientMsgId);
  if (!p) return;
  settle(clientMsgId, p);
  const input = $("input");
  if (p.content_type === 1 && !input.value.trim()) input.value = p.content;
  renderThread();
  input.focus();
}

// A pending message is done with (sent, or dismissed): no longer shown as waiting.
function settle(clientMsgId, p) {
  state.pending.delete(clientMsgId);
  if (p.preview) URL.revokeObjectURL(p.preview);
}

function showComposerError(text) {
  $("composer-error").hidden = !text;
  $("composer-error").textContent = text || "";
}

// While the user types, and for a few seconds after the last keystroke, tell the others every
// TYPING_EVERY_MS: twice the server's interval, so that a frame the network delayed is never
// dropped as too soon after the one before.
export function onInput() {
  state.typing.lastInputAt = Date.now();
  typingTick();
  if (!state.typing.timer) state.typing.timer = setInterval(typingTick, 500);
}

function typingTick() {
  const { typing, chat, openChannel } = state;
  const now = Date.now();
  const busy = openChannel && $("input").value.trim() && now - typing.lastInputAt < TYPING_IDLE_MS;
  if (!busy) {
    clearInterval(typing.timer);
    typing.timer = null;
    return;
  }
  if (chat.state !== ONLINE || now - typing.lastSent < TYPING_EVERY_MS) return;
  typing.lastSent = now;
  chat.typing(openChannel).catch(() => {});
}
