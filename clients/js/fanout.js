// The fanout protocol's client (PROTOCOL.md, part 1): one WebSocket for many rooms, with
// reconnects, resume, gap notices, presence and exactly-once publishing done for you.
// No dependencies; browsers and Node.js (its built-in WebSocket, or an injected constructor).

export const SUBPROTOCOL = "fanout.v1";

/** Close codes after which reconnecting cannot help (PROTOCOL.md, section 6). */
const FINAL_CODES = new Set([1000, 1003, 1007, 1008, 1009]);
const TRY_AGAIN_LATER = 1013;
const GOING_AWAY = 1001;
const CREDENTIALS_EXPIRED = 4001;
const POLICY_VIOLATION = 1008;
/** The reason of the 1008 close for a socket that did not `connect` in time (PROTOCOL.md, section 1). */
const NO_CREDENTIALS = "credentials not sent in time";

/** An error reply, a timeout or a closed client, with the protocol's `code`. */
export class FanoutError extends Error {
  constructor(code, reason) {
    super(`${code}: ${reason}`);
    this.name = "FanoutError";
    this.code = code;
    this.reason = reason;
  }
}

function randomKey() {
  const c = globalThis.crypto;
  if (c && typeof c.randomUUID === "function") return c.randomUUID();
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}${Math.random().toString(36).slice(2)}`;
}

/** A room this client is in: its callbacks, its position (durable rooms), its presence. */
class Room {
  constructor(client, name, options) {
    this.client = client;
    this.name = name;
    this.options = options;
    this.epoch = null;
    this.seq = null;
    this.durable = false;
    /** user -> { connections } for a room joined with `presence: true`. */
    this.members = new Map();
    this.presenceVersion = -1;
    this.presencePending = null; // events that arrived before the snapshot
    /** After a loss notice in a durable room, until the re-join's notice: seqs may restart. */
    this.relaxed = false;
    /** The socket the room was last joined on: a plain room re-joined on another one has a gap. */
    this.socket = null;
    /** What storage held for the room before this client joined it (restored if that fails). */
    this.stored = null;
  }

  /** Publishes `data` to this room (see FanoutClient.publish). */
  publish(data, options) {
    return this.client.publish(this.name, data, options);
  }

  /** Leaves the room: no callback of it runs afterwards. */
  leave() {
    return this.client.leave(this.name);
  }

  /** The room's history (durable rooms): the last `limit` messages. */
  history(limit = 50) {
    return this.client.request({ cmd: "history", room: this.name, limit });
  }

  position() {
    return this.epoch === null ? null : { epoch: this.epoch, seq: this.seq };
  }

  _setPosition(epoch, seq) {
    this.epoch = epoch;
    this.seq = seq;
    const storage = this.client.options.storage;
    if (storage) {
      try {
        storage.setItem(this.client._storageKey(this.name), `${epoch}:${seq}`);
      } catch {
        // A full or unavailable storage only costs the resume after a reload.
      }
    }
  }

  _gap(info) {
    const cb = this.options.onGap;
    if (cb) cb({ room: this.name, ...info });
  }

  /** The room's delivery (re)starts: before its first message of this join. */
  _joined(info) {
    const cb = this.options.onJoin;
    if (cb) cb({ room: this.name, ...info });
  }

  _message(frame) {
    if (typeof frame.seq === "number") {
      // One delivery per seq: a replay overlapping what was delivered is skipped. After a
      // loss notice (a new epoch may have restarted the seqs) everything goes through until
      // the re-join says where the room stands.
      if (this.epoch !== null && !this.relaxed && frame.seq <= this.seq) return;
      if (this.epoch !== null) this._setPosition(this.epoch, frame.seq);
    }
    const cb = this.options.onMessage;
    const data = "data" in frame ? frame.data : "text" in frame ? frame.text : frame.binary;
    if (cb) cb(data, { room: this.name, seq: frame.seq ?? null, epoch: this.epoch });
  }

  _notice(frame) {
    switch (frame.type) {
      case "fanout.position": {
        this.relaxed = false;
        const before = this.position();
        this._setPosition(frame.epoch, frame.seq);
        this.durable = true;
        this._joined({ durable: true, resumed: false, epoch: frame.epoch, seq: frame.seq });
        if (before && (before.epoch !== frame.epoch || before.seq !== frame.seq)) {
          this._gap({ reason: "rejoined", from: before, to: { epoch: frame.epoch, seq: frame.seq } });
        }
        break;
      }
      case "fanout.resumed": {
        const before = this.position();
        this.relaxed = false;
        // Delivered past `since` meanwhile (same epoch): the replay of those is skipped.
        const seq = frame.recovered && before && before.epoch === frame.epoch ? Math.max(before.seq, frame.seq) : frame.seq;
        this._setPosition(frame.epoch, seq);
        this.durable = true;
        const outcome = { recovered: !!frame.recovered, ...(frame.reason ? { reason: frame.reason } : {}) };
        this._joined({ durable: true, resumed: true, ...outcome, epoch: frame.epoch, seq: frame.seq });
        if (!frame.recovered) {
          this._gap({ reason: frame.reason || "unrecoverable", from: before, to: { epoch: frame.epoch, seq: frame.seq } });
        }
        break;
      }
      case "fanout.missed":
        this._gap({ reason: "missed", since: frame.since, until: frame.until, dropped: frame.dropped });
        if (this.durable && this.epoch !== null && !this.relaxed) {
          // Re-join from the last message delivered: the node replays what it can, and
          // says so (or that the history is gone) in the notice that follows.
          this.relaxed = true;
          this.client._join(this).catch((e) => this.client._emit("onError", e));
        }
        break;
      case "fanout.join":
      case "fanout.leave":
        this._presenceEvent(frame);
        break;
      case "fanout.unsent":
        this._gap({ reason: "unsent", code: frame.code, detail: frame.reason });
        break;
      default:
        break;
    }
  }

  _presenceEvent(frame) {
    if (!this.options.presence) return;
    if (this.presencePending) {
      this.presencePending.push(frame);
      return;
    }
    this._applyPresence(frame);
  }

  _applyPresence(frame) {
    if (typeof frame.version === "number" && frame.version <= this.presenceVersion) return;
    if (typeof frame.version === "number") this.presenceVersion = frame.version;
    if (frame.type === "fanout.join") {
      if (!this.members.has(frame.user)) this.members.set(frame.user, { user: frame.user });
    } else {
      this.members.delete(frame.user);
    }
    this._presenceChanged();
  }

  _snapshot(snapshot) {
    const pending = this.presencePending || [];
    this.presencePending = null;
    if (snapshot.version > this.presenceVersion) {
      this.members = new Map(snapshot.members.map((m) => [m.user, m]));
      this.presenceVersion = snapshot.version;
    }
    for (const frame of pending) this._applyPresence(frame);
    this._presenceChanged();
  }

  _presenceChanged() {
    const cb = this.options.onPresence;
    if (cb) cb(this.members);
  }
}

/**
 * The client. `url`: the protocol's endpoint (`ws://host/fanout`), or several nodes' to
 * rotate through on reconnect.
 */
export class FanoutClient {
  constructor(url, options = {}) {
    this.urls = Array.isArray(url) ? url.slice() : [url];
    this.options = {
      timeout: 10_000,
      publishTimeout: 60_000,
      backoffBase: 250,
      backoffCap: 10_000,
      highWaterMark: 1 << 20,
      // Below the node's default limit (1,000/s, burst 2,000), which closes a faster client.
      publishRate: 800,
      publishBurst: 1000,
      ...options,
    };
    this.WebSocket = options.WebSocket || globalThis.WebSocket;
    if (!this.WebSocket) throw new Error("no WebSocket: pass options.WebSocket");
    this.rooms = new Map();
    this.pending = new Map(); // id -> { resolve, reject, timer, command }
    this.outbox = []; // publishes not yet acknowledged, in order
    this.nextId = 1;
    this.attempt = 0;
    this.urlIndex = 0;
    this.ws = null;
    this.state = "idle"; // idle | connecting | open | closed
    this.user = null;
    this.refreshTimer = null;
    this.reconnectTimer = null;
    this.connects = 0;
    this.connectSent = null; // the socket a `connect` was sent on, until it was answered
    this.lostAt = null; // when the last open connection dropped
    this.tokens = this.options.publishBurst;
    this.tokensAt = Date.now();
  }

  /** Takes a publish token (the client's own rate limit); false when none is left. */
  _token() {
    const now = Date.now();
    const { publishRate, publishBurst } = this.options;
    this.tokens = Math.min(publishBurst, this.tokens + ((now - this.tokensAt) / 1000) * publishRate);
    this.tokensAt = now;
    if (this.tokens < 1) return false;
    this.tokens -= 1;
    return true;
  }

  /** Opens the connection (and keeps it open until `close`). */
  connect() {
    if (this.state === "closed") throw new FanoutError("closed", "the client was closed");
    if (this.ws) return;
    this._open();
  }

  _storageKey(room) {
    return `fanout:${room}`;
  }

  _emit(name, ...args) {
    const cb = this.options[name];
    if (cb) cb(...args);
  }

  _open() {
    this.state = "connecting";
    const url = this.urls[this.urlIndex % this.urls.length];
    let ws;
    try {
      ws = new this.WebSocket(url, SUBPROTOCOL);
    } catch (e) {
      this._scheduleReconnect(1006, String(e));
      return;
    }
    this.ws = ws;
    ws.onopen = () => this._onOpen(ws);
    ws.onmessage = (event) => this._onFrame(ws, event.data);
    ws.onclose = (event) => this._onClose(ws, event.code, event.reason);
    ws.onerror = () => {};
  }

  async _onOpen(ws) {
    if (ws !== this.ws) return;
    this.connects += 1;
    try {
      if (this.options.token !== undefined || this.options.getToken) {
        const token = this.options.getToken ? await this.options.getToken() : this.options.token;
        this.connectSent = ws;
        const result = await this._send({ cmd: "connect", token });
        this._connected(result);
      }
    } catch (e) {
      if (ws !== this.ws) return;
      if (e.code === "not_allowed") {
        // Refused credentials do not get better by retrying.
        this._emit("onError", e);
        this.close();
        return;
      }
      ws.close(4000, "connect failed"); // no answer: reconnect and try again
      return;
    }
    if (ws !== this.ws) return;
    this.state = "open";
    // Every room again, in one round trip: the joins go out together, durable rooms with
    // where they stopped.
    const joins = [...this.rooms.values()].map((room) => this._join(room).catch((e) => this._emit("onError", e)));
    // Then every publish not acknowledged, with its key: it lands once.
    for (const entry of this.outbox) entry.sent = false;
    this._pump();
    await Promise.all(joins);
    if (ws === this.ws) this.attempt = 0;
    this._emit("onOpen");
  }

  _connected(result) {
    this.connectSent = null;
    this.user = result.user;
    clearTimeout(this.refreshTimer);
    if (typeof result.expires_in === "number" && this.options.getToken) {
      // Refresh ahead of the expiry.
      const ms = Math.max(100, result.expires_in * 1000 * 0.75);
      this.refreshTimer = setTimeout(() => this._refresh(), ms);
    }
  }

  async _refresh() {
    try {
      const token = await this.options.getToken();
      const result = await this._send({ cmd: "refresh", token });
      this._connected({ user: this.user, ...result });
    } catch (e) {
      this._emit("onError", e);
    }
  }

  _onClose(ws, code, reason) {
    if (ws !== this.ws) return;
    this.ws = null;
    if (this.state === "open") this.lostAt = Date.now();
    clearTimeout(this.refreshTimer);
    for (const [id, p] of this.pending) {
      if (p.publish) continue; // resent after the reconnect
      clearTimeout(p.timer);
      p.reject(new FanoutError("closed", "the connection closed"));
      this.pending.delete(id);
    }
    for (const [id, p] of this.pending) {
      if (p.publish) this.pending.delete(id);
    }
    this._emit("onDisconnect", { code, reason });
    if (this.state === "closed") return;
    let toldToStop = this.toldToStop;
    this.toldToStop = false;
    const connectSent = this.connectSent === ws;
    this.connectSent = null;
    if (code === POLICY_VIOLATION && reason === NO_CREDENTIALS) {
      // A `connect` that did not arrive in time (a stalled network) is worth another try; a
      // client that sent none has no credentials to send, and trying again will not help.
      if (connectSent) return this._scheduleReconnect(code, reason);
      toldToStop = true;
      this._emit(
        "onError",
        new FanoutError("not_connected", "the node wants credentials: give the client a token or getToken"),
      );
    }
    if (FINAL_CODES.has(code) || toldToStop) {
      this._shutdown(new FanoutError("closed", `closed by the server: ${code} ${reason}`));
      return;
    }
    this._scheduleReconnect(code, reason);
  }

  _scheduleReconnect(code) {
    this.state = "connecting";
    this.urlIndex += 1;
    const { backoffBase, backoffCap } = this.options;
    let delay;
    if (code === GOING_AWAY && this.attempt === 0) {
      delay = Math.random() * backoffBase; // the node is restarting: come back at once, elsewhere
    } else {
      // Full jitter: anywhere between 0 and the capped exponential step.
      const base = code === TRY_AGAIN_LATER ? backoffBase * 4 : backoffBase;
      delay = Math.random() * Math.min(backoffCap, base * 2 ** this.attempt);
    }
    this.attempt += 1;
    if (code === CREDENTIALS_EXPIRED && !this.options.getToken) {
      this._emit("onError", new FanoutError("not_allowed", "credentials expired"));
    }
    this.reconnectTimer = setTimeout(() => {
      if (this.state !== "closed") this._open();
    }, delay);
  }

  _shutdown(error) {
    this.state = "closed";
    clearTimeout(this.reconnectTimer);
    clearTimeout(this.refreshTimer);
    for (const [, p] of this.pending) {
      clearTimeout(p.timer);
      p.reject(error);
    }
    this.pending.clear();
    for (const entry of this.outbox) {
      clearTimeout(entry.timer);
      entry.reject(error);
    }
    this.outbox = [];
    this._emit("onClose", error);
  }

  /** Closes the connection for good. */
  close() {
    const ws = this.ws;
    this._shutdown(new FanoutError("closed", "the client was closed"));
    this.ws = null;
    if (ws) ws.close(1000);
  }

  _onFrame(ws, raw) {
    if (ws !== this.ws) return;
    let frame;
    try {
      frame = JSON.parse(raw);
    } catch {
      return;
    }
    if (frame.type === "reply") {
      const p = this.pending.get(frame.id);
      if (!p) return;
      this.pending.delete(frame.id);
      clearTimeout(p.timer);
      if (frame.error) p.reject(new FanoutError(frame.error.code, frame.error.reason));
      else p.resolve(frame.result);
      return;
    }
    if (frame.type === "fanout.disconnect") {
      // The node says whether to come back (a logout or a ban says no: PROTOCOL.md, section 6).
      this.toldToStop = frame.reconnect === false;
      this._emit("onDisconnectFrame", frame);
      return;
    }
    if (frame.type === "fanout.direct") {
      this._emit("onDirect", frame.payload);
      return;
    }
    const room = typeof frame.room === "string" ? this.rooms.get(frame.room) : undefined;
    if (!room) {
      // A fire-and-forget publish to a room this client did not join failed: no room to tell.
      if (frame.type === "fanout.unsent") this._emit("onError", new FanoutError(frame.code || "unavailable", frame.reason));
      return;
    }
    if (frame.type === "message") room._message(frame);
    else room._notice(frame);
  }

  /** Sends a command on the current socket; its reply as a promise (with a timeout). */
  _send(command, timeout = this.options.timeout) {
    return new Promise((resolve, reject) => {
      const ws = this.ws;
      if (!ws || ws.readyState !== 1) {
        reject(new FanoutError("closed", "not connected"));
        return;
      }
      const id = this.nextId++;
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new FanoutError("timeout", `no reply to ${command.cmd} in ${timeout} ms`));
      }, timeout);
      this.pending.set(id, { resolve, reject, timer });
      ws.send(JSON.stringify({ id, ...command }));
    });
  }

  /** Sends `command` (`{cmd, ...}`) once connected; resolves to its result. */
  async request(command) {
    await this._ready();
    return this._send(command);
  }

  _ready() {
    if (this.state === "closed") return Promise.reject(new FanoutError("closed", "the client was closed"));
    if (this.ws && this.ws.readyState === 1 && this.state === "open") return Promise.resolve();
    return new Promise((resolve, reject) => {
      const started = Date.now();
      const check = () => {
        if (this.state === "closed") reject(new FanoutError("closed", "the client was closed"));
        else if (this.ws && this.ws.readyState === 1 && this.state === "open") resolve();
        else if (Date.now() - started > this.options.timeout) reject(new FanoutError("timeout", "not connected in time"));
        else setTimeout(check, 10);
      };
      check();
    });
  }

  /**
   * Joins `name`. Options: `onMessage(data, meta)`, `onGap(info)`, `onJoin(info)` (each
   * join and re-join, before the room's first message of it: where it starts, whether a
   * resume recovered), `presence: true` with `onPresence(members)`, `last: N` (durable
   * rooms: start with the last N messages).
   * Resolves to the room once joined; it stays joined across reconnects until `leave`.
   */
  async join(name, options = {}) {
    if (!this.ws && this.state !== "closed") this.connect();
    // Joined by the (re)connect itself once in the map: add it only while open.
    await this._ready();
    let room = this.rooms.get(name);
    if (!room) {
      room = new Room(this, name, options);
      const storage = this.options.storage;
      const stored = storage ? storage.getItem(this._storageKey(name)) : null;
      room.stored = stored;
      const at = stored ? stored.lastIndexOf(":") : -1;
      if (at > 0) {
        room.epoch = stored.slice(0, at);
        room.seq = Number(stored.slice(at + 1));
      }
      this.rooms.set(name, room);
    } else {
      room.options = options;
    }
    try {
      await this._join(room);
    } catch (e) {
      this.rooms.delete(name);
      // A refused join keeps no position (a durable join may have reported one before it
      // failed): the next join of the room starts as this one did.
      if (room.socket === null) this._restorePosition(name, room.stored);
      throw e;
    }
    return room;
  }

  _restorePosition(name, stored) {
    const storage = this.options.storage;
    if (!storage) return;
    try {
      if (stored === null) storage.removeItem(this._storageKey(name));
      else storage.setItem(this._storageKey(name), stored);
    } catch {
      // nothing to undo
    }
  }

  async _join(room) {
    // A plain room keeps no position: what was sent to it while this client was away is gone,
    // and the application hears so before the room's messages go on.
    if (!room.durable && room.socket && room.socket !== this.ws) {
      room._gap({ reason: "reconnected", since: this.lostAt ?? Date.now(), until: Date.now() });
    }
    const command = { cmd: "join", room: room.name };
    if (room.epoch !== null) command.since = { epoch: room.epoch, seq: room.seq };
    // Alone: start with the last N; with `since`: the fallback when the resume is refused.
    if (room.options.last) command.last = room.options.last;
    if (room.options.presence) {
      command.presence = true;
      room.presencePending = [];
    }
    const ws = this.ws;
    const result = await this._send(command);
    room.durable = !!result.durable;
    room.socket = ws;
    if (!room.durable) room._joined({ durable: false, resumed: false });
    if (room.options.presence) {
      const snapshot = await this._send({ cmd: "presence", room: room.name });
      room._snapshot(snapshot);
    }
    return result;
  }

  /** Leaves `name`. */
  async leave(name) {
    const room = this.rooms.get(name);
    this.rooms.delete(name);
    if (room && this.options.storage) {
      try {
        this.options.storage.removeItem(this._storageKey(name));
      } catch {
        // nothing to undo
      }
    }
    if (this.state !== "open") return { room: name, left: !!room };
    return this._send({ cmd: "leave", room: name });
  }

  /**
   * Publishes `data` to room `name`. Resolves to the reply's result once the fleet took it
   * (`duplicate: true` when a resend found it already taken). A publish not acknowledged
   * when the connection drops is resent after the reconnect with the same key, so it lands
   * once. Publishes go out in order, and wait while the socket's send buffer is full.
   *
   * With `{ ack: false }` the publish is fire-and-forget (PROTOCOL.md, `publish` without an
   * id): it keeps its place in the order, resolves to `{ sent: true }` once written to the
   * socket, and is never resent; a failure comes to the room's `onGap` as `unsent`. For what
   * is stale by the time a retry could land (cursors, typing), where a reply each only costs.
   */
  publish(name, data, options = {}) {
    return new Promise((resolve, reject) => {
      const ack = options.ack !== false;
      const key = ack ? options.key || randomKey() : undefined;
      const entry = { room: name, data, key, ack, resolve, reject, sent: false };
      entry.timer = setTimeout(() => {
        this.outbox = this.outbox.filter((e) => e !== entry);
        reject(new FanoutError("timeout", "publish not acknowledged in time (it may still land once)"));
      }, options.timeout || this.options.publishTimeout);
      this.outbox.push(entry);
      if (!this.ws && this.state !== "closed") this.connect();
      this._pump();
    });
  }

  /**
   * Sends unsent publishes in order, pausing while the socket's buffer is over the mark or
   * the client's own rate (`publishRate`, `publishBurst`) is spent: a resend of many publishes
   * after a reconnect must not trip the node's rate limit, which closes the socket for good.
   */
  _pump() {
    if (this.pumping) return;
    const ws = this.ws;
    if (!ws || ws.readyState !== 1 || this.state !== "open") return;
    for (const entry of this.outbox) {
      if (entry.sent) continue;
      if (ws.bufferedAmount > this.options.highWaterMark || !this._token()) {
        this.pumping = true;
        setTimeout(() => {
          this.pumping = false;
          this._pump();
        }, 10);
        return;
      }
      entry.sent = true;
      if (!entry.ack) {
        ws.send(JSON.stringify({ cmd: "publish", room: entry.room, data: entry.data }));
        this.outbox = this.outbox.filter((e) => e !== entry);
        clearTimeout(entry.timer);
        entry.resolve({ sent: true });
        continue;
      }
      const id = this.nextId++;
      this.pending.set(id, {
        publish: true,
        resolve: (result) => this._acked(entry, result),
        reject: (error) => this._acked(entry, null, error),
        timer: null,
      });
      ws.send(JSON.stringify({ id, cmd: "publish", room: entry.room, data: entry.data, key: entry.key }));
    }
  }

  _acked(entry, result, error) {
    const i = this.outbox.indexOf(entry);
    if (i < 0) return;
    if (error && (error.code === "unavailable" || error.code === "closed")) {
      // Redis did not confirm: try again (same key) after a moment.
      entry.sent = false;
      setTimeout(() => this._pump(), this.options.backoffBase);
      return;
    }
    this.outbox.splice(i, 1);
    clearTimeout(entry.timer);
    if (error) entry.reject(error);
    else entry.resolve(result);
  }

  /** The current member map of a presence room, and a fresh snapshot from the server. */
  presence(name) {
    return this.request({ cmd: "presence", room: name });
  }
}
