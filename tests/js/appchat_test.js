// Unit tests of appchat.js, run in headless Chromium by tests/test_appchat_js.py (no Node.js).
// A fake WebSocket class stands in for the network; a small fake server answers requests
// with the real protocol's semantics (after_id/before_id paging, client_msg_id dedupe).
import { AppChat, tokenClaims } from "/appchat.js";

function b64url(obj) {
  return btoa(JSON.stringify(obj)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function jwt(claims) {
  return `${b64url({ alg: "HS256", typ: "JWT" })}.${b64url(claims)}.signature`;
}

const inAnHour = () => Math.floor(Date.now() / 1000) + 3600;

function assert(condition, message) {
  if (!condition) throw new Error(`assertion failed: ${message}`);
}

function equal(actual, expected, message) {
  const a = JSON.stringify(actual);
  const e = JSON.stringify(expected);
  if (a !== e) throw new Error(`${message}: expected ${e}, got ${a}`);
}

/** Resolves when predicate() holds, checked after every event the client emits or frame the
 * server sees; rejects after `ms` (a failing test, not a wait). */
function until(server, predicate, what, ms = 3000) {
  return new Promise((resolve, reject) => {
    const check = () => {
      try {
        if (predicate()) {
          clearInterval(poll);
          clearTimeout(timer);
          resolve();
        }
      } catch (err) {
        reject(err);
      }
    };
    const poll = setInterval(check, 5);
    const timer = setTimeout(() => {
      clearInterval(poll);
      reject(new Error(`timed out waiting for ${what}`));
    }, ms);
    check();
  });
}

function fakeServer() {
  const server = {
    up: true,
    messages: [],
    nextId: 1,
    sockets: [],
    requests: [],
    hold: new Set(), // event names whose requests get no reply
    storeHeld: true, // a held SendMessage is still stored (the reply is what gets lost)
  };
  server.add = (channel, sender, content, clientMsgId) => {
    const m = {
      id: server.nextId++,
      session_channel: channel,
      content,
      sender_id: sender,
      status: 0,
      create_at: new Date().toISOString(),
      update_at: new Date().toISOString(),
      content_type: 1,
    };
    if (clientMsgId) m.client_msg_id = clientMsgId;
    server.messages.push(m);
    return m;
  };
  server.last = () => server.sockets[server.sockets.length - 1];
  server.handle = (socket, frame) => {
    server.requests.push(frame);
    const args = frame.args;
    let result = null;
    if (frame.name === "Event.GetMessageList") {
      const all = server.messages.filter((m) => m.session_channel === args.session_channel);
      const limit = args.limit ?? 50;
      if (args.after_id !== undefined) {
        const after = all.filter((m) => m.id > args.after_id);
        result = { Messages: after.slice(0, limit), has_more: after.length > limit };
      } else {
        const before = all.filter((m) => args.before_id === undefined || m.id < args.before_id);
        result = { Messages: before.slice(-limit), has_more: before.length > limit };
      }
    } else if (frame.name === "Event.SendMessage") {
      const found = server.messages.find(
        (m) => m.session_channel === args.session_channel && m.client_msg_id === args.client_msg_id,
      );
      if (!found && !(server.hold.has(frame.name) && !server.storeHeld)) {
        result = { message: server.add(args.session_channel, 2, args.content, args.client_msg_id) };
      } else {
        result = { message: found };
      }
    } else if (frame.name === "Event.RefreshToken") {
      result = { exp: tokenClaims(args.token).exp };
    }
    if (server.hold.has(frame.name)) return;
    socket.deliver({ name: frame.name, ok: true, result, id: frame.id });
  };
  server.Socket = class FakeSocket {
    constructor(url, protocols) {
      this.url = url;
      this.protocols = protocols;
      this.closed = false;
      server.sockets.push(this);
      setTimeout(() => (server.up ? this.onopen({}) : this.drop(1006)), 0);
    }
    send(data) {
      const frame = JSON.parse(data);
      frame.args = JSON.parse(frame.args);
      if (!this.closed) setTimeout(() => server.handle(this, frame), 0);
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
    url: "ws://test/ws?sid=2",
    token: jwt({ request_id: 100, sid: 2, exp: inAnHour() }),
    WebSocket: server.Socket,
    backoffMin: 5,
    backoffMax: 20,
    ...options,
  });
  const seen = { messages: [], states: [], resumed: 0, errors: [] };
  chat.on("message", ({ message, source }) => seen.messages.push([message.id, source]));
  chat.on("state", ({ state }) => seen.states.push(state));
  chat.on("resumed", () => seen.resumed++);
  chat.on("error", (e) => seen.errors.push(e));
  return { chat, seen };
}

export const tests = {
  async "replies are matched to requests by id"() {
    const server = fakeServer();
    server.hold.add("Event.GetUnreadInfo");
    server.hold.add("Event.GetConversationList");
    const { chat } = client(server);
    chat.start();
    await chat.ready();
    const a = chat.call("Event.GetUnreadInfo", {});
    const b = chat.call("Event.GetConversationList", { all: true });
    await until(server, () => server.requests.length === 2, "both requests");
    const [ra, rb] = server.requests;
    equal([ra.name, rb.name], ["Event.GetUnreadInfo", "Event.GetConversationList"], "sent");
    equal(rb.args, { all: true }, "args are sent as JSON text and decode to the object");
    server.last().deliver({ name: rb.name, ok: true, result: "second", id: rb.id });
    server.last().deliver({
      name: ra.name, ok: false, result: null, id: ra.id,
      error: { code: "forbidden", message: "no" },
    });
    equal(await b, "second", "b's reply");
    const err = await a.then(() => null, (e) => e);
    equal([err.name, err.code, err.message], ["AppChatError", "forbidden", "no"], "a's error");
    chat.close();
  },

  async "a reply that never comes times out and the connection goes on"() {
    const server = fakeServer();
    server.hold.add("Event.GetUnreadInfo");
    const { chat, seen } = client(server);
    chat.start();
    await chat.ready();
    const err = await chat.call("Event.GetUnreadInfo", {}, { timeout: 30 }).then(
      () => null,
      (e) => e,
    );
    equal(err && err.code, "timeout", "the error code");
    equal(chat._pending.size, 0, "nothing is left waiting");
    const late = server.requests[0];
    server.last().deliver({ name: late.name, ok: true, result: "late", id: late.id });
    equal(seen.errors.length, 1, "a late reply is reported, not mistaken for another");
    server.hold.clear();
    equal(await chat.call("Event.GetUnreadInfo", {}), null, "the next request works");
    equal(chat.state, "online", "still online");
    chat.close();
  },

  async "calls while offline fail at once, pending ones fail on disconnect"() {
    const server = fakeServer();
    server.hold.add("Event.GetUnreadInfo");
    const { chat } = client(server);
    const offline = await chat.call("Event.GetUnreadInfo").then(() => null, (e) => e.code);
    equal(offline, "offline", "before start");
    chat.start();
    await chat.ready();
    const pending = chat.call("Event.GetUnreadInfo");
    await until(server, () => server.requests.length === 1, "the request");
    server.up = false;
    server.last().drop(1006);
    equal(await pending.then(() => null, (e) => e.code), "disconnected", "in flight");
    chat.close();
  },

  async "reconnects with backoff and walks through the states"() {
    const server = fakeServer();
    const { chat, seen } = client(server);
    chat.start();
    await chat.ready();
    server.up = false;
    server.last().drop(1001);
    await until(server, () => server.sockets.length >= 3, "two failed attempts");
    server.up = true;
    await until(server, () => chat.state === "online", "back online");
    equal(seen.states.slice(0, 4), ["connecting", "online", "offline", "connecting"], "states");
    equal(seen.states.at(-1), "online", "last state");
    assert(seen.states.filter((s) => s === "offline").length >= 2, "offline between attempts");
    equal(chat._attempt, 0, "backoff resets once online");
    chat.close();
    equal(seen.states.at(-1), "closed", "closed");
  },

  async "resume after a reconnect: every message once, paged with after_id"() {
    const server = fakeServer();
    for (const text of ["a", "b", "c"]) server.add("100", 1, text);
    const { chat, seen } = client(server, { pageSize: 2 });
    chat.start();
    await chat.ready();
    const page = await chat.history("100");
    equal(page.messages.map((m) => m.id), [1, 2, 3], "history");
    equal(chat.cursor("100"), 3, "cursor after history");
    const pushed = server.add("100", 1, "d");
    server.last().push("Event.ReceiveMessage", { message: pushed });
    server.last().push("Event.ReceiveMessage", { message: pushed }); // a duplicate push
    equal(seen.messages, [[4, "push"]], "the push, once");
    server.up = false;
    server.last().drop(1006);
    server.add("100", 1, "e");
    server.add("200", 1, "another conversation");
    server.add("100", 1, "f");
    server.up = true;
    await until(server, () => seen.resumed === 1, "resumed");
    equal(seen.messages, [[4, "push"], [5, "resume"], [7, "resume"]], "each message once");
    const catchUp = server.requests
      .filter((r) => r.name === "Event.GetMessageList" && r.args.after_id !== undefined)
      .map((r) => [r.args.after_id, r.args.limit]);
    equal(catchUp, [[3, 2], [5, 2]], "after_id from the fetched cursor, page by page");
    equal(chat.cursor("100"), 7, "cursor");
    chat.close();
  },

  async "a catch-up that times out is tried again, with backoff"() {
    const server = fakeServer();
    server.add("100", 1, "a");
    const { chat, seen } = client(server, { requestTimeout: 30 });
    chat.start();
    await chat.ready();
    await chat.history("100");
    server.up = false;
    server.last().drop(1006);
    server.add("100", 1, "missed");
    server.hold.add("Event.GetMessageList"); // a server too busy to answer in time
    server.up = true;
    await until(server, () => seen.errors.some((e) => e.during === "resume" && e.retryIn > 0), "a timed-out catch-up");
    equal(seen.resumed, 0, "not resumed yet");
    server.hold.delete("Event.GetMessageList");
    await until(server, () => seen.resumed === 1, "resumed on a retry");
    equal(seen.messages, [[2, "resume"]], "the missed message, once");
    const catchUp = server.requests.filter((r) => r.name === "Event.GetMessageList" && r.args.after_id !== undefined);
    assert(catchUp.length >= 2 && catchUp.every((r) => r.args.after_id === 1), "asked again from the same cursor");
    equal(chat.state, "online", "no reconnect needed");
    chat.close();
  },

  async "a Resync push fetches what was missed, once"() {
    const server = fakeServer();
    server.add("100", 1, "a");
    const { chat, seen } = client(server);
    chat.start();
    await chat.ready();
    await chat.history("100");
    server.add("100", 1, "missed while the server's broker was away");
    server.last().push("Event.Resync", null);
    await until(server, () => seen.resumed === 1, "first resync");
    equal(seen.messages, [[2, "resume"]], "the missed message");
    server.last().push("Event.Resync", null);
    server.last().push("Event.Resync", null);
    await until(server, () => seen.resumed >= 2, "more resyncs");
    equal(seen.messages, [[2, "resume"]], "nothing twice");
    equal(chat.state, "online", "no reconnect needed");
    chat.close();
  },

  async "a send whose reply is lost is retried with the same client_msg_id"() {
    const server = fakeServer();
    server.hold.add("Event.SendMessage");
    const { chat, seen } = client(server);
    chat.start();
    await chat.ready();
    await chat.history("100");
    const sent = chat.send("100", "hello", { clientMsgId: "k-1" });
    await until(server, () => server.messages.length === 1, "stored, reply held");
    server.hold.clear();
    server.last().drop(1006);
    const message = await sent;
    equal([message.id, message.client_msg_id], [1, "k-1"], "the stored message");
    const sends = server.requests.filter((r) => r.name === "Event.SendMessage");
    equal(sends.map((r) => r.args.client_msg_id), ["k-1", "k-1"], "sent twice, same key");
    equal(server.messages.length, 1, "stored once");
    await until(server, () => seen.resumed === 1, "resumed");
    equal(seen.messages.map(([id]) => id), [1], "shown once");
    chat.close();
  },

  async "a message written offline is sent once the client is online"() {
    const server = fakeServer();
    server.up = false;
    const { chat } = client(server);
    chat.start();
    const sent = chat.send("100", "written offline");
    equal(chat.unsent.map((m) => m.content), ["written offline"], "waiting");
    await until(server, () => chat.state === "offline", "offline");
    server.up = true;
    const message = await sent;
    equal([message.content, server.messages.length, chat.unsent.length], ["written offline", 1, 0], "sent");
    chat.close();
  },

  async "the token is renewed through getToken before it expires"() {
    const server = fakeServer();
    const fresh = jwt({ request_id: 100, sid: 2, exp: inAnHour() });
    const reasons = [];
    const { chat } = client(server, {
      token: jwt({ request_id: 100, sid: 2, exp: Math.floor(Date.now() / 1000) + 1 }),
      getToken: async (reason) => {
        reasons.push(reason);
        return fresh;
      },
    });
    chat.start();
    await chat.ready();
    await until(server, () => chat.token === fresh, "the new token in use", 4000);
    const refresh = server.requests.find((r) => r.name === "Event.RefreshToken");
    equal([refresh.args.token === fresh, reasons], [true, ["refresh"]], "RefreshToken sent");
    chat.close();
  },

  async "close 4001 asks for a new token and reconnects with it"() {
    const server = fakeServer();
    const fresh = jwt({ request_id: 100, sid: 2, exp: inAnHour() });
    const { chat } = client(server, { getToken: async () => fresh });
    chat.start();
    await chat.ready();
    server.last().drop(4001);
    await until(server, () => server.sockets.length === 2 && chat.state === "online", "reconnected");
    equal(server.last().protocols, ["access_token", fresh], "the new token in the handshake");
    chat.close();
  },

  async "close 4001 without a way to renew ends in token_expired"() {
    const server = fakeServer();
    const { chat, seen } = client(server);
    chat.start();
    await chat.ready();
    server.last().drop(4001);
    await until(server, () => chat.state === "token_expired", "token_expired");
    equal([server.sockets.length, chat._timers.reconnect], [1, null], "no reconnect planned");
    equal(seen.states.at(-1), "token_expired", "the last state");
    const expired = new AppChat({
      url: "ws://test/ws?sid=2",
      token: jwt({ admin_id: 1, exp: 1 }),
      WebSocket: server.Socket,
    });
    expired.start();
    await until(server, () => expired.state === "token_expired", "an expired token");
    equal(server.sockets.length, 1, "an expired token is not even tried");
  },

  async "close 4009 (disconnected by the server API) does not reconnect"() {
    const server = fakeServer();
    const { chat, seen } = client(server);
    chat.start();
    await chat.ready();
    server.last().drop(4009);
    await until(server, () => chat.state === "closed", "closed");
    equal([server.sockets.length, chat._timers.reconnect], [1, null], "no reconnect planned");
    equal(seen.states.at(-1), "closed", "the last state");
  },

  async "the token goes only to this server's upload and file paths"() {
    const server = fakeServer();
    const token = jwt({ request_id: 100, sid: 2, exp: inAnHour() });
    const chat = new AppChat({ url: "ws://test/ws?sid=2", token, WebSocket: server.Socket });
    const calls = [];
    const realFetch = window.fetch;
    window.fetch = async (url, init) => {
      calls.push([url, init.headers.Authorization]);
      return new Response(new Blob(["x"]), { status: 200 });
    };
    try {
      for (const path of ["https://evil.example/a.png", "//evil.example/files/100/" + "a".repeat(32), "/files/100/../../api/x"]) {
        let code = null;
        try {
          await chat.fetchImage(path);
        } catch (err) {
          code = err.code;
        }
        equal(code, "bad_request", `refused: ${path}`);
      }
      equal(calls.length, 0, "nothing fetched, no token sent");
      await chat.fetchImage("/files/100/" + "a".repeat(32) + "/thumb");
      equal(calls, [["http://test/files/100/" + "a".repeat(32) + "/thumb?sid=2", `Bearer ${token}`]], "this server");
    } finally {
      window.fetch = realFetch;
    }
  },
};

window.appchatTests = tests;
window.runAppchatTest = async (name) => {
  try {
    await tests[name]();
    return "ok";
  } catch (err) {
    return String(err && err.stack ? err.stack : err);
  }
};
