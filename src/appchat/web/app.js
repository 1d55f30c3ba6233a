// The appchat web client: sign in, conversation list, message view. Built on appchat.js.
// This module wires the page; the rest is in ui/: state.js (what the page knows),
// render.js (drawing it), conversations.js (loading it, pushes), desk.js (the support desk:
// status, assignment, availability, presence), notify.js (notifications for a hidden tab),
// composer.js (sending, the staff's "Note" mode), history.js (editing and deleting messages,
// search), signin.js (the session), format.js and dom.js (helpers).
import { AppChat, CONNECTING, ONLINE, OFFLINE, TOKEN_EXPIRED, REFUSED, tokenClaims } from "/appchat.js";
import { attach, dismissPending, onInput, sendPending, submit, toggleNote } from "./ui/composer.js";
import {
  followLists, loadOlder, markRead, onInboxSubscribed, onMessage, onMessageUpdated, onRead, onTyping,
  openConversation, refreshStatuses,
} from "./ui/conversations.js";
import { onConversationUpdated, onPresence, setupDesk, storedAvailability } from "./ui/desk.js";
import { $, hideBanner, isOffline, showBanner } from "./ui/dom.js";
import { onThreadClick, setupHistory } from "./ui/history.js";
import { renderNotificationControls, setupNotifications } from "./ui/notify.js";
import { keepAtBottom, renderAvailability, renderComposerHint, showView } from "./ui/render.js";
import { devToken, joinDev, savedSession, saveSession, showSignin, signinWithToken, signOut } from "./ui/signin.js";
import { state } from "./ui/state.js";

function start(session) {
  if (!session) return;
  saveSession(session);
  const claims = tokenClaims(session.token);
  const me = {
    sid: Number(session.sid),
    staff: claims.admin_id != null,
    application: claims.request_id != null ? Number(claims.request_id) : null,
  };
  state.me = me;
  $("signin").hidden = true;
  $("app").hidden = false;
  $("who").textContent = me.staff
    ? `Staff member #${me.sid}`
    : `Customer #${me.sid} · request #${me.application}`;
  $("list-title").textContent = me.staff ? "Inbox" : "Your request";
  document.body.dataset.role = me.staff ? "staff" : "customer";
  $("staff-tools").hidden = !me.staff;
  if (me.staff) {
    state.availability = storedAvailability() || "online";
    renderAvailability();
    renderNotificationControls();
  }

  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const chat = new AppChat({
    url: `${scheme}://${location.host}/ws?sid=${me.sid}`,
    token: session.token,
    backoffMax: 8000,
    // A dev session mints its next token itself; a real page would ask its backend.
    getToken: session.dev
      ? async () => {
          const { token } = await devToken(session.dev);
          saveSession({ ...session, token });
          return token;
        }
      : null,
  });
  state.chat = chat;
  chat.on("state", onState);
  chat.on("message", ({ message }) => onMessage(message));
  chat.on("messageUpdated", ({ message }) => onMessageUpdated(message));
  chat.on("read", onRead);
  chat.on("typing", onTyping);
  chat.on("conversation", onConversationUpdated);
  chat.on("presence", onPresence);
  chat.on("inbox", onInboxSubscribed);
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
    if (error && error.code && !isOffline(error)) {
      showBanner(`Something went wrong: ${error.message}`);
    }
  });
  chat.start();
}

function onState({ state: now, retryIn, reason }) {
  const status = $("status");
  status.dataset.state = now;
  $("retry").hidden = now !== OFFLINE;
  if (now === ONLINE) {
    status.textContent = "Online";
    hideBanner();
    followLists(true);
  } else if (now === CONNECTING) {
    status.textContent = "Connecting…";
  } else if (now === OFFLINE) {
    const seconds = Math.max(1, Math.round((retryIn || 0) / 1000));
    status.textContent = `Offline · retrying in ${seconds}s`;
    followLists(false);
  } else if (now === TOKEN_EXPIRED) {
    status.textContent = "Session expired";
    followLists(false);
    showBanner("Your session has expired.", "Sign in again", signOut);
  } else if (now === REFUSED) {
    status.textContent = "Signed out";
    followLists(false);
    showBanner(`This token was refused: ${reason}.`, "Sign in again", signOut);
  }
  renderComposerHint();
}

async function boot() {
  $("token-form").addEventListener("submit", async (event) => start(await signinWithToken(event)));
  $("join-customer").addEventListener("submit", async (event) => {
    event.preventDefault();
    const f = event.target.elements;
    start(await joinDev({ role: "customer", id: Number(f.user.value), application_id: Number(f.application.value) }));
  });
  $("join-staff").addEventListener("submit", async (event) => {
    event.preventDefault();
    start(await joinDev({ role: "staff", id: Number(event.target.elements.user.value) }));
  });
  $("signout").addEventListener("click", signOut);
  $("back").addEventListener("click", () => {
    showView("list");
    $("conversations").querySelector(".active")?.focus();
  });
  $("retry").addEventListener("click", () => state.chat && state.chat.retryNow());
  setupDesk();
  setupNotifications(openConversation);
  // A conversation row opens on a click, Enter or Space (render.js draws them).
  $("conversations").addEventListener("click", (event) => {
    const row = event.target.closest("li[data-channel]");
    if (row) openConversation(row.dataset.channel);
  });
  // The list is drawn anew with every piece of news (on a busy desk, several times a
  // second). A row drawn anew between the press and the release gets no click from the
  // browser (the element pressed is gone): the release on the same conversation opens it.
  let pressed = null;
  $("conversations").addEventListener("mousedown", (event) => {
    pressed = event.target;
  });
  $("conversations").addEventListener("mouseup", (event) => {
    const row = event.target.closest("li[data-channel]");
    const was = pressed?.closest("li[data-channel]");
    if (row && was && !was.isConnected && was.dataset.channel === row.dataset.channel) {
      openConversation(row.dataset.channel);
    }
    pressed = null;
  });
  $("conversations").addEventListener("keydown", (event) => {
    const row = event.target.closest("li[data-channel]");
    if (row && (event.key === "Enter" || event.key === " ")) {
      event.preventDefault();
      openConversation(row.dataset.channel);
    }
  });
  // Edit and Delete, and a failed message's Retry and Dismiss.
  $("message-list").addEventListener("click", (event) => {
    if (onThreadClick(event)) return;
    const button = event.target.closest("button[data-action]");
    const clientMsgId = button?.closest("li.msg")?.dataset.client;
    if (!clientMsgId) return;
    if (button.dataset.action === "retry") sendPending(clientMsgId);
    else dismissPending(clientMsgId);
  });
  setupHistory();
  $("note-toggle").addEventListener("click", () => {
    toggleNote();
    $("input").focus();
  });
  $("composer").addEventListener("submit", submit);
  $("attach").addEventListener("change", attach);
  $("attach-button").addEventListener("click", () => $("attach").click());
  $("input").addEventListener("input", onInput);
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) submit(event);
  });
  $("messages").addEventListener("scroll", () => {
    const box = $("messages");
    const { scroll } = state;
    // Only the reader scrolling up leaves the end: the browser also scrolls down by itself
    // (scroll anchoring) when something above the view grows.
    const up = box.scrollTop < scroll.lastTop;
    scroll.lastTop = box.scrollTop;
    if (box.scrollHeight - box.scrollTop - box.clientHeight < 80) scroll.atBottom = true;
    else if (up) scroll.atBottom = false;
    if (box.scrollTop < 40 && state.openChannel) loadOlder(state.openChannel);
  });
  new ResizeObserver(keepAtBottom).observe($("message-list"));
  document.addEventListener("visibilitychange", () => state.openChannel && markRead());

  let config = { dev: false };
  try {
    config = await (await fetch("/client-config.json")).json();
  } catch {
    // an older server: no dev buttons
  }
  $("dev-join").hidden = !config.dev;
  const saved = savedSession();
  if (saved) start(saved);
  else showSignin();
}

boot();
