// The support desk: conversation objects as the server sends them (with status, assignee
// and rev), the open conversation's status control and assignee picker, this agent's own
// availability, the desk's staff (GetPresence, ReceivePresence) and, on a customer's page,
// whether an agent is available.

import { $, isOffline, showBanner } from "./dom.js";
import { isStaff } from "./format.js";
import { customerWrote } from "./notify.js";
import { renderAgentAvailability, renderAssigneeOptions, renderAvailability, renderList } from "./render.js";
import { state } from "./state.js";

const AVAILABILITY_KEY = "appchat.availability"; // + ".<sid>": the agent's last choice
const CUSTOMER_PRESENCE_MS = 30000; // a customer's page asks again whether an agent is there

// --- conversation objects ---------------------------------------------------------------------

// Keep a conversation object from the server (a list, a reply, an Event.ConversationUpdated
// push): a copy older than the one held (a lower `rev`) is dropped. `push`: it came as an
// inbox update, so a newer last message from a customer is news (counted if we do not take
// part in the conversation, where no ReceiveMessage tells us, and announced if the tab is
// hidden). Returns the conversation held.
export function mergeConversation(doc, { push = false } = {}) {
  const channel = String(doc.session_channel);
  let c = state.conversations.get(channel);
  if (c && typeof c.rev === "number" && typeof doc.rev === "number" && doc.rev < c.rev) return c;
  if (!c) {
    c = { channel, unread: 0, fresh: 0, joined: false };
    state.conversations.set(channel, c);
  }
  const before = c.last_message;
  if (doc.id !== undefined) c.id = doc.id;
  c.application_id = doc.application_id ?? c.application_id ?? Number(channel);
  if (!c.update_at || (doc.update_at && doc.update_at > c.update_at)) c.update_at = doc.update_at;
  for (const key of ["status", "assignee_id", "snooze_until", "rev"]) {
    if (key in doc) c[key] = doc[key];
  }
  if ("last_message" in doc) {
    const m = doc.last_message;
    // A ReceiveMessage push may have brought a newer one already.
    if (!(m && before && m.id < before.id)) c.last_message = m;
  }
  if (c.assignee_id != null) state.roles.set(c.assignee_id, true);
  if (c.assignee_id === state.me.sid) c.joined = true; // an assignee takes part
  const m = doc.last_message;
  if (push && m && m.id > (before?.id ?? 0) && m.sender_id !== state.me.sid && !isStaff(m.sender_id)) {
    if (!c.joined) c.fresh = (c.fresh || 0) + 1;
    customerWrote(m);
  }
  return c;
}

export function onConversationUpdated({ conversation }) {
  mergeConversation(conversation, { push: true });
  renderListSoon();
}

// A busy desk pushes many updates a second: the list is drawn once for those of a moment.
let listQueued = false;
function renderListSoon() {
  if (listQueued) return;
  listQueued = true;
  setTimeout(() => {
    listQueued = false;
    renderList();
  }, 50);
}

// --- status and assignment of the open conversation -------------------------------------------

async function setStatus(status, snoozeUntil = null) {
  const channel = state.openChannel;
  try {
    mergeConversation(await state.chat.setConversationStatus(channel, status, snoozeUntil));
    renderList();
  } catch (err) {
    if (!isOffline(err)) showBanner(`Could not change the status: ${err.message}`);
  }
}

async function assign(assigneeId) {
  const channel = state.openChannel;
  closeMenus();
  try {
    mergeConversation(await state.chat.assignConversation(channel, assigneeId));
    renderList();
  } catch (err) {
    if (!isOffline(err)) showBanner(`Could not assign the conversation: ${err.message}`);
  }
}

export function closeMenus() {
  $("assignee-menu").hidden = true;
  $("assignee-button").setAttribute("aria-expanded", "false");
  $("snooze-form").hidden = true;
  $("snooze-button").setAttribute("aria-expanded", "false");
}

function toggleAssigneeMenu() {
  const menu = $("assignee-menu");
  const opening = menu.hidden;
  closeMenus();
  if (!opening) return;
  menu.hidden = false;
  $("assignee-button").setAttribute("aria-expanded", "true");
  renderAssigneeOptions();
  loadDesk(); // who is there right now
  menu.querySelector("button")?.focus();
}

function toggleSnooze() {
  const form = $("snooze-form");
  const opening = form.hidden;
  closeMenus();
  if (!opening) return;
  // Suggest an hour from now, in local time as datetime-local wants it.
  const input = $("snooze-until");
  const local = (date) => new Date(date.getTime() - date.getTimezoneOffset() * 60000).toISOString().slice(0, 16);
  const soon = new Date(Date.now() + 3600000);
  soon.setMinutes(0, 0, 0);
  input.min = local(new Date());
  if (!input.value) input.value = local(soon);
  form.hidden = false;
  $("snooze-button").setAttribute("aria-expanded", "true");
  input.focus();
}

// --- this agent's availability and the desk's staff -------------------------------------------

// The availability this agent chose last on this browser, or null.
export function storedAvailability() {
  return localStorage.getItem(`${AVAILABILITY_KEY}.${state.me.sid}`);
}

async function chooseAvailability(value) {
  localStorage.setItem(`${AVAILABILITY_KEY}.${state.me.sid}`, value);
  state.availability = value;
  renderAvailability();
  try {
    await state.chat.setAvailability(value);
  } catch (err) {
    if (err.code === "unknown_event") $("availability").closest("label").hidden = true;
    else if (!isOffline(err)) showBanner(`Could not change your availability: ${err.message}`);
  }
}

// Online (again), staff: say the availability chosen last (a new connection may start as
// "online"), then learn who else is there.
export async function followDesk() {
  const chosen = storedAvailability();
  if (chosen) await chooseAvailability(chosen);
  await loadDesk();
  if (!chosen && state.desk.has(state.me.sid)) {
    state.availability = state.desk.get(state.me.sid).availability;
    renderAvailability();
  }
}

// Every staff member the desk knows now (GetPresence without a conversation).
export async function loadDesk() {
  if (!state.deskAnswered || !state.me.staff) return;
  try {
    const { participants } = await state.chat.getPresence();
    state.desk.clear();
    for (const p of participants || []) {
      state.desk.set(p.user_id, { availability: p.availability, name: p.name });
      state.roles.set(p.user_id, true);
      if (typeof p.name === "string" && p.name.trim()) state.names.set(p.user_id, p.name.trim());
    }
    renderList();
  } catch (err) {
    if (err.code === "unknown_event") {
      state.deskAnswered = false;
      $("availability").closest("label").hidden = true;
    }
  }
}

// Event.ReceivePresence: a staff member's availability changed.
export function onPresence({ user_id: userId, availability }) {
  const known = state.desk.get(userId) || {};
  state.desk.set(userId, { ...known, availability });
  state.roles.set(userId, true);
  if (userId === state.me.sid && !storedAvailability()) {
    state.availability = availability;
    renderAvailability();
  }
  renderListSoon();
}

// A customer's page: whether an agent is available, now and every CUSTOMER_PRESENCE_MS
// (a customer receives no presence pushes). Stopped by followLists when offline.
export function followAgentAvailability() {
  clearInterval(state.timers.presence);
  loadAgentAvailability();
  state.timers.presence = setInterval(loadAgentAvailability, CUSTOMER_PRESENCE_MS);
}

// A customer's page that says no agent is there asks again as soon as someone answers
// (an agent writing is there, whatever the last look every 30 s said).
export function someoneAnswered() {
  if (!state.me.staff && state.staffAvailable === false) loadAgentAvailability();
}

async function loadAgentAvailability() {
  const channel = String(state.me.application);
  try {
    const result = await state.chat.getPresence(channel);
    for (const p of result.participants || []) {
      state.roles.set(p.user_id, Boolean(p.staff));
      if (typeof p.name === "string" && p.name.trim()) state.names.set(p.user_id, p.name.trim());
    }
    state.staffAvailable = typeof result.staff_available === "boolean" ? result.staff_available : null;
  } catch (err) {
    if (err.code === "unknown_event") {
      clearInterval(state.timers.presence);
      state.staffAvailable = null;
    }
  }
  renderAgentAvailability();
}

// --- wiring -----------------------------------------------------------------------------------

export function setupDesk() {
  $("desk-controls").addEventListener("click", (event) => {
    const set = event.target.closest("button[data-set-status]");
    if (set) {
      closeMenus();
      setStatus(set.dataset.setStatus);
      return;
    }
    const pick = event.target.closest("button[data-assign]");
    if (pick) assign(pick.dataset.assign === "none" ? null : Number(pick.dataset.assign));
  });
  $("assignee-button").addEventListener("click", toggleAssigneeMenu);
  $("snooze-button").addEventListener("click", toggleSnooze);
  $("snooze-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const when = new Date($("snooze-until").value); // local time
    if (Number.isNaN(when.getTime())) return;
    closeMenus();
    setStatus("snoozed", when);
  });
  $("assign-id").addEventListener("submit", (event) => {
    event.preventDefault();
    const id = Number(event.target.elements.id.value);
    if (Number.isSafeInteger(id) && id > 0) {
      event.target.reset();
      assign(id);
    }
  });
  // Escape or a click elsewhere closes an open menu.
  document.addEventListener("keydown", (event) => {
    if (event.key !== "Escape") return;
    const open = !$("assignee-menu").hidden ? $("assignee-button") : !$("snooze-form").hidden ? $("snooze-button") : null;
    if (!open) return;
    closeMenus();
    open.focus();
  });
  document.addEventListener("click", (event) => {
    if (!event.target.closest(".assignee-picker, .status-control")) closeMenus();
  });
  $("availability").addEventListener("change", (event) => chooseAvailability(event.target.value));
  // The inbox's tabs (arrow keys move between them, as in any tab list) and status filter.
  const tabs = [...$("inbox-tabs").querySelectorAll("[role=tab]")];
  const select = (tab) => {
    state.inbox.tab = tab.dataset.tab;
    renderList();
  };
  for (const tab of tabs) tab.addEventListener("click", () => select(tab));
  $("inbox-tabs").addEventListener("keydown", (event) => {
    const at = tabs.indexOf(document.activeElement);
    if (at < 0) return;
    const to = { ArrowRight: at + 1, ArrowLeft: at - 1, Home: 0, End: tabs.length - 1 }[event.key];
    if (to === undefined) return;
    event.preventDefault();
    const tab = tabs[(to + tabs.length) % tabs.length];
    select(tab);
    tab.focus();
  });
  $("status-filter").addEventListener("change", (event) => {
    state.inbox.show = event.target.value;
    renderList();
  });
}
