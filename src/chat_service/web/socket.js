// The WebSocket side: one connection to /ws, the rooms joined on it, and the reconnect and
// resume recipe of docs/protocol.md §6 (jittered backoff, `join {since_seq}`, outbox resend).

const STOP = new Set([4403, 4404, 1007, 1009]);  // reconnecting would not help
const PING_EVERY_MS = 25_000;              // an app-level ping finds a dead server...
const PONG_WITHIN_MS = 10_000;             // ...when nothing comes back in time
const TYPING_EVERY_MS = 1_000;             // the server drops more than one a second anyway

export function newId() {  // crypto.randomUUID needs a secure context; this does not
  return Array.from(crypto.getRandomValues(new Uint8Array(16)),
    (b) => b.toString(16).padStart(2, "0")).join("");
}

export class ChatSocket {
  // handlers: onMessage(message, clientId?), onFrame(frame), onStatus(state, text)
  constructor(api, handlers) {
    Object.assign(this, { api, ...handlers });
    this.rooms = new Map();   // room id -> highest change_seq seen (null until joined)
    this.outbox = new Map();  // client_id -> message.send frame, until acked
    this.typedAt = new Map(); // room id -> when we last sent `typing`
    this.attempt = 0;
    this.ws = null;
    this.closed = false;
    this.listeners = { online: () => this.reconnectNow(), offline: () => this.abandon("offline") };
    for (const [name, fn] of Object.entries(this.listeners)) window.addEventListener(name, fn);
  }

  connect() {
    clearTimeout(this.retryTimer);
    if (this.closed || this.ws) return;
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    // The token goes in a subprotocol, never in the URL (URLs end up in logs).
    const ws = new WebSocket(`${scheme}://${location.host}/ws`,
      ["chat.v1", `bearer.${this.api.token()}`]);
    this.ws = ws;
    this.onStatus("connecting", "Connecting…");
    ws.onmessage = (e) => {
      if (this.ws === ws) this.handle(JSON.parse(e.data)).catch((err) => console.warn(err));
    };
    ws.onclose = (e) => { if (this.ws === ws) this.closedWith(e.code, e.reason); };
  }

  close() {  // on purpose: no reconnect
    this.closed = true;
    for (const [name, fn] of Object.entries(this.listeners)) window.removeEventListener(name, fn);
    this.abandon();
  }

  send(frame) {
    if (this.ws?.readyState !== WebSocket.OPEN) return false;
    this.ws.send(JSON.stringify(frame));
    return true;
  }

  join(roomId) {
    if (!this.rooms.has(roomId)) this.rooms.set(roomId, null);
    this.rejoin(roomId);
  }

  rejoin(roomId) {
    const since = this.rooms.get(roomId);
    this.send(since == null ? { type: "join", room_id: roomId }
                            : { type: "join", room_id: roomId, since_seq: since });
  }

  post(roomId, body) {
    const clientId = newId();
    // ref = client_id, so that an `error` names the send it is about.
    const frame = { type: "message.send", room_id: roomId, body, client_id: clientId, ref: clientId };
    this.outbox.set(clientId, frame);
    this.send(frame);  // if the socket is down, the outbox goes out on the next `hello`
    return clientId;
  }

  typing(roomId) {
    const now = Date.now();
    if (now - (this.typedAt.get(roomId) ?? 0) < TYPING_EVERY_MS) return;
    if (this.send({ type: "typing", room_id: roomId })) this.typedAt.set(roomId, now);
  }

  read(roomId, seq) { this.send({ type: "read", room_id: roomId, seq }); }

  advance(roomId, seq) {
    if (this.rooms.has(roomId)) this.rooms.set(roomId, Math.max(this.rooms.get(roomId) ?? 0, seq));
  }

  async handle(f) {
    this.alive();
    switch (f.type) {
      case "hello":
        this.openedAt = Date.now();
        this.onStatus("live", "Live");
        this.heartbeat = setInterval(() => this.ping(), PING_EVERY_MS);
        for (const roomId of this.rooms.keys()) this.rejoin(roomId);
        for (const frame of this.outbox.values()) this.send(frame);  // same client_id: safe
        break;
      case "joined":
        f.messages.forEach((m) => this.onMessage(m));
        if (f.truncated && f.messages.length) await this.resync(f.room_id, f.messages.at(-1).change_seq);
        else this.advance(f.room_id, f.last_seq);
        break;
      case "ack":
        this.outbox.delete(f.client_id);
        this.onMessage(f.message, f.client_id);
        break;
      case "message.new": case "message.updated": case "message.deleted": {
        const last = this.rooms.get(f.room_id);
        if (last === undefined) break;  // not a room we follow
        if (last !== null && f.message.change_seq > last + 1) {
          this.resync(f.room_id, last).catch(() => this.rejoin(f.room_id));  // or re-join
        }
        this.onMessage(f.message);
        this.advance(f.room_id, f.message.change_seq);
        break;
      }
      case "room.deleted": case "room.removed":
        this.rooms.delete(f.room_id);
        break;
      case "auth.expiring":
        await this.api.refresh();
        this.send({ type: "auth.refresh", access_token: this.api.token() });
        break;
      case "error":
        if (this.outbox.has(f.ref)) this.sendFailed(f);
        break;
    }
    this.onFrame(f);
  }

  sendFailed(f) {
    if (f.code === "rate_limited" || f.code === "unavailable") {  // retry the same client_id
      setTimeout(() => this.outbox.has(f.ref) && this.send(this.outbox.get(f.ref)),
        (f.retry_after ?? 1) * 1000);
    } else {
      this.outbox.delete(f.ref);  // refused for good; the UI shows the error
    }
  }

  async resync(roomId, after) {  // REST: every change after `after`, page by page
    for (let more = true; more;) {
      const page = await this.api.call("GET",
        `/rooms/${encodeURIComponent(roomId)}/messages?after_seq=${after}&limit=200`);
      page.items.forEach((m) => this.onMessage(m));
      if (page.items.length) after = page.items.at(-1).change_seq;
      more = page.has_more;
    }
    this.advance(roomId, after);
  }

  ping() {
    this.send({ type: "ping" });
    this.pongTimer ??= setTimeout(() => this.abandon("no answer from the server"), PONG_WITHIN_MS);
  }

  alive() {
    clearTimeout(this.pongTimer);
    this.pongTimer = null;
  }

  // Give up on the current socket without waiting for a close handshake that may never come.
  abandon(why) {
    const ws = this.ws;
    if (!ws) return;
    this.ws = null;
    ws.onmessage = ws.onclose = null;
    ws.close();
    this.stopTimers();
    if (why) this.closedWith(1006, why, true);
  }

  stopTimers() {
    clearInterval(this.heartbeat);
    this.alive();
  }

  reconnectNow() {
    this.attempt = 0;
    if (!this.ws && !this.closed) this.connect();
  }

  async closedWith(code, reason, abandoned = false) {
    if (!abandoned) {
      this.ws = null;
      this.stopTimers();
    }
    if (this.closed) return;
    if (STOP.has(code)) {
      this.onStatus("stopped", `Disconnected: ${reason || code}`);
      return;
    }
    if (!navigator.onLine) {  // the `online` event reconnects
      this.onStatus("offline", "Offline: waiting for the network");
      return;
    }
    if (Date.now() - (this.openedAt ?? 0) > 30_000) this.attempt = 0;
    let delay = Math.random() * Math.min(30_000, 500 * 2 ** this.attempt++);  // full jitter
    if (code === 4401) {
      try { await this.api.refresh(); } catch { if (!this.api.session) return; }  // logged out
    }
    const backOff = /back off (\d+) s/.exec(reason);
    if (code === 4429) delay = Math.max(delay, (backOff ? +backOff[1] : 30) * 1000);
    this.onStatus("waiting", `Reconnecting in ${Math.ceil(delay / 1000)} s…`);
    clearTimeout(this.retryTimer);
    this.retryTimer = setTimeout(() => this.connect(), delay);
  }
}
