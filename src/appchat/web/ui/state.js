// What the page knows while it runs, in one object: every module imports it from here.

export const state = {
  chat: null, // the AppChat of this session
  me: null, // {sid, staff, application}
  // channel -> {channel, id, application_id, update_at, unread, joined, fresh, and from a desk
  // server: status, assignee_id, snooze_until, last_message, rev}
  conversations: new Map(),
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
  timers: { inbox: null, lists: null, listsAttempt: 0, presence: null }, // reloading lists, presence
  // The staff inbox: "live" (Event.SubscribeInbox answered: ConversationUpdated pushes), or
  // "polling" (a server without it), "off" until one of them is known; the tab shown
  // (mine, unassigned, all) and the statuses shown (active = open or pending, snoozed,
  // resolved, any).
  inbox: { mode: "off", tab: "all", show: "active", attempt: 0 },
  // The desk's staff as GetPresence (without a conversation) and ReceivePresence tell it:
  // user id -> {availability, name}; deskAnswered turns false on a server without it.
  desk: new Map(),
  deskAnswered: true,
  availability: "online", // this agent's own, as the header shows it
  // A customer's page: is some agent "online" (GetPresence's staff_available), null unknown.
  staffAvailable: null,
  notified: new Set(), // ids of customer messages already announced (push and inbox update)
  scroll: { atBottom: true, lastTop: 0 }, // the thread shows its newest message (kept there as it grows)
  // History (history.js): the message being edited {id, draft, error, saving}, the one
  // whose deletion waits for a confirmation (an id), the one a search result opened (an id),
  // the composer's "Note" mode (staff: a private note), and the search {query, results,
  // hasMore, nextCursor, loading, error} while its results show.
  editing: null,
  confirmDelete: null,
  highlight: null,
  noteMode: false,
  search: null,
};
