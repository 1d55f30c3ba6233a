// appchat.js: a small browser client for the appchat WebSocket protocol (docs/protocol.md).
//
// An ES module with no dependencies and no build step; the server serves it at /appchat.js.
//
//   import { AppChat } from "/appchat.js";
//   const chat = new AppChat({ url: "ws://127.0.0.1:8888/ws?sid=2", token: jwt,
//                              getToken: async () => fetchNewTokenFromYourBackend() });
//   chat.on("state", ({ state }) => ...);          // connecting | online | offline | token_expired | refused | closed
//   chat.on("message", ({ message }) => ...);      // each message exactly once (push or catch-up)
//   chat.start();
//   const { messages } = await chat.history("100"); // the newest page; "100" is now followed
//   await chat.send("100", "Hello");                // survives reconnects (client_msg_id)
//   await chat.sendImage("100", fileInput.files[0]); // POST /upload, then an image message
//   const blob = await chat.fetchImage(message.content + "/thumb"); // with the token
//
// History (see docs/protocol.md):
//   chat.on("messageUpdated", ({ message, source }) => ...); // an edit or a deletion:
//                                                   // replace the copy held if its rev is higher
//   await chat.editMessage(id, "new text");          // its sender, within the edit window
//   await chat.deleteMessage(id);                    // its sender, or any staff
//   await chat.send("100", "Called them", { private: true }); // a note only staff see
//   const { results, hasMore, nextCursor } = await chat.searchMessages("parcel");
//
// The support desk (staff; see docs/protocol.md):
//   chat.on("conversation", ({ conversation }) => ...); // Event.ConversationUpdated pushes
//   chat.on("presence", ({ user_id, availability }) => ...); // Event.ReceivePresence pushes
//   chat.on("inbox", ({ filter }) => ...);          // subscribed again (after a reconnect or
//                                                   // Resync): refetch the list, pushes were missed
//   await chat.subscribeInbox("all");                // "all" | "mine" | "unassigned"
//   await chat.assignConversation("100", 7);          // or null: nobody
//   await chat.setConversationStatus("100", "snoozed", new Date(Date.now() + 3600e3));
//   await chat.setAvailability("busy");               // "online" | "busy" | "offline"
//   const { participants, staff_available } = await chat.getPresence("100");
//
// What it does for you: request/reply matched by id, with a timeout; pushes as events;
// reconnects with backoff; after a reconnect or an Event.Resync push it fetches, for every
// followed conversation, everything after the last message it knows (GetMessageList with
// after_id), so no message is lost or shown twice, then asks what changed meanwhile
// (GetMessageList with changed_since, the highest rev it holds) and emits each edit and
// deletion as "messageUpdated" (a server without changed_since: skipped); renews the token with RefreshToken before
// it expires, through the getToken callback the page supplies. An inbox subscription
// (subscribeInbox) is made again on every new connection and after Event.Resync, then an
// "inbox" event tells the page to refetch its list.

export const CONNECTING = "connecting";
export const ONLINE = "online";
export const OFFLINE = "offline";
export const TOKEN_EXPIRED = "token_expired";
export const CLOSED = "closed";
export const REFUSED = "refused";

const CLOSE_TOKEN_EXPIRED = 4001;
const CLOSE_DISCONNECTED = 4009; // by the server API (a request closed, a user banned)
const RETRYABLE = new Set(["offline", "disconnected", "timeout", "unavailable", "rate_limited"]);

/** An error reply ({code, message}), or a local one: offline, disconnected, timeout. */
export class AppChatError extends Error {
  constructor(code, message) {
    super(message || code);
    this.name = "AppChatError";
    this.code = code;
  }
}

/** The claims of a JWT, unverified (only the server verifies): for exp, sid, admin_id… */
export function tokenClaims(jwt) {
  try {
    const part = String(jwt).split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const text = atob(part + "===".slice((part.length + 3) % 4));
    const bytes = Uint8Array.from(text, (c) => c.charCodeAt(0));
    const claims = JSON.parse(new TextDecoder().decode(bytes));
    return claims && typeof claims === "object" ? claims : {};
  } catch {
    return {};
  }
}

/**
 * Would the server take this token? POST /auth/check answers what a refused WebSocket
 * handshake cannot tell a browser: {ok: true, role, id[, application_id]}, or
 * {ok: false, code, message} with the handshake's reason. null: no verdict (the server
 * could not be reached, is older, or failed), so go on as before.
 */
export async function checkToken(httpBase, token, sid = null) {
  const url = new URL("/auth/check", httpBase);
  if (sid) url.searchParams.set("sid", String(sid));
  try {
    const response = await fetch(url.href, { method: "POST", headers: { Authorization: `Bearer ${token}` } });
    if (response.ok) return await response.json();
    if (![400, 401, 403].includes(response.status)) return null;
    const error = (await response.json()).error || {};
    if (!error.code || !error.message) return null;
    return { ok: false, code: error.code, message: error.message };
  } catch {
    return null;
  }
}

/** A fresh client_msg_id: a random UUID (32 random hex digits in a browser without randomUUID). */
export function randomId() {
  if (globalThis.crypto && typeof crypto.randomUUID === "function") return crypto.randomUUID();
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

export class AppChat extends EventTarget {
  /**
   * @param {object} options
   * @param {string} options.url           ws(s)://host/ws?sid=N
   * @param {string} options.token         the JWT
   * @param {function} [options.getToken] async (reason) => a new JWT or null; reason is
   *        "refresh" (before expiry), "expired" (the token ran out) or "refused" (the
   *        server refused it: POST /auth/check said why; without a new token the state
   *        becomes "refused", with {code, reason}, and the client stops)
   * @param {number} [options.requestTimeout=10000] ms to wait for a reply
   * @param {number} [options.refreshMargin=60] renew this many seconds before exp
   * @param {number} [options.backoffMin=500]  first reconnect delay, ms (doubles each time)
   * @param {number} [options.backoffMax=15000]
   * @param {number} [options.pageSize=100] messages per catch-up request
   * @param {function} [options.WebSocket] the WebSocket class (tests pass a fake)
   */
  constructor(options) {
    super();
    this.url = options.url;
    this.token = options.token;
    this.getToken = options.getToken || null;
    this.requestTimeout = options.requestTimeout ?? 10000;
    this.refreshMargin = options.refreshMargin ?? 60;
    this.backoffMin = options.backoffMin ?? 500;
    this.backoffMax = options.backoffMax ?? 15000;
    this.pageSize = options.pageSize ?? 100;
    this.WebSocket = options.WebSocket || globalThis.WebSocket;
    this.state = CLOSED;
    this._ws = null;
    this._nextId = 1;
    this._pending = new Map(); // request id -> {resolve, reject, timer}
    this._followed = new Map(); // session_channel -> {cursor, seen: Set of ids > cursor, rev}
    this._changedSince = true; // false once the server refused GetMessageList changed_since
    this._outbox = []; // sends waiting for a connection
    this._attempt = 0;
    this._timers = { reconnect: null, refresh: null, flush: null, resume: null, inbox: null };
    this._resumeAttempt = 0;
    this._resuming = null;
    this._resumeAgain = false;
    this._inbox = null; // the filter of the inbox subscription, or null
    this._inboxAttempt = 0;
    this._stopped = true;
  }

  // --- events ---------------------------------------------------------------------------------

  /** Listen to an event; returns a function that stops listening. fn gets the event detail. */
  on(name, fn) {
    const listener = (event) => fn(event.detail);
    this.addEventListener(name, listener);
    return () => this.removeEventListener(name, listener);
  }

  _emit(name, detail) {
    this.dispatchEvent(new CustomEvent(name, { detail }));
  }

  _setState(state, extra = {}) {
    this.state = state;
    this._emit("state", { state, ...extra });
  }

  // --- connection -----------------------------------------------------------------------------

  /** Connect (and keep reconnecting until close()). */
  start() {
    this._stopped = false;
    this._connect();
    return this;
  }

  /** Resolves once the client is online (or at once if it is). */
  ready() {
    if (this.state === ONLINE) return Promise.resolve();
    return new Promise((resolve) => {
      const off = this.on("state", ({ state }) => {
        if (state === ONLINE) {
          off();
          resolve();
        }
      });
    });
  }

  close() {
    this._stopped = true;
    this._clearTimers();
    const ws = this._ws;
    this._ws = null;
    if (ws) ws.close(1000);
    this._failPending("disconnected", "the client was closed");
    for (const item of this._outbox.splice(0)) {
      item.reject(new AppChatError("disconnected", "the client was closed"));
    }
    this._setState(CLOSED);
  }

  _clearTimers() {
    for (const key of Object.keys(this._timers)) {
      clearTimeout(this._timers[key]);
      this._timers[key] = null;
    }
  }

  _tokenExpired() {
    const exp = Number(tokenClaims(this.token).exp);
    return Number.isFinite(exp) && exp * 1000 <= Date.now();
  }

  async _connect() {
    if (this._stopped) return;
    if (this._tokenExpired() && !(await this._renewExpired())) return;
    this._setState(CONNECTING, { attempt: this._attempt });
    let ws;
    try {
      ws = new this.WebSocket(this.url, ["access_token", this.token]);
    } catch (err) {
      this._scheduleReconnect(0, String(err));
      return;
    }
    this._ws = ws;
    let opened = false;
    ws.onopen = () => {
      if (this._ws !== ws) return;
      opened = true;
      this._attempt = 0;
      this._setState(ONLINE);
      this._scheduleRefresh();
      this._flushOutbox();
      if (this._followed.size) this.resume();
      if (this._inbox !== null) this._resubscribeInbox();
    };
    ws.onmessage = (event) => {
      if (this._ws === ws) this._onFrame(event.data);
    };
    ws.onclose = (event) => {
      if (this._ws !== ws) return;
      this._ws = null;
      this._failPending("disconnected", "the connection closed");
      clearTimeout(this._timers.refresh);
      clearTimeout(this._timers.resume); // the next connection resumes anyway
      clearTimeout(this._timers.inbox); // and subscribes again
      if (event.code === CLOSE_TOKEN_EXPIRED) {
        this._renewExpired().then((renewed) => renewed && this._connect());
        return;
      }
      if (event.code === CLOSE_DISCONNECTED) {
        this.close(); // on purpose: no reconnect; the state becomes "closed"
        return;
      }
      this._scheduleReconnect(event.code, event.reason);
      // Never opened: the handshake may have refused the token, which a browser cannot
      // see (1006 either way). Ask the server, while the reconnect waits.
      if (!opened) this._checkRefusal();
    };
  }

  async _checkRefusal() {
    const token = this.token;
    const verdict = await checkToken(this.httpBase, token, new URL(this.url).searchParams.get("sid"));
    if (!verdict || verdict.ok || this._stopped || this.state !== OFFLINE || this.token !== token) return;
    clearTimeout(this._timers.reconnect);
    let fresh = null;
    if (this.getToken) {
      try {
        fresh = await this.getToken("refused");
      } catch {
        fresh = null;
      }
    }
    if (fresh && fresh !== token && !this._stopped) {
      this.token = fresh;
      this._connect();
      return;
    }
    this._stopped = true;
    this._clearTimers();
    this._failPending("unauthorized", verdict.message);
    for (const item of this._outbox.splice(0)) {
      item.reject(new AppChatError(verdict.code, verdict.message));
    }
    this._setState(REFUSED, { code: verdict.code, reason: verdict.message });
  }

  _scheduleReconnect(code, reason) {
    if (this._stopped) return;
    const base = Math.min(this.backoffMax, this.backoffMin * 2 ** this._attempt);
    const delay = Math.round(base / 2 + (Math.random() * base) / 2);
    this._attempt += 1;
    this._setState(OFFLINE, { code, reason, retryIn: delay });
    clearTimeout(this._timers.reconnect);
    this._timers.reconnect = setTimeout(() => this._connect(), delay);
  }

  /** Connect again now instead of waiting for the backoff (e.g. on a "Retry" button). */
  retryNow() {
    if (this.state !== OFFLINE) return;
    clearTimeout(this._timers.reconnect);
    this._connect();
  }

  /** The token ran out: ask the page for a new one; without one the client stops. */
  async _renewExpired() {
    let fresh = null;
    if (this.getToken) {
      try {
        fresh = await this.getToken("expired");
      } catch {
        fresh = null;
      }
    }
    if (fresh) {
      this.token = fresh;
      return true;
    }
    this._stopped = true;
    this._clearTimers();
    this._failPending("disconnected", "the token expired");
    this._setState(TOKEN_EXPIRED);
    return false;
  }

  _scheduleRefresh() {
    clearTimeout(this._timers.refresh);
    const exp = Number(tokenClaims(this.token).exp);
    if (!this.getToken || !Number.isFinite(exp)) return;
    const left = exp * 1000 - Date.now();
    const margin = Math.min(this.refreshMargin * 1000, left / 2);
    this._timers.refresh = setTimeout(() => this.refreshToken(), Math.max(0, left - margin));
  }

  /** Renew the token now through getToken and Event.RefreshToken. */
  async refreshToken() {
    if (!this.getToken || this.state !== ONLINE) return false;
    try {
      const fresh = await this.getToken("refresh");
      if (!fresh) return false;
      await this.call("Event.RefreshToken", { token: fresh });
      this.token = fresh;
      return true;
    } catch (err) {
      this._emit("error", { error: err, during: "Event.RefreshToken" });
      return false;
    } finally {
      if (this.state === ONLINE) this._scheduleRefresh();
    }
  }

  // --- requests -------------------------------------------------------------------------------

  /**
   * Send a request; resolves with its result, rejects with an AppChatError: the server's
   * code, or "offline" (not connected), "disconnected" (closed before the reply),
   * "timeout" (no reply within the timeout; the request may still have been executed).
   */
  call(name, args = {}, { timeout = this.requestTimeout } = {}) {
    const ws = this._ws;
    if (!ws || this.state !== ONLINE) {
      return Promise.reject(new AppChatError("offline", "not connected"));
    }
    const id = this._nextId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._pending.delete(id);
        reject(new AppChatError("timeout", `no reply to ${name} within ${timeout} ms`));
      }, timeout);
      this._pending.set(id, { resolve, reject, timer });
      ws.send(JSON.stringify({ name, args: JSON.stringify(args), id }));
    });
  }

  _failPending(code, message) {
    for (const [id, p] of this._pending) {
      clearTimeout(p.timer);
      p.reject(new AppChatError(code, message));
      this._pending.delete(id);
    }
  }

  _onFrame(data) {
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      return;
    }
    if (!frame || typeof frame !== "object") return;
    const p = frame.id !== undefined ? this._pending.get(frame.id) : undefined;
    if (p) {
      this._pending.delete(frame.id);
      clearTimeout(p.timer);
      if (frame.ok) p.resolve(frame.result);
      else p.reject(new AppChatError(frame.error?.code || "error", frame.error?.message));
      return;
    }
    if (!frame.ok || frame.id !== undefined) {
      this._emit("error", { frame });
      return;
    }
    this._emit("push", frame);
    const result = frame.result;
    switch (frame.name) {
      case "Event.ReceiveMessage":
        if (result && result.message) this._deliver(result.message, "push");
        break;
      case "Event.MessageRead":
        this._emit("read", result);
        break;
      case "Event.ReceiveTyping":
        this._emit("typing", result);
        break;
      case "Event.Resync":
        this.resume();
        if (this._inbox !== null) this._resubscribeInbox();
        break;
      case "Event.ConversationUpdated":
        if (result && result.conversation) this._emit("conversation", result);
        break;
      case "Event.ReceivePresence":
        if (result) this._emit("presence", result);
        break;
      case "Event.MessageUpdated":
        if (result && result.message) this._updated(result.message, "push");
        break;
      default:
        break;
    }
  }

  // --- conversations: history, catch-up, sending ----------------------------------------------

  /** Follow a conversation: after a reconnect or Resync, fetch what came after cursor. */
  follow(channel, cursor = 0) {
    channel = String(channel);
    const known = this._followed.get(channel);
    if (known) {
      this._advance(known, cursor);
      return;
    }
    this._followed.set(channel, { cursor, seen: new Set(), rev: 0 });
  }

  unfollow(channel) {
    this._followed.delete(String(channel));
  }

  /** The highest id up to which every message of the conversation is known. */
  cursor(channel) {
    const f = this._followed.get(String(channel));
    return f ? f.cursor : null;
  }

  _advance(f, cursor) {
    if (cursor <= f.cursor) return;
    f.cursor = cursor;
    for (const id of f.seen) if (id <= cursor) f.seen.delete(id);
  }

  /** The highest rev of the conversation's messages this client has seen (0: none). */
  rev(channel) {
    const f = this._followed.get(String(channel));
    return f ? f.rev : null;
  }

  _seeRev(message) {
    const f = this._followed.get(String(message.session_channel));
    const rev = Number(message.rev);
    if (f && Number.isInteger(rev) && rev > f.rev) f.rev = rev;
  }

  /** Emit an edit or a deletion of a message (the copy to keep if its rev is the higher). */
  _updated(message, source) {
    this._seeRev(message);
    this._emit("messageUpdated", { message, source });
  }

  /** Emit a message once: ids at or below the cursor, or already seen, are dropped. */
  _deliver(message, source) {
    this._seeRev(message);
    const f = this._followed.get(String(message.session_channel));
    if (f) {
      if (message.id <= f.cursor || f.seen.has(message.id)) return false;
      f.seen.add(message.id);
    }
    this._emit("message", { message, source });
    return true;
  }

  /**
   * A page of history, oldest first: the newest messages, or those before beforeId.
   * The newest page also follows the conversation from its newest message on.
   */
  async history(channel, { beforeId = null, limit = 50 } = {}) {
    channel = String(channel);
    const args = { session_channel: channel, limit };
    if (beforeId !== null) args.before_id = beforeId;
    const page = await this.call("Event.GetMessageList", args);
    const messages = page.Messages || [];
    if (beforeId === null) this.follow(channel, 0);
    for (const m of messages) this._seeRev(m);
    if (beforeId === null) {
      const f = this._followed.get(channel);
      const newest = messages.length ? messages[messages.length - 1].id : 0;
      for (const m of messages) if (m.id > f.cursor) f.seen.add(m.id);
      this._advance(f, newest);
    }
    return { messages, hasMore: Boolean(page.has_more) };
  }

  /**
   * Catch up every followed conversation: GetMessageList with after_id = its cursor, page
   * after page; new messages are emitted as "message" (source "resume"), then "resumed".
   * Runs once at a time; asked again meanwhile, it runs once more afterwards.
   */
  resume() {
    if (this._resuming) {
      this._resumeAgain = true;
      return this._resuming;
    }
    this._resuming = (async () => {
      try {
        do {
          this._resumeAgain = false;
          for (const [channel, f] of this._followed) {
            const fetched = new Set(); // ids this catch-up delivered: their newest copy
            const since = f.rev; // before what the catch-up brings raises it
            let more = true;
            while (more && this._followed.get(channel) === f) {
              const page = await this.call("Event.GetMessageList", {
                session_channel: channel,
                after_id: f.cursor,
                limit: this.pageSize,
              });
              const messages = page.Messages || [];
              for (const m of messages) {
                if (this._deliver(m, "resume")) fetched.add(m.id);
              }
              if (messages.length) this._advance(f, messages[messages.length - 1].id);
              more = Boolean(page.has_more) && messages.length > 0;
            }
            await this._catchUpChanges(channel, f, since, fetched);
          }
        } while (this._resumeAgain);
        this._resumeAttempt = 0;
        this._emit("resumed", { channels: [...this._followed.keys()] });
      } catch (err) {
        if (RETRYABLE.has(err.code) && this.state === ONLINE && !this._stopped) {
          // Still connected but no answer in time (a loaded server), or the server is
          // unavailable for a moment: try again, from the same cursors, with backoff.
          const base = Math.min(this.backoffMax, this.backoffMin * 2 ** this._resumeAttempt);
          const retryIn = Math.round(base / 2 + (Math.random() * base) / 2);
          this._resumeAttempt += 1;
          clearTimeout(this._timers.resume);
          this._timers.resume = setTimeout(() => this.resume(), retryIn);
          this._emit("error", { error: err, during: "resume", retryIn });
        } else {
          // Offline again: the next connection resumes from the same cursors.
          this._emit("error", { error: err, during: "resume" });
        }
      } finally {
        this._resuming = null;
      }
    })();
    return this._resuming;
  }

  /**
   * What changed in a conversation since the highest rev held: GetMessageList with
   * changed_since, page after page. A message newer than the cursor is delivered as
   * "message"; an older one (an edit, a deletion) is emitted as "messageUpdated" (source
   * "resume"). Skipped while no rev is known; a server that refuses changed_since
   * (bad_request: an older one) or ignores it is not asked again.
   */
  async _catchUpChanges(channel, f, since, fetched) {
    while (this._changedSince && since > 0 && this._followed.get(channel) === f) {
      let page;
      try {
        page = await this.call("Event.GetMessageList", {
          session_channel: channel,
          changed_since: since,
          limit: this.pageSize,
        });
      } catch (err) {
        if (err.code !== "bad_request") throw err;
        this._changedSince = false;
        return;
      }
      const messages = page.Messages || [];
      let highest = since;
      for (const m of messages) {
        const rev = Number(m.rev);
        if (!Number.isInteger(rev)) {
          this._changedSince = false; // a server that ignored changed_since
          return;
        }
        if (rev > highest) highest = rev;
        if (m.id > f.cursor) {
          if (this._deliver(m, "resume")) fetched.add(m.id);
        } else if (!fetched.has(m.id)) {
          this._updated(m, "resume");
        } else {
          this._seeRev(m);
        }
      }
      if (!page.has_more || highest <= since) return;
      since = highest;
    }
  }

  /**
   * Store a message; resolves with it once the server has it. While offline, or if the
   * connection drops before the reply, it is sent again (same client_msg_id, so never twice)
   * as soon as the client is online. Rejects only for errors a retry cannot fix.
   */
  send(channel, content, { contentType = 1, clientMsgId = randomId(), private: note = false } = {}) {
    const args = {
      session_channel: String(channel),
      content,
      content_type: contentType,
      client_msg_id: clientMsgId,
    };
    if (note) args.private = true; // a private note: staff only
    return new Promise((resolve, reject) => {
      const item = { args, resolve, reject, sending: false };
      this._outbox.push(item);
      if (this.state === ONLINE) this._sendItem(item);
    });
  }

  // --- images -------------------------------------------------------------------------------

  /** The server's HTTP origin, from the WebSocket URL (ws -> http, wss -> https). */
  get httpBase() {
    const url = new URL(this.url);
    url.protocol = url.protocol === "wss:" ? "https:" : "http:";
    return url.origin;
  }

  _authorized(path) {
    // The token goes to this server's /upload and /files/... only: an image message whose
    // content names another origin (or any other path) never receives it.
    if (typeof path !== "string" || !/^\/(upload|files\/\d+\/[0-9a-f]{32}(\/thumb)?)$/.test(path)) {
      throw new AppChatError("bad_request", "not an upload path of this server");
    }
    // The sid of the WebSocket URL names the participant, as it does for the socket.
    const url = new URL(path, this.httpBase);
    const sid = new URL(this.url).searchParams.get("sid");
    if (sid) url.searchParams.set("sid", sid);
    return { url: url.href, headers: { Authorization: `Bearer ${this.token}` } };
  }

  /**
   * Upload an image (a File or Blob: PNG, JPEG, WebP or GIF) for a conversation.
   * Resolves with {reference, content_type, size, width, height, url, thumbnail_url}.
   */
  async upload(channel, file) {
    const body = new FormData();
    body.append("application_id", String(channel));
    body.append("file", file, file.name || "image");
    const { url, headers } = this._authorized("/upload");
    let response;
    try {
      response = await fetch(url, { method: "POST", headers, body });
    } catch (err) {
      throw new AppChatError("offline", `the upload did not reach the server: ${err.message}`);
    }
    const doc = await response.json().catch(() => ({}));
    if (!response.ok) {
      const error = doc.error || {};
      throw new AppChatError(error.code || "http_" + response.status, error.message || `the server answered ${response.status}`);
    }
    return doc;
  }

  /** Upload an image and send it as a message (content_type 2). Resolves with the message. */
  async sendImage(channel, file, { clientMsgId = randomId(), private: note = false } = {}) {
    const uploaded = await this.upload(channel, file);
    return this.send(channel, uploaded.reference, { contentType: 2, clientMsgId, private: note });
  }

  /** The bytes behind an image reference (or its thumbnail_url) as a Blob. */
  async fetchImage(path) {
    const { url, headers } = this._authorized(path);
    let response;
    try {
      response = await fetch(url, { headers });
    } catch (err) {
      throw new AppChatError("offline", `the image could not be fetched: ${err.message}`);
    }
    if (!response.ok) throw new AppChatError(response.status === 404 ? "not_found" : "http_" + response.status, `the server answered ${response.status}`);
    return response.blob();
  }

  /** Messages accepted by send() and not stored yet (to show as pending). */
  get unsent() {
    return this._outbox.map((item) => ({ ...item.args }));
  }

  async _sendItem(item) {
    if (item.sending) return;
    item.sending = true;
    try {
      const result = await this.call("Event.SendMessage", item.args);
      this._outbox.splice(this._outbox.indexOf(item), 1);
      this._deliver(result.message, "send");
      item.resolve(result.message);
    } catch (err) {
      if (!RETRYABLE.has(err.code)) {
        this._outbox.splice(this._outbox.indexOf(item), 1);
        item.reject(err);
      } else if (this.state === ONLINE) {
        clearTimeout(this._timers.flush); // still connected (a timeout): try again shortly
        this._timers.flush = setTimeout(() => this._flushOutbox(), 1000);
      }
    } finally {
      item.sending = false;
    }
  }

  _flushOutbox() {
    for (const item of this._outbox) this._sendItem(item);
  }

  // --- history: edits, deletions, search ----------------------------------------------------

  /**
   * Change the text of one's own message (within the server's edit window; not an image).
   * Resolves with the message (edited_at set); also emitted as "messageUpdated" (source
   * "edit"), as the other participants get it.
   */
  async editMessage(id, content) {
    const result = await this.call("Event.EditMessage", { id: Number(id), content });
    this._updated(result.message, "edit");
    return result.message;
  }

  /**
   * Delete a message (one's own; staff: any). Resolves with its stub ({deleted: true,
   * content: ""}); also emitted as "messageUpdated" (source "delete").
   */
  async deleteMessage(id) {
    const result = await this.call("Event.DeleteMessage", { id: Number(id) });
    this._updated(result.message, "delete");
    return result.message;
  }

  /**
   * Search the messages this user may read (staff: every conversation; a customer: their
   * own), newest first; channel narrows it to one conversation, cursor (a nextCursor)
   * asks for the next page. Resolves with {results: [{message, snippet?}], hasMore,
   * nextCursor}.
   */
  async searchMessages(query, { channel = null, limit = 20, cursor = null } = {}) {
    const args = { query: String(query), limit };
    if (channel !== null && channel !== undefined) args.session_channel = String(channel);
    if (cursor !== null && cursor !== undefined) args.cursor = cursor;
    const page = await this.call("Event.SearchMessages", args);
    return {
      results: page.results || [],
      hasMore: Boolean(page.has_more),
      nextCursor: page.next_cursor ?? null,
    };
  }

  /** Tell the others this user is typing (call it while they type; the server throttles). */
  typing(channel) {
    return this.call("Event.Typing", { session_channel: String(channel) });
  }

  /** Mark everything up to messageId as read. */
  read(channel, messageId) {
    return this.call("Event.ReadMessage", {
      session_channel: String(channel),
      message_id: messageId,
    });
  }

  // --- the support desk (staff, except getPresence) -------------------------------------------

  /**
   * Receive Event.ConversationUpdated pushes ("conversation" events) for every conversation
   * in `filter` ("all", "mine" or "unassigned"); calling it again replaces the filter. Kept
   * across reconnects: each new connection subscribes again and then emits "inbox". Rejects
   * with the server's error: `unknown_event` from a server without the desk.
   */
  async subscribeInbox(filter = "all") {
    const result = await this.call("Event.SubscribeInbox", { filter });
    this._inbox = filter;
    this._inboxAttempt = 0;
    return result;
  }

  /** Stop the ConversationUpdated pushes (and their renewal on reconnect). */
  unsubscribeInbox() {
    this._inbox = null;
    clearTimeout(this._timers.inbox);
    return this.call("Event.UnsubscribeInbox", {});
  }

  /** The filter the inbox subscription holds, or null. */
  get inboxFilter() {
    return this._inbox;
  }

  async _resubscribeInbox() {
    const filter = this._inbox;
    clearTimeout(this._timers.inbox);
    try {
      await this.call("Event.SubscribeInbox", { filter });
      if (this._inbox !== filter) return; // replaced or dropped meanwhile
      this._inboxAttempt = 0;
      this._emit("inbox", { filter });
    } catch (err) {
      if (this._inbox !== filter) return;
      if (RETRYABLE.has(err.code) && this.state === ONLINE && !this._stopped) {
        const base = Math.min(this.backoffMax, this.backoffMin * 2 ** this._inboxAttempt);
        const retryIn = Math.round(base / 2 + (Math.random() * base) / 2);
        this._inboxAttempt += 1;
        this._timers.inbox = setTimeout(() => this._resubscribeInbox(), retryIn);
        this._emit("error", { error: err, during: "Event.SubscribeInbox", retryIn });
      } else if (!RETRYABLE.has(err.code)) {
        // The server no longer offers it (or refuses it): no subscription any more.
        this._inbox = null;
        this._emit("inbox", { filter: null, error: err });
      }
      // offline: the next connection subscribes again
    }
  }

  /** Assign a conversation to a staff id, or to nobody (null). Resolves with the conversation. */
  async assignConversation(channel, assigneeId) {
    const result = await this.call("Event.AssignConversation", {
      session_channel: String(channel),
      assignee_id: assigneeId === null || assigneeId === undefined ? null : Number(assigneeId),
    });
    return result.conversation;
  }

  /**
   * Set a conversation's status: "open", "pending", "resolved" or "snoozed" (with
   * snoozeUntil, a Date or an RFC 3339 string). Resolves with the conversation.
   */
  async setConversationStatus(channel, status, snoozeUntil = null) {
    const args = { session_channel: String(channel), status };
    if (status === "snoozed") {
      args.snooze_until = snoozeUntil instanceof Date ? snoozeUntil.toISOString() : snoozeUntil;
    }
    const result = await this.call("Event.SetConversationStatus", args);
    return result.conversation;
  }

  /** This staff member's availability: "online", "busy" or "offline". */
  setAvailability(availability) {
    return this.call("Event.SetAvailability", { availability });
  }

  /**
   * {participants: [{user_id, staff, availability, name?}], staff_available}: of one
   * conversation, or (staff, no channel) every staff member the desk knows now.
   */
  getPresence(channel = null) {
    return this.call("Event.GetPresence", channel === null ? {} : { session_channel: String(channel) });
  }
}
