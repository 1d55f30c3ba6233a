// How times, conversations and people are written.

import { state } from "./state.js";

export const timeFmt = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });
const dayFmt = new Intl.DateTimeFormat(undefined, { weekday: "long", month: "long", day: "numeric" });

export function dayLabel(date) {
  const today = new Date();
  const yesterday = new Date(Date.now() - 86400000);
  if (date.toDateString() === today.toDateString()) return "Today";
  if (date.toDateString() === yesterday.toDateString()) return "Yesterday";
  return dayFmt.format(date);
}

export function shortTime(iso) {
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return "";
  if (date.toDateString() === new Date().toDateString()) return timeFmt.format(date);
  return date.toLocaleDateString(undefined, { month: "short", day: "numeric" });
}

export function conversationTitle(c) {
  return `Request #${c.application_id}`;
}

// Who is who. A message may carry its sender's display name (`sender_name`, from the
// token's `name` claim); GetPresence, where the server has it, says which participants
// are staff. Without that news, the others in a customer's conversation are support, and
// those in a staff member's view customers; the desk's staff list (GetPresence without a
// conversation) and assignees are staff.
export function learnName(m) {
  if (typeof m.sender_name === "string" && m.sender_name.trim()) state.names.set(m.sender_id, m.sender_name.trim());
}

export function personName(userId) {
  if (userId === state.me.sid) return "You";
  const name = state.names.get(userId);
  const staff = state.roles.has(userId) ? state.roles.get(userId) : state.desk.has(userId) || !state.me.staff;
  if (staff) return name ? `${name} (support)` : `Support #${userId}`;
  return name || "Customer";
}

// A staff member, as the desk shows them (an assignee, the assignee picker): "You", their
// display name, or "Support #N".
export function staffName(userId) {
  if (userId === state.me.sid) return "You";
  const name = state.names.get(userId) || state.desk.get(userId)?.name;
  return name || `Support #${userId}`;
}

// Is this participant staff, as far as the page knows (GetPresence, an assignee)?
export function isStaff(userId) {
  if (userId === state.me.sid) return state.me.staff;
  return state.roles.get(userId) === true || state.desk.has(userId);
}

export const STATUS_LABELS = { open: "Open", pending: "Pending", resolved: "Resolved", snoozed: "Snoozed" };

// "Open", "Pending", "Resolved", "Snoozed until 09:00" (or "until Dec 3").
export function statusText(c) {
  const label = STATUS_LABELS[c.status] || "Open";
  if (c.status === "snoozed" && c.snooze_until) return `${label} until ${shortTime(c.snooze_until)}`;
  return label;
}

// One line of a message for a list row or a notification.
export function messagePreview(m) {
  if (!m) return "";
  if (m.deleted) return "Message deleted";
  if (m.content_type === 2) return "Image";
  return String(m.content || "").replace(/\s+/g, " ").trim();
}

export const AVAILABILITY_LABELS = { online: "Online", busy: "Busy", offline: "Offline" };
