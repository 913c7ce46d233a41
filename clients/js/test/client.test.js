// The client against real chat nodes and a real Redis (see harness.js). Run by
// tests/js_client.rs from `cargo test --all-features`, or by hand:
//   CHAT_BIN=target/debug/examples/chat node --experimental-websocket --test clients/js/test/client.test.js
// (Node 22 and later need no flag.)

import { test } from "node:test";
import assert from "node:assert/strict";
import { setTimeout as sleep } from "node:timers/promises";

import { FanoutClient, FanoutError } from "../fanout.js";
import { Node, Proxy, Redis, collector, waitUntil } from "./harness.js";

const fast = { backoffBase: 50, backoffCap: 500, timeout: 5000 };

test("one socket, many rooms: messages by room, replies by id, errors as FanoutError", async (t) => {
  const redis = await Redis.start();
  const n1 = await Node.start(redis, "n1");
  const n2 = await Node.start(redis, "n2");
  t.after(() => [n1, n2].forEach((n) => n.kill()) || redis.stop());
  const a = new FanoutClient(`${n1.url}?user=ada`, fast);
  const b = new FanoutClient(`${n2.url}?user=bob`, fast);
  t.after(() => a.close() || b.close());
  const x = collector();
  const y = collector();
  await a.join("x", x);
  await a.join("y", y);
  await b.join("y", {});
  const r = await b.publish("y", { n: 1 });
  assert.equal(r.nodes, 2);
  await b.publish("x", "to x");
  await waitUntil("both rooms' messages", () => x.got.length === 1 && y.got.length === 1);
  assert.equal(x.got[0].data, "to x");
  assert.deepEqual(y.got[0].data, { n: 1 });
  assert.equal(typeof y.got[0].seq, "number", "chat nodes with HISTORY make every room durable");
  await assert.rejects(a.join(""), (e) => e instanceof FanoutError && e.code === "invalid_room");
  await assert.rejects(a.request({ cmd: "fly" }), (e) => e.code === "unknown_command");
  // Many publishes at once keep their order.
  await Promise.all(Array.from({ length: 50 }, (_, i) => b.publish("y", i)));
  await waitUntil("50 more", () => y.got.length === 51);
  assert.deepEqual(y.got.slice(1).map((m) => m.data), Array.from({ length: 50 }, (_, i) => i));
});

test("fire-and-forget publishes keep their order, get no reply, and a failure reaches onGap", async (t) => {
  const redis = await Redis.start();
  const n1 = await Node.start(redis, "n1");
  t.after(() => n1.kill() || redis.stop());
  const a = new FanoutClient(`${n1.url}?user=ada`, fast);
  t.after(() => a.close());
  const gaps = [];
  const x = collector();
  await a.join("x", { ...x, onGap: (g) => gaps.push(g) });
  // Interleaved with acknowledged ones: one order for all.
  const sends = Array.from({ length: 40 }, (_, i) => a.publish("x", i, { ack: i % 4 !== 0 }));
  const results = await Promise.all(sends);
  assert.deepEqual(results[0], { sent: true });
  assert.equal(typeof results[1].nodes, "number");
  await waitUntil("40 messages", () => x.got.length === 40);
  assert.deepEqual(x.got.map((m) => m.data), Array.from({ length: 40 }, (_, i) => i));
  assert.equal(a.pending.size, 0, "no reply awaited");
  // Refused at once, for a room the client is not in: no room to tell, so onError.
  const errors = [];
  a.options.onError = (e) => errors.push(e);
  await a.publish("bad\u0001room", 1, { ack: false });
  await waitUntil("the refusal", () => errors.length === 1);
  assert.equal(errors[0].code, "invalid_room");
  // Redis frozen past the node's publish timeout: the room hears of it as an unsent gap.
  redis.child.kill("SIGSTOP");
  try {
    await a.publish("x", "lost?", { ack: false });
    await waitUntil("the unsent gap", () => gaps.some((g) => g.reason === "unsent"), 30_000);
  } finally {
    redis.child.kill("SIGCONT");
  }
  const gap = gaps.find((g) => g.reason === "unsent");
  assert.equal(gap.room, "x");
  assert.equal(gap.code, "unavailable");
});

test("a node killed under a durable stream: the client resumes on another, nothing lost or doubled", async (t) => {
  const redis = await Redis.start();
  const n1 = await Node.start(redis, "n1");
  const n2 = await Node.start(redis, "n2");
  const n3 = await Node.start(redis, "n3");
  t.after(() => [n1, n2, n3].forEach((n) => n.kill()) || redis.stop());
  const reader = new FanoutClient([`${n1.url}?user=r`, `${n2.url}?user=r`], fast);
  const writer = new FanoutClient(`${n3.url}?user=w`, fast);
  t.after(() => reader.close() || writer.close());
  const feed = collector();
  await reader.join("feed", feed);
  const total = 300;
  const writing = (async () => {
    for (let i = 1; i <= total; i++) {
      await writer.publish("feed", i);
      if (i % 20 === 0) await sleep(5); // ok: spreads the stream over the kill
    }
  })();
  await waitUntil("the reader is under way", () => feed.got.length >= 60);
  n1.kill();
  await writing;
  await waitUntil(`all ${total} delivered`, () => feed.got.length >= total, 20_000);
  await sleep(200); // ok: a duplicate, if any, would arrive now
  assert.deepEqual(feed.got.map((m) => m.data), Array.from({ length: total }, (_, i) => i + 1));
  assert.ok(reader.connects >= 2, "it reconnected");
  assert.deepEqual(feed.gaps.filter((g) => g.reason !== "missed"), [], "resumed without a gap");
});

test("publishes unacknowledged when the network drops are resent with their keys and land once", async (t) => {
  const redis = await Redis.start();
  const n1 = await Node.start(redis, "n1");
  const n2 = await Node.start(redis, "n2");
  t.after(() => [n1, n2].forEach((n) => n.kill()) || redis.stop());
  const proxy = await Proxy.start(n1.port);
  t.after(() => proxy.close());
  const watcher = new FanoutClient(`${n2.url}?user=w`, fast);
  const sender = new FanoutClient(proxy.url("/fanout?user=s"), fast);
  t.after(() => watcher.close() || sender.close());
  const seen = collector();
  await watcher.join("log", seen);
  await sender.join("log", {});
  const total = 200;
  let acked = 0;
  const sends = Array.from({ length: total }, (_, i) => sender.publish("log", i).then((r) => (acked++, r)));
  await waitUntil("some acknowledged", () => acked >= 20);
  proxy.cut(); // the rest are in flight or queued
  const results = await Promise.all(sends);
  assert.ok(sender.connects >= 2, "it reconnected");
  await sender.publish("log", "end");
  await waitUntil("the end marker", () => seen.got.some((m) => m.data === "end"));
  const values = seen.got.map((m) => m.data).filter((d) => d !== "end");
  assert.deepEqual(values, Array.from({ length: total }, (_, i) => i), "each once, in order");
  const seqs = results.map((r) => r.seq);
  assert.equal(new Set(seqs).size, total, "each reply names its own message's position");
});

test("Redis restarted: the client is told of the gap and keeps receiving in the new epoch", async (t) => {
  const redis = await Redis.start();
  const n1 = await Node.start(redis, "n1");
  const n2 = await Node.start(redis, "n2");
  t.after(() => [n1, n2].forEach((n) => n.kill()) || redis.stop());
  const reader = new FanoutClient(`${n1.url}?user=r`, fast);
  const writer = new FanoutClient(`${n2.url}?user=w`, fast);
  t.after(() => reader.close() || writer.close());
  const room = collector();
  await reader.join("r", room);
  await writer.join("r", {});
  for (let i = 1; i <= 3; i++) await writer.publish("r", i);
  await waitUntil("three", () => room.got.length === 3);
  await redis.restart();
  await waitUntil("nodes ready again", async () => (await n1.healthy()) && (await n2.healthy()));
  await waitUntil("the gap told", () => room.gaps.length > 0);
  // Publish until the reader hears: the writer's first attempts may meet a link still coming up.
  await waitUntil("a message in the new epoch", async () => {
    await writer.publish("r", "after").catch(() => {});
    return room.got.some((m) => m.data === "after");
  });
  const after = room.got.filter((m) => m.data === "after");
  assert.ok(after[0].seq >= 1);
  assert.ok(room.gaps.some((g) => g.reason === "missed" || g.reason === "epoch_changed"), JSON.stringify(room.gaps));
});

test("a refused resume (a position from a lost epoch, kept in storage) calls the gap callback", async (t) => {
  const redis = await Redis.start();
  const n1 = await Node.start(redis, "n1");
  t.after(() => n1.kill() || redis.stop());
  const store = new Map([["fanout:news", "gone-epoch:41"]]);
  const storage = {
    getItem: (k) => store.get(k) ?? null,
    setItem: (k, v) => store.set(k, v),
    removeItem: (k) => store.delete(k),
  };
  const client = new FanoutClient(`${n1.url}?user=r`, { ...fast, storage });
  t.after(() => client.close());
  const news = collector();
  await client.join("news", news);
  await waitUntil("the gap", () => news.gaps.length === 1);
  assert.equal(news.gaps[0].reason, "epoch_changed");
  assert.deepEqual(news.gaps[0].from, { epoch: "gone-epoch", seq: 41 });
  await client.publish("news", "fresh");
  await waitUntil("delivered", () => news.got.length === 1);
  const [epoch, seq] = store.get("fanout:news").split(":");
  assert.notEqual(epoch, "gone-epoch", "the stored position follows the room");
  assert.equal(Number(seq), news.got[0].seq);
  // A "page reload": a new client with the same storage resumes after what was delivered.
  client.close();
  const writer = new FanoutClient(`${n1.url}?user=w`, fast);
  t.after(() => writer.close());
  await writer.publish("news", "while away");
  const again = new FanoutClient(`${n1.url}?user=r`, { ...fast, storage });
  t.after(() => again.close());
  const resumed = collector();
  await again.join("news", resumed);
  await waitUntil("the missed one replayed", () => resumed.got.length >= 1);
  await sleep(100); // ok: anything doubled would show now
  assert.deepEqual(resumed.got.map((m) => m.data), ["while away"]);
  assert.deepEqual(resumed.gaps, []);
});

test("presence across two clients on two nodes is a live map", async (t) => {
  const redis = await Redis.start();
  const n1 = await Node.start(redis, "n1");
  const n2 = await Node.start(redis, "n2");
  t.after(() => [n1, n2].forEach((n) => n.kill()) || redis.stop());
  const a = new FanoutClient(`${n1.url}?user=ada`, fast);
  const b = new FanoutClient(`${n2.url}?user=bob`, fast);
  t.after(() => a.close() || b.close());
  let members = new Map();
  await a.join("team", { presence: true, onPresence: (m) => (members = new Map(m)) });
  await waitUntil("ada sees herself", () => members.has("ada"));
  await b.join("team", { presence: true });
  await waitUntil("ada sees bob", () => members.has("bob"));
  assert.deepEqual([...members.keys()].sort(), ["ada", "bob"]);
  b.close();
  await waitUntil("bob left", () => !members.has("bob"));
  assert.deepEqual([...members.keys()], ["ada"]);
});

test("credentials that expire are refreshed ahead of time; unrefreshed ones reconnect with new ones", async (t) => {
  const redis = await Redis.start();
  const n1 = await Node.start(redis, "n1");
  t.after(() => n1.kill() || redis.stop());
  let tokens = 0;
  const getToken = () => (tokens++, { user: "exp", expires_in: 1 });
  const refreshed = new FanoutClient(n1.url, { ...fast, getToken });
  t.after(() => refreshed.close());
  await refreshed.join("a", {});
  await sleep(2500); // ok: two expiry periods pass
  assert.equal(refreshed.connects, 1, "refreshed, never cut");
  assert.ok(tokens >= 3, `a token per refresh (${tokens})`);
  // Without a refresh: the node closes with 4001, the client comes back with a new token.
  const disconnects = [];
  const lapsing = new FanoutClient(n1.url, {
    ...fast,
    token: { user: "lapse", expires_in: 0.5 },
    onDisconnect: (e) => disconnects.push(e.code),
  });
  t.after(() => lapsing.close());
  const room = collector();
  await lapsing.join("a", room);
  await waitUntil("expired and back", () => disconnects.includes(4001) && lapsing.connects >= 2);
});

test("publishes are paced under the client's rate, so a burst of resends cannot trip the node's limit", async (t) => {
  const redis = await Redis.start();
  const n1 = await Node.start(redis, "n1");
  t.after(() => n1.kill() || redis.stop());
  const client = new FanoutClient(`${n1.url}?user=p`, { ...fast, publishRate: 100, publishBurst: 10 });
  t.after(() => client.close());
  const room = collector();
  await client.join("paced", room);
  const started = Date.now();
  await Promise.all(Array.from({ length: 60 }, (_, i) => client.publish("paced", i)));
  const elapsed = Date.now() - started;
  // 10 at once, then 50 at 100/s: at least half a second.
  assert.ok(elapsed >= 450, `paced: ${elapsed} ms`);
  await waitUntil("all delivered", () => room.got.length === 60);
  assert.deepEqual(room.got.map((m) => m.data), Array.from({ length: 60 }, (_, i) => i));
});

test("users: direct messages arrive, and a fleet-wide disconnect stops the client unless it says come back", async (t) => {
  const redis = await Redis.start();
  const n1 = await Node.start(redis, "n1");
  const n2 = await Node.start(redis, "n2");
  t.after(() => [n1, n2].forEach((n) => n.kill()) || redis.stop());
  const direct = [];
  const closes = [];
  const ada = new FanoutClient(`${n1.url}?user=ada`, {
    ...fast,
    onDirect: (payload) => direct.push(payload),
    onDisconnect: (event) => closes.push(event.code),
  });
  t.after(() => ada.close());
  await ada.join("lobby", {});
  const post = (path, body) =>
    fetch(`http://127.0.0.1:${n2.port}${path}`, { method: "POST", body: JSON.stringify(body) })
      .then((r) => r.json());
  assert.deepEqual(await post("/users/ada/messages", { hi: 1 }), { nodes: 1 });
  await waitUntil("the direct message", () => direct.length === 1);
  assert.deepEqual(direct[0], { hi: 1 });
  // A logout (4000, reconnect: false): the client stops and does not come back.
  assert.deepEqual(await post("/users/ada/disconnect", { reason: "logged out" }), { nodes: 1 });
  await waitUntil("closed for good", () => ada.state === "closed");
  assert.deepEqual(closes, [4000]);
});

test("joins say where they start (onJoin); a refused join keeps no position; a plain room's re-join is a gap", async (t) => {
  const redis = await Redis.start();
  const plain = await Node.start(redis, "plain", { HISTORY: "0", PRESENCE: "0" });
  const durable = await Node.start(redis, "durable", { PRESENCE: "0" });
  t.after(() => [plain, durable].forEach((n) => n.kill()) || redis.stop());
  const toPlain = await Proxy.start(plain.port);
  const toDurable = await Proxy.start(durable.port);
  t.after(() => toPlain.close() || toDurable.close());
  const store = new Map();
  const storage = {
    getItem: (k) => store.get(k) ?? null,
    setItem: (k, v) => store.set(k, v),
    removeItem: (k) => store.delete(k),
  };
  const d = new FanoutClient(toDurable.url("/fanout?user=d"), { ...fast, storage });
  const p = new FanoutClient(toPlain.url("/fanout?user=p"), { ...fast, storage });
  t.after(() => d.close() || p.close());
  const watch = () => {
    const c = collector();
    c.joins = [];
    c.onJoin = (info) => c.joins.push(info);
    return c;
  };

  // No presence on this node: the join is refused after the node had reported the room's
  // position, and that position is not kept, so the next join starts afresh.
  await assert.rejects(d.join("news", { ...watch(), presence: true }), (e) => e.code === "presence_off");
  assert.equal(store.size, 0, "no position kept from a refused join");
  const news = watch();
  await d.join("news", news);
  assert.equal(news.joins.length, 1);
  const [first] = news.joins;
  assert.deepEqual(first, { room: "news", durable: true, resumed: false, epoch: first.epoch, seq: 0 });
  await d.publish("news", 1);
  await waitUntil("the first message", () => news.got.length === 1);
  toDurable.cut();
  await waitUntil("re-joined after the cut", () => news.joins.length === 2);
  assert.deepEqual(news.joins[1], { room: "news", durable: true, resumed: true, recovered: true, epoch: first.epoch, seq: 1 });
  assert.deepEqual(news.gaps, [], "a recovered resume is no gap");

  // A plain room has no position to resume from: its re-join is a gap.
  const chat = watch();
  await p.join("chat", chat);
  assert.deepEqual(chat.joins, [{ room: "chat", durable: false, resumed: false }]);
  toPlain.cut();
  await waitUntil("re-joined after the cut", () => chat.joins.length === 2);
  assert.equal(chat.gaps.length, 1, JSON.stringify(chat.gaps));
  assert.equal(chat.gaps[0].reason, "reconnected");
  assert.ok(chat.gaps[0].since <= chat.gaps[0].until, JSON.stringify(chat.gaps));
  await p.publish("chat", "after");
  await waitUntil("a message after the re-join", () => chat.got.some((m) => m.data === "after"));
  assert.deepEqual([...store.keys()], ["fanout:news"], "a plain room keeps no position");
});

/** A stand-in WebSocket the test plays the node for: it records what the client sends. */
class FakeSocket {
  static made = [];
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.bufferedAmount = 0;
    this.sent = [];
    FakeSocket.made.push(this);
  }
  send(text) {
    this.sent.push(JSON.parse(text));
  }
  close() {}
  open() {
    this.readyState = 1;
    this.onopen();
  }
  /** The node's `fanout.disconnect` frame and close for a socket that did not connect in time. */
  notConnectedInTime() {
    const reason = "credentials not sent in time";
    this.onmessage({ data: JSON.stringify({ type: "fanout.disconnect", code: 1008, reason, reconnect: false }) });
    this.readyState = 3;
    this.onclose({ code: 1008, reason });
  }
}

test("closed for no connect in time: without credentials it stops and says why; a connect sent late tries again", async (t) => {
  FakeSocket.made = [];
  const errors = [];
  const bare = new FanoutClient("ws://node/fanout", { ...fast, WebSocket: FakeSocket, onError: (e) => errors.push(e) });
  t.after(() => bare.close());
  bare.connect();
  FakeSocket.made[0].open();
  assert.deepEqual(FakeSocket.made[0].sent, [], "no token: nothing to connect with");
  FakeSocket.made[0].notConnectedInTime();
  assert.equal(bare.state, "closed");
  assert.equal(errors.length, 1);
  assert.equal(errors[0].code, "not_connected");

  // A client with a token whose connect the node did not get in time (a stalled network).
  FakeSocket.made = [];
  const late = new FanoutClient("ws://node/fanout", { ...fast, WebSocket: FakeSocket, token: "t" });
  t.after(() => late.close());
  late.connect();
  FakeSocket.made[0].open();
  await waitUntil("the connect is sent", () => FakeSocket.made[0].sent.length === 1);
  assert.equal(FakeSocket.made[0].sent[0].cmd, "connect");
  FakeSocket.made[0].notConnectedInTime();
  await waitUntil("it comes back", () => FakeSocket.made.length === 2);
  assert.notEqual(late.state, "closed");
  FakeSocket.made[1].open();
  await waitUntil("and connects again", () => FakeSocket.made[1].sent.length === 1);
  assert.equal(FakeSocket.made[1].sent[0].cmd, "connect");
});
