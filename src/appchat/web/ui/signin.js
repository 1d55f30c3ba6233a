// Signing in (a token pasted in, or in --dev one click that mints one) and out; the session
// is kept in sessionStorage, so that a reload stays signed in.

import { checkToken, tokenClaims } from "/appchat.js";
import { $ } from "./dom.js";

const SESSION_KEY = "appchat.session";

export function showSignin(error) {
  $("app").hidden = true;
  $("signin").hidden = false;
  $("signin-error").hidden = !error;
  $("signin-error").textContent = error || "";
}

export function saveSession(session) {
  sessionStorage.setItem(SESSION_KEY, JSON.stringify(session));
}

// The session of this tab, if it may still be used: its token has not expired, or it is a
// dev session (which mints its next token itself).
export function savedSession() {
  const saved = JSON.parse(sessionStorage.getItem(SESSION_KEY) || "null");
  if (saved && saved.token && !(Number(tokenClaims(saved.token).exp) * 1000 <= Date.now() && !saved.dev)) return saved;
  return null;
}

export function signOut() {
  sessionStorage.removeItem(SESSION_KEY);
  location.reload();
}

export async function devToken(body) {
  const response = await fetch("/dev/token", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  const doc = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(doc.error || `the server answered ${response.status}`);
  return doc;
}

// --dev's "Join as" buttons: the session, or null (the reason shown).
export async function joinDev(body) {
  try {
    const { token, sid } = await devToken(body);
    return { token, sid, dev: body };
  } catch (err) {
    showSignin(`Could not join: ${err.message}`);
    return null;
  }
}

// The token form: the session, or null (the reason shown).
export async function signinWithToken(event) {
  event.preventDefault();
  const form = event.target;
  const token = form.token.value.trim();
  const claims = tokenClaims(token);
  if (claims.admin_id == null && claims.request_id == null) {
    showSignin("This does not look like an appchat token (no admin_id or request_id claim).");
    return null;
  }
  if (Number(claims.exp) * 1000 <= Date.now()) {
    showSignin("This token has expired. Ask for a new one.");
    return null;
  }
  const sid = Number(form.sid.value || claims.sid || claims.sub || claims.admin_id);
  if (!Number.isSafeInteger(sid) || sid < 1) {
    showSignin("This token names no participant: enter your participant id.");
    return null;
  }
  // Only the server can tell a token it refuses (another key, its clock, the sid): ask it
  // before signing in, since a browser cannot read why a WebSocket handshake failed.
  const button = form.querySelector("button[type=submit]");
  button.disabled = true;
  const verdict = await checkToken(location.origin, token, sid);
  button.disabled = false;
  if (verdict && !verdict.ok) {
    showSignin(`This token was refused: ${verdict.message}.`);
    return null;
  }
  return { token, sid };
}
