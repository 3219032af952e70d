// The demo page: log in, pick a room, chat. It uses only the public API (api.js, socket.js).
// Every piece of user text goes into the page with textContent, never as HTML.

import { Api, ApiError } from "./api.js";
import { ChatSocket } from "./socket.js";

const TYPING_SHOWN_MS = 3_000;
const PAGE = 50;
const ROOM_KEY = "chat.room";  // the open room, per tab like the session

const $ = (id) => document.getElementById(id);
const api = new Api();
let socket = null;
let state = null;

function freshState() {
  return {
    rooms: new Map(),    // room id -> room list item (GET /rooms), its unread_count kept live
    stores: new Map(),   // room id -> Map(seq -> latest message)
    pending: new Map(),  // client_id -> {room_id, body}, until acked
    online: new Map(),   // room id -> Map(user id -> user)
    typing: new Map(),   // `${room id} ${user id}` -> {room, name, timer}
    readSent: new Map(), // room id -> the seq last sent in `read`
    loadingOlder: false,
    active: null,
  };
}

function el(tag, attrs = {}, text) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = text;  // text, never markup
  return node;
}

// --- logging in ---------------------------------------------------------------------------------

function showAuth(error = "") {
  $("chat-view").hidden = true;
  $("auth-view").hidden = false;
  $("auth-error").textContent = error;
  $("username").focus();
}

$("auth-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const action = event.submitter?.value === "signup" ? "signup" : "login";
  const [username, password] = [$("username").value.trim(), $("password").value];
  $("auth-error").textContent = "";
  try {
    await api[action](username, password);
    $("password").value = "";
    enterChat();
  } catch (error) {
    $("auth-error").textContent = error instanceof ApiError ? error.message : "Network error";
  }
});

$("logout").addEventListener("click", async () => {
  leaveChat();
  await api.logout().catch(() => {});
  showAuth();
});

api.onLogout = () => { leaveChat(); showAuth("Your session ended: log in again."); };

function leaveChat() {
  socket?.close();
  socket = null;
  for (const entry of state?.typing.values() ?? []) clearTimeout(entry.timer);
  state = null;
  closeRoom();
  $("rooms").replaceChildren();
}

async function enterChat() {
  state = freshState();
  $("auth-view").hidden = true;
  $("chat-view").hidden = false;
  $("me").textContent = api.user.display_name;
  socket = new ChatSocket(api, { onMessage, onFrame, onStatus });
  socket.connect();
  await loadRooms();
  const saved = sessionStorage.getItem(ROOM_KEY);
  if (saved && state?.rooms.has(saved)) selectRoom(saved);
}

// --- rooms --------------------------------------------------------------------------------------

async function loadRooms() {
  const current = state;
  try {
    let cursor = null;
    do {
      const page = await api.call("GET", `/rooms?limit=200${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""}`);
      if (state !== current) return;  // logged out meanwhile
      for (const room of page.items) {
        state.rooms.set(room.id, { ...state.rooms.get(room.id), ...room });
        // Follow every room I am in, for live unread counts.
        if (room.role && !socket.rooms.has(room.id)) socket.join(room.id);
      }
      cursor = page.next_cursor;
    } while (cursor);
    renderRooms();
  } catch (error) {
    if (state === current) notify(error);
  }
}

function renderRooms() {
  const list = $("rooms");
  list.replaceChildren();
  for (const room of state.rooms.values()) {
    const button = el("button", { type: "button", class: "room-button", "data-testid": "room",
                                  "data-room-id": room.id });
    if (room.id === state.active) button.setAttribute("aria-current", "true");
    button.append(el("span", { class: "room-name" }, `# ${room.name}`));
    if (!room.role) button.append(el("span", { class: "hint" }, "join"));
    if (room.unread_count > 0) {
      button.append(el("span", { class: "badge", "data-testid": "unread",
                                 "aria-label": `${room.unread_count} unread` }, room.unread_count));
    }
    button.addEventListener("click", () => selectRoom(room.id));
    const item = el("li");
    item.append(button);
    list.append(item);
  }
}

$("refresh-rooms").addEventListener("click", loadRooms);

$("new-room").addEventListener("submit", async (event) => {
  event.preventDefault();
  try {
    const room = await api.call("POST", "/rooms", { name: $("new-room-name").value });
    if (!state) return;
    $("new-room-name").value = "";
    state.rooms.set(room.id, { ...room, role: "owner", last_seq: 0, unread_count: 0 });
    selectRoom(room.id);
  } catch (error) {
    notify(error);
  }
});

function selectRoom(roomId) {
  const room = state?.rooms.get(roomId);
  if (!room) return;
  state.active = roomId;
  sessionStorage.setItem(ROOM_KEY, roomId);
  socket.join(roomId);  // a public room: joining makes me a member; also refreshes history
  $("room-title").textContent = `# ${room.name}`;
  $("composer-input").disabled = $("composer").querySelector("button").disabled = false;
  $("notice").textContent = "";
  renderRooms();
  renderMessages(true);
  renderOnline();
  renderTyping();
  markRead();
  $("composer-input").focus();
}

// --- messages -----------------------------------------------------------------------------------

function store(roomId) {
  if (!state.stores.has(roomId)) state.stores.set(roomId, new Map());
  return state.stores.get(roomId);
}

function onMessage(message, clientId) {
  if (!state) return;
  if (clientId) state.pending.delete(clientId);
  const messages = store(message.room_id);
  const old = messages.get(message.seq);
  if (old && old.change_seq >= message.change_seq) return;  // a copy we already have
  messages.set(message.seq, message);
  const room = state.rooms.get(message.room_id);
  if (!old && room && message.author.id !== api.user.id) {
    stopTyping(message.room_id, message.author.id);
    if (message.room_id !== state.active && message.seq > (room.last_seq ?? 0)) {
      room.unread_count = (room.unread_count ?? 0) + 1;
    }
  }
  if (room) room.last_seq = Math.max(room.last_seq ?? 0, message.seq);
  if (message.room_id === state.active) {
    scheduleRender();
    markRead();
  } else if (room) {
    renderRooms();
  }
}

let renderQueued = false;
function scheduleRender() {  // a burst of messages (history, resync) renders once
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(() => { renderQueued = false; if (state?.active) renderMessages(); });
}

function messageItem(m, pending = false) {
  const mine = m.author.id === api.user.id;
  const item = el("li", { class: `message${mine ? " mine" : ""}${pending ? " pending" : ""}`,
                          "data-testid": "message", "data-seq": m.seq ?? "" });
  const meta = el("div", { class: "meta" });
  meta.append(el("span", { class: "author" }, m.author.display_name));
  const when = m.created_at ? new Date(m.created_at) : null;
  meta.append(el("time", when ? { datetime: m.created_at } : {},
                 when ? when.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }) : "sending…"));
  if (m.edited_at && !m.deleted) meta.append(el("span", { class: "hint" }, "(edited)"));
  item.append(meta);
  item.append(m.deleted ? el("p", { class: "body deleted" }, "message deleted")
                        : el("p", { class: "body", "data-testid": "message-body" }, m.body));
  return item;
}

function renderMessages(toBottom = false) {
  const scroller = $("scroller");
  const nearBottom = scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 60;
  const fromBottom = scroller.scrollHeight - scroller.scrollTop;
  const list = $("messages");
  const messages = [...store(state.active).values()].sort((a, b) => a.seq - b.seq);
  const items = messages.map((m) => messageItem(m));
  for (const [clientId, p] of state.pending) {
    if (p.room_id === state.active && !messages.some((m) => m.client_id === clientId)) {
      items.push(messageItem({ ...p, author: api.user }, true));
    }
  }
  list.replaceChildren(...items);
  $("load-older").hidden = !(messages.length && messages[0].seq > 1);  // seq 1 always exists
  if (toBottom || nearBottom) scroller.scrollTop = scroller.scrollHeight;
  else scroller.scrollTop = scroller.scrollHeight - fromBottom;  // keep what was on screen
}

async function loadOlder() {
  const roomId = state.active;
  const messages = store(roomId);
  const oldest = Math.min(...messages.keys());
  if (state.loadingOlder || !messages.size || oldest <= 1) return;
  state.loadingOlder = true;
  try {
    const page = await api.call("GET",
      `/rooms/${encodeURIComponent(roomId)}/messages?before_seq=${oldest}&limit=${PAGE}`);
    for (const m of page.items) if (!messages.has(m.seq)) messages.set(m.seq, m);
    if (state?.active === roomId) renderMessages();
  } catch (error) {
    notify(error);
  } finally {
    if (state) state.loadingOlder = false;
  }
}

$("load-older").addEventListener("click", loadOlder);
$("scroller").addEventListener("scroll", () => {
  if ($("scroller").scrollTop < 40 && !$("load-older").hidden) loadOlder();
});

function markRead() {
  const roomId = state.active;
  const room = state.rooms.get(roomId);
  if (!room || document.visibilityState !== "visible") return;
  const seq = Math.max(0, ...store(roomId).keys());
  if (room.unread_count) { room.unread_count = 0; renderRooms(); }
  if (seq > (state.readSent.get(roomId) ?? 0)) {
    state.readSent.set(roomId, seq);
    socket.read(roomId, seq);
  }
}

document.addEventListener("visibilitychange", () => state?.active && markRead());

// --- composing ----------------------------------------------------------------------------------

function send() {
  const input = $("composer-input");
  const body = input.value;
  if (!state.active || !body.trim()) return;
  const clientId = socket.post(state.active, body);
  state.pending.set(clientId, { room_id: state.active, body, client_id: clientId });
  input.value = "";
  renderMessages(true);
}

$("composer").addEventListener("submit", (event) => { event.preventDefault(); send(); });
$("composer-input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send();
  }
});
$("composer-input").addEventListener("input", () => {
  if (state?.active && $("composer-input").value) socket.typing(state.active);
});

// --- live events: presence, typing, status ------------------------------------------------------

function onFrame(f) {
  if (!state) return;
  const room = state.rooms.get(f.room_id);
  switch (f.type) {
    case "hello":
      $("composer-input").maxLength = f.limits.message_max_chars;
      break;
    case "joined":
      state.online.set(f.room_id, new Map(f.online.map((u) => [u.id, u])));
      if (room && !room.role) { room.role = "member"; renderRooms(); }
      if (f.room_id === state.active) { renderOnline(); markRead(); }
      break;
    case "presence": {
      const users = state.online.get(f.room_id) ?? new Map();
      if (f.status === "online") users.set(f.user.id, f.user);
      else { users.delete(f.user.id); stopTyping(f.room_id, f.user.id); }
      state.online.set(f.room_id, users);
      if (f.room_id === state.active) renderOnline();
      break;
    }
    case "typing": {
      const key = `${f.room_id} ${f.user.id}`;
      clearTimeout(state.typing.get(key)?.timer);
      const timer = setTimeout(() => stopTyping(f.room_id, f.user.id), TYPING_SHOWN_MS);
      state.typing.set(key, { room: f.room_id, name: f.user.display_name, timer });
      renderTyping();
      break;
    }
    case "room.updated":
      if (room) Object.assign(room, f.room);
      renderRooms();
      if (f.room_id === state.active) $("room-title").textContent = `# ${f.room.name}`;
      break;
    case "room.deleted": case "room.removed":
      state.rooms.delete(f.room_id);
      if (f.room_id === state.active) closeRoom(f.type === "room.deleted" ? "This room was deleted." : "You left this room.");
      renderRooms();
      break;
    case "error":
      if (f.code === "rate_limited" || f.code === "unavailable") break;  // the socket retries
      if (state.pending.delete(f.ref) && state.active) renderMessages();
      notify(f.detail);
      break;
  }
}

function stopTyping(roomId, userId) {
  const key = `${roomId} ${userId}`;
  clearTimeout(state?.typing.get(key)?.timer);
  if (state?.typing.delete(key)) renderTyping();
}

function renderTyping() {
  const names = [...state.typing.values()].filter((t) => t.room === state.active).map((t) => t.name);
  $("typing").textContent = !names.length ? ""
    : names.length === 1 ? `${names[0]} is typing…` : `${names.join(" and ")} are typing…`;
}

function renderOnline() {
  const users = [...(state.online.get(state.active)?.values() ?? [])];
  $("online").replaceChildren(...users.map((u) =>
    el("li", { "data-testid": "online-user", "data-user-id": u.id }, u.display_name)));
}

function closeRoom(text = "") {
  if (state) state.active = null;
  sessionStorage.removeItem(ROOM_KEY);
  $("room-title").textContent = "Pick or create a room";
  $("messages").replaceChildren();
  $("online").replaceChildren();
  $("composer-input").disabled = $("composer").querySelector("button").disabled = true;
  $("load-older").hidden = true;
  $("typing").textContent = "";
  notify(text);
}

function onStatus(stateName, text) {
  $("status").dataset.state = stateName;
  $("status").textContent = text;
  if (stateName !== "live" && state) {  // who is online is unknown until the next `joined`
    state.online.clear();
    for (const { timer } of state.typing.values()) clearTimeout(timer);
    state.typing.clear();
    renderOnline();
    renderTyping();
  }
}

function notify(error) {
  $("notice").textContent = typeof error === "string" ? error : error.message;
}

if (api.session) enterChat(); else showAuth();
