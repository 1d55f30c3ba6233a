// What the page knows while it runs, in one object: every module imports it from here.

export const state = {
  chat: null, // the AppChat of this session
  me: null, // {sid, staff, application}
  conversations: new Map(), // channel -> {channel, application_id, update_at, unread, joined}
  threads: new Map(), // channel -> {messages: Map id -> message, hasMore, loadingOlder, readUpTo, loaded}
  pending: new Map(), // client_msg_id -> {channel, content, content_type, create_at, failed, file, preview}
  typists: new Map(), // channel -> Map user_id -> timer
  openChannel: null,
  // Who is who: display names (a message's `sender_name`, GetPresence) and staff or not
  // (GetPresence); presenceAnswered turns false once the server said it has no GetPresence.
  names: new Map(), // user id -> display name
  roles: new Map(), // user id -> true for staff, false for a customer
  presenceAnswered: true,
  imageUrls: new Map(), // path -> Promise of a blob: URL
  typing: { lastSent: 0, lastInputAt: 0, timer: null }, // what we tell others while the user types
  timers: { inbox: null, lists: null, listsAttempt: 0 }, // reloading the conversation list
  scroll: { atBottom: true, lastTop: 0 }, // the thread shows its newest message (kept there as it grows)
};
