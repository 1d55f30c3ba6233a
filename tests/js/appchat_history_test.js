// Unit tests of appchat.js's history calls, run in headless Chromium by
// tests/test_appchat_js_history.py. A fake WebSocket class stands in for the network; the
// fake server records every request and answers it (null, or what `answers` says for its name).
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
  for (const name of ["message", "messageUpdated", "resumed", "error"]) {
    chat.on(name, (detail) => seen.push({ name, detail }));
  }
  return { chat, seen };
}


const msg = (id, rev, extra = {}) => ({
  id, session_channel: "100", content: `m${id}`, sender_id: 2, status: 0, content_type: 1,
  create_at: "2030-01-01T00:00:00Z", update_at: "2030-01-01T00:00:00Z", rev, ...extra,
});

// GetMessageList answered from `pages`: the newest page, after_id and changed_since lists.
function messageLists(server, { newest = [], after = [], changed = [] }) {
  server.answers.set("Event.GetMessageList", (args) => {
    if (args.changed_since !== undefined) {
      if (typeof changed === "function") return changed(args);
      const list = changed.filter((m) => m.rev > args.changed_since);
      return { result: { Messages: list.slice(0, args.limit), has_more: list.length > args.limit } };
    }
    if (args.after_id !== undefined) {
      return { result: { Messages: after.filter((m) => m.id > args.after_id), has_more: false } };
    }
    return { result: { Messages: newest, has_more: false } };
  });
}

const events = (seen, name) => seen.filter((e) => e.name === name).map((e) => e.detail);

window.appchatHistoryTests = {
  async "the history calls' arguments, replies and events"() {
    const server = fakeServer();
    server.answers.set("Event.EditMessage", (args) => ({ result: { message: msg(args.id, 4, { content: args.content, edited_at: "2030-01-01T00:01:00Z" }) } }));
    server.answers.set("Event.DeleteMessage", (args) => ({ result: { message: msg(args.id, 5, { content: "", deleted: true }) } }));
    server.answers.set("Event.SendMessage", (args) => ({ result: { message: msg(9, 6, { content: args.content, ...(args.private ? { private: true } : {}) }) } }));
    server.answers.set("Event.SearchMessages", () => ({ result: { results: [{ message: msg(1, 1), snippet: "m1" }], has_more: true, next_cursor: "c2" } }));
    const { chat, seen } = client(server);
    chat.start();
    await chat.ready();
    equal((await chat.editMessage("7", "better")).content, "better", "editMessage resolves with the message");
    equal((await chat.deleteMessage(8)).deleted, true, "deleteMessage resolves with the stub");
    await chat.send("100", "a note", { private: true });
    await chat.send("100", "a reply");
    equal(server.named("Event.EditMessage"), [{ id: 7, content: "better" }], "EditMessage's args");
    equal(server.named("Event.DeleteMessage"), [{ id: 8 }], "DeleteMessage's args");
    equal(server.named("Event.SendMessage").map((a) => a.private), [true, undefined], "private only when set");
    const page = await chat.searchMessages("parcel", { channel: 100, limit: 5, cursor: "c1" });
    await chat.searchMessages("parcel");
    equal(server.named("Event.SearchMessages"), [
      { query: "parcel", limit: 5, session_channel: "100", cursor: "c1" },
      { query: "parcel", limit: 20 },
    ], "SearchMessages's args");
    equal(page, { results: [{ message: msg(1, 1), snippet: "m1" }], hasMore: true, nextCursor: "c2" }, "a search page");
    server.last().push("Event.MessageUpdated", { message: msg(3, 7, { content: "", deleted: true }) });
    await until(() => events(seen, "messageUpdated").length === 3, "the push as an event");
    equal(events(seen, "messageUpdated").map((e) => [e.message.id, e.source]), [[7, "edit"], [8, "delete"], [3, "push"]], "messageUpdated events");
    chat.close();
  },

  async "resume asks what changed since the highest rev held, and emits each change once"() {
    const server = fakeServer();
    const old = [msg(1, 1), msg(2, 2), msg(3, 3)];
    const edited = msg(2, 6, { content: "m2 edited", edited_at: "2030-01-01T00:02:00Z" });
    const created = msg(4, 7);
    messageLists(server, { newest: old, after: [created], changed: [edited, created] });
    const { chat, seen } = client(server);
    chat.start();
    await chat.ready();
    await chat.history("100");
    equal(chat.rev("100"), 3, "the highest rev of the page");
    server.last().push("Event.MessageUpdated", { message: msg(1, 5, { content: "", deleted: true }) });
    await until(() => chat.rev("100") === 5, "a push's rev held");
    server.last().drop();
    await until(() => events(seen, "resumed").length === 1, "the catch-up");
    const lists = server.named("Event.GetMessageList");
    equal(lists.slice(1), [
      { session_channel: "100", after_id: 3, limit: 100 },
      { session_channel: "100", changed_since: 5, limit: 100 },
    ], "after_id, then changed_since from the rev held before the catch-up");
    equal(events(seen, "message").map((e) => [e.message.id, e.source]), [[4, "resume"]], "the new message once");
    equal(events(seen, "messageUpdated").map((e) => [e.message.id, e.message.content, e.source]), [
      [1, "", "push"],
      [2, "m2 edited", "resume"],
    ], "the edit made while away");
    equal(chat.rev("100"), 7, "the rev held now");
    equal(events(seen, "error"), [], "no error");
    chat.close();
  },

  async "changed_since is read page after page, by rev"() {
    const server = fakeServer();
    const changed = [msg(1, 11, { content: "a" }), msg(2, 12, { content: "b" }), msg(3, 13, { content: "c" })];
    messageLists(server, { newest: [msg(1, 1), msg(2, 2), msg(3, 3)], changed });
    const { chat, seen } = client(server, { pageSize: 2 });
    chat.start();
    await chat.ready();
    await chat.history("100");
    server.last().drop();
    await until(() => events(seen, "resumed").length === 1, "the catch-up");
    equal(server.named("Event.GetMessageList").filter((a) => "changed_since" in a).map((a) => a.changed_since), [3, 12], "two pages");
    equal(events(seen, "messageUpdated").map((e) => e.message.content), ["a", "b", "c"], "every change");
    chat.close();
  },

  async "a server that refuses changed_since: caught up without it, never asked again"() {
    const server = fakeServer();
    messageLists(server, {
      newest: [msg(1, 1)],
      after: [msg(2, 2)],
      changed: () => ({ error: { code: "bad_request", message: "unknown argument" } }),
    });
    const { chat, seen } = client(server);
    chat.start();
    await chat.ready();
    await chat.history("100");
    server.last().drop();
    await until(() => events(seen, "resumed").length === 1, "the first catch-up");
    server.last().drop();
    await until(() => events(seen, "resumed").length === 2, "the second catch-up");
    equal(server.named("Event.GetMessageList").filter((a) => "changed_since" in a).length, 1, "asked once");
    equal(events(seen, "message").map((e) => e.message.id), [2], "the new message");
    equal(events(seen, "error"), [], "nothing said");
    chat.close();
  },

  async "messages without a rev (an older server): changed_since is never asked"() {
    const server = fakeServer();
    const plain = (id) => { const m = msg(id, 0); delete m.rev; return m; };
    server.answers.set("Event.GetMessageList", (args) => (
      args.after_id !== undefined ? { result: { Messages: [], has_more: false } }
        : { result: { Messages: [plain(1), plain(2)], has_more: true } }
    ));
    const { chat, seen } = client(server);
    chat.start();
    await chat.ready();
    await chat.history("100");
    equal(chat.rev("100"), 0, "no rev known");
    server.last().drop();
    await until(() => events(seen, "resumed").length === 1, "the catch-up");
    equal(server.named("Event.GetMessageList").filter((a) => "changed_since" in a).length, 0, "not asked without a rev");
    equal(events(seen, "messageUpdated"), [], "nothing changed");
    chat.close();
  },
};

window.runAppchatHistoryTest = async (name) => {
  try {
    await window.appchatHistoryTests[name]();
    return "ok";
  } catch (err) {
    return `${err.message}\n${err.stack}`;
  }
};
