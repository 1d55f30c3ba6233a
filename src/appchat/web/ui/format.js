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
// those in a staff member's view customers.
export function learnName(m) {
  if (typeof m.sender_name === "string" && m.sender_name.trim()) state.names.set(m.sender_id, m.sender_name.trim());
}

export function personName(userId) {
  if (userId === state.me.sid) return "You";
  const name = state.names.get(userId);
  const staff = state.roles.has(userId) ? state.roles.get(userId) : !state.me.staff;
  if (staff) return name ? `${name} (support)` : `Support #${userId}`;
  return name || "Customer";
}
