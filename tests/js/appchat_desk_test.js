// Unit tests of appchat.js's support-desk calls, run in headless Chromium by
// tests/test_appchat_js_desk.py. A fake WebSocket class stands in for the network; the fake
// server records every request and answers it (null, or what `answers` says for its name).
import { AppChat } from "/appchat.js";

function b64url(obj) {
  return btoa(JSON.stringify(obj)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

const staffToken = () =>
  `${b64url({ alg: "HS256" })}.${b64url({ admin_id: 1, exp: Math.floor(Date.now() / 1000) + 3600 })}.sig`;

function equal(actual, expected, message) {
  const a = JSON.stringify(actual);
  const e = JSON.stringify(expected);
  if (a !== e) throw new Error(`${message}: expected ${e}, got ${a}`);
}

// Resolves when predicate() holds; rejects after `ms` (a failing test, not a wait).
function until(predicate, what, ms = 3000) {
  return new Promise((resolve, reject) => {
    const poll = setInterval(() => {
      if (predicate()) {
        clearInterval(poll);
        clearTimeout(timer);
        resolve();
      }
    }, 5);
    const timer = setTimeout(() => {
      clearInterval(poll);
      reject(new Error(`timed out waiting for ${what}`));
    }, ms);
  });
}

function fakeServer() {
  const server = {
    sockets: [],
    requests: [],
    // name -> a function (args) => {result} | {error} | "hold" (no reply)
    answers: new Map(),
  };
  server.last = () => server.sockets[server.sockets.length - 1];
  server.named = (name) => server.requests.filter((r) => r.name === name).map((r) => r.args);
  server.Socket = class FakeSocket {
    constructor() {
      this.closed = false;
      server.sockets.push(this);
      setTimeout(() => this.onopen({}), 0);
    }
    send(data) {
      const frame = JSON.parse(data);
      frame.args = JSON.parse(frame.args);
      if (this.closed) return;
      server.requests.push(frame);
      const answer = server.answers.get(frame.name)?.(frame.args) ?? { result: null };
      if (answer === "hold") return;
      const reply = answer.error
        ? { name: frame.name, ok: false, result: null, error: answer.error, id: frame.id }
        : { name: frame.name, ok: true, result: answer.result, id: frame.id };
      setTimeout(() => this.deliver(reply), 0);
    }
    close() {
      this.closed = true;
    }
    deliver(frame) {
      if (!this.closed) this.onmessage({ data: JSON.stringify(frame) });
    }
    push(name, result) {
      this.deliver({ name, ok: true, result });
    }
    drop(code = 1006) {
      if (this.closed) return;
      this.closed = true;
      this.onclose({ code, reason: "" });
    }
  };
  return server;
}

function client(server, options = {}) {
  const chat = new AppChat({
    url: "ws://test/ws?sid=1",
    token: staffToken(),
    WebSocket: server.Socket,
    backoffMin: 10,
    backoffMax: 40,
    ...options,
  });
  const seen = [];
  for (const name of ["inbox", "conversation", "presence", "error"]) {
    chat.on(name, (detail) => seen.push({ name, detail }));
  }
  return { chat, seen };
}

const conversation = (rev) => ({ id: 1, session_channel: "100", application_id: 100, status: "open", rev });

window.appchatDeskTests = {
  async "the inbox is subscribed again on every new connection, then an inbox event"() {
    const server = fakeServer();
    const { chat, seen } = client(server);
    chat.start();
    await chat.ready();
    equal(chat.inboxFilter, null, "no subscription before subscribeInbox");
    await chat.subscribeInbox("mine");
    equal(chat.inboxFilter, "mine", "the filter held");
    equal(seen.filter((e) => e.name === "inbox").length, 0, "no inbox event for the first one");
    server.last().drop();
    await until(() => seen.some((e) => e.name === "inbox"), "the inbox event");
    equal(server.named("Event.SubscribeInbox"), [{ filter: "mine" }, { filter: "mine" }], "subscribed again");
    equal(server.sockets.length, 2, "on the new connection");
    equal(seen.find((e) => e.name === "inbox").detail, { filter: "mine" }, "the inbox event");
    chat.close();
  },

  async "a Resync push subscribes again"() {
    const server = fakeServer();
    const { chat, seen } = client(server);
    chat.start();
    await chat.ready();
    await chat.subscribeInbox("all");
    server.last().push("Event.Resync", null);
    await until(() => seen.some((e) => e.name === "inbox"), "the inbox event");
    equal(server.named("Event.SubscribeInbox").length, 2, "subscribed again on the same connection");
    chat.close();
  },

  async "a subscription that times out is tried again; one the server refuses ends"() {
    const server = fakeServer();
    const { chat, seen } = client(server, { requestTimeout: 50 });
    chat.start();
    await chat.ready();
    await chat.subscribeInbox("unassigned");
    let asked = 0;
    server.answers.set("Event.SubscribeInbox", () => (++asked < 3 ? "hold" : { result: null }));
    server.last().drop();
    await until(() => seen.some((e) => e.name === "inbox"), "the inbox event", 5000);
    equal(asked, 3, "asked until it answered");
    const retries = seen.filter((e) => e.name === "error" && e.detail.during === "Event.SubscribeInbox");
    equal(retries.length, 2, "each timeout an error event");
    equal(retries.every((e) => e.detail.retryIn > 0), true, "with the delay of the next try");
    // A server that no longer has the desk: the subscription ends, and is not made again.
    server.answers.set("Event.SubscribeInbox", () => ({ error: { code: "unknown_event", message: "no" } }));
    server.last().drop();
    await until(() => chat.inboxFilter === null, "the subscription dropped");
    const last = seen.filter((e) => e.name === "inbox").at(-1).detail;
    equal([last.filter, last.error.code], [null, "unknown_event"], "said with its reason");
    const before = server.named("Event.SubscribeInbox").length;
    server.last().drop();
    await until(() => server.sockets.length === 4 && chat.state === "online", "online again");
    await chat.call("Event.GetUnreadInfo", {});
    equal(server.named("Event.SubscribeInbox").length, before, "not subscribed again");
    chat.close();
  },

  async "unsubscribeInbox: no subscription on the next connection"() {
    const server = fakeServer();
    const { chat } = client(server);
    chat.start();
    await chat.ready();
    await chat.subscribeInbox("all");
    await chat.unsubscribeInbox();
    equal(chat.inboxFilter, null, "dropped");
    server.last().drop();
    await until(() => server.sockets.length === 2 && chat.state === "online", "online again");
    await chat.call("Event.GetUnreadInfo", {});
    equal(server.named("Event.SubscribeInbox").length, 1, "not subscribed again");
    equal(server.named("Event.UnsubscribeInbox"), [{}], "told the server");
    chat.close();
  },

  async "the desk's calls and pushes"() {
    const server = fakeServer();
    server.answers.set("Event.AssignConversation", (a) => ({ result: { conversation: { ...conversation(2), assignee_id: a.assignee_id } } }));
    server.answers.set("Event.SetConversationStatus", (a) => ({ result: { conversation: { ...conversation(3), status: a.status } } }));
    server.answers.set("Event.GetPresence", () => ({ result: { participants: [], staff_available: false } }));
    const { chat, seen } = client(server);
    chat.start();
    await chat.ready();
    equal((await chat.assignConversation(100, 7)).assignee_id, 7, "resolves with the conversation");
    await chat.assignConversation("100", null);
    await chat.setConversationStatus("100", "snoozed", new Date(Date.UTC(2030, 0, 2, 9, 30)));
    equal((await chat.setConversationStatus("100", "resolved")).status, "resolved", "the new status");
    await chat.setAvailability("busy");
    equal(await chat.getPresence(), { participants: [], staff_available: false }, "the presence");
    await chat.getPresence(100);
    equal(server.named("Event.AssignConversation"), [
      { session_channel: "100", assignee_id: 7 },
      { session_channel: "100", assignee_id: null },
    ], "assignments");
    equal(server.named("Event.SetConversationStatus"), [
      { session_channel: "100", status: "snoozed", snooze_until: "2030-01-02T09:30:00.000Z" },
      { session_channel: "100", status: "resolved" },
    ], "statuses: snooze_until only with snoozed, in RFC 3339 UTC");
    equal(server.named("Event.SetAvailability"), [{ availability: "busy" }], "availability");
    equal(server.named("Event.GetPresence"), [{}, { session_channel: "100" }], "presence: the desk, a conversation");
    server.last().push("Event.ConversationUpdated", { conversation: conversation(5) });
    server.last().push("Event.ReceivePresence", { user_id: 3, availability: "offline" });
    await until(() => seen.length >= 2, "the pushes");
    equal(seen.map((e) => [e.name, e.detail]), [
      ["conversation", { conversation: conversation(5) }],
      ["presence", { user_id: 3, availability: "offline" }],
    ], "as events");
    chat.close();
  },
};

window.runAppchatDeskTest = async (name) => {
  try {
    await window.appchatDeskTests[name]();
    return "ok";
  } catch (err) {
    return `${err.message}\n${err.stack}`;
  }
};
