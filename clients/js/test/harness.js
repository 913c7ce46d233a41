// Fixtures for the client's tests: a real redis-server and real chat nodes (the example
// binary, path in CHAT_BIN), each on a free port, killed when the test process ends; and a TCP
// proxy whose connections a test can cut, to flap the network under a client.

import { spawn } from "node:child_process";
import net from "node:net";
import { setTimeout as sleep } from "node:timers/promises";

const children = new Set();
process.on("exit", () => {
  for (const child of children) child.kill("SIGKILL");
});

export async function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/** Waits until `cond()` is truthy, polling, or throws `what` after `ms`. */
export async function waitUntil(what, cond, ms = 15_000) {
  const deadline = Date.now() + ms;
  for (;;) {
    if (await cond()) return;
    if (Date.now() > deadline) throw new Error(`timed out waiting for: ${what}`);
    await sleep(20); // deadline: polling interval
  }
}

function run(cmd, args, env) {
  const child = spawn(cmd, args, { env: { ...process.env, ...env }, stdio: ["ignore", "ignore", "pipe"] });
  children.add(child);
  child.stderrText = "";
  child.stderr.on("data", (d) => {
    child.stderrText += d;
  });
  child.on("exit", () => children.delete(child));
  return child;
}

async function portOpen(port) {
  return new Promise((resolve) => {
    const socket = net.connect(port, "127.0.0.1");
    socket.once("connect", () => {
      socket.destroy();
      resolve(true);
    });
    socket.once("error", () => resolve(false));
  });
}

export class Redis {
  static async start() {
    const redis = new Redis(await freePort());
    await redis.launch();
    return redis;
  }

  constructor(port) {
    this.port = port;
    this.url = `redis://127.0.0.1:${port}`;
  }

  async launch() {
    this.child = run("redis-server", ["--port", String(this.port), "--save", "", "--appendonly", "no"], {});
    await waitUntil("redis up", () => portOpen(this.port));
  }

  /** Kills it (no persistence: its data is gone) and starts it again on the same port. */
  async restart() {
    await this.stop();
    await this.launch();
  }

  async stop() {
    if (!this.child) return;
    const exited = new Promise((resolve) => this.child.once("exit", resolve));
    this.child.kill("SIGKILL");
    await exited;
    this.child = null;
  }
}

export class Node {
  static async start(redis, id, env = {}) {
    const bin = process.env.CHAT_BIN;
    if (!bin) throw new Error("CHAT_BIN must name the chat example's binary (tests/js_client.rs sets it)");
    const port = await freePort();
    const node = new Node(port, id);
    node.child = run(bin, [], {
      PORT: String(port),
      REDIS_URL: redis.url,
      NODE_ID: id,
      HISTORY: "1000",
      PRESENCE: "1",
      PRESENCE_TTL_S: "3",
      RUST_LOG: "warn",
      ...env,
    });
    await waitUntil(`node ${id} healthy`, async () => {
      if (node.child.exitCode !== null) throw new Error(`node ${id} exited: ${node.child.stderrText}`);
      return node.healthy();
    });
    return node;
  }

  constructor(port, id) {
    this.port = port;
    this.id = id;
    this.url = `ws://127.0.0.1:${port}/fanout`;
  }

  async healthy() {
    try {
      const res = await fetch(`http://127.0.0.1:${this.port}/healthz`);
      return res.status === 200;
    } catch {
      return false;
    }
  }

  kill() {
    this.child.kill("SIGKILL");
  }
}

/** A TCP proxy to `port`: `cut()` drops every connection through it, as a network flap. */
export class Proxy {
  static async start(port) {
    const proxy = new Proxy(port);
    await new Promise((resolve) => proxy.server.listen(0, "127.0.0.1", resolve));
    proxy.port = proxy.server.address().port;
    return proxy;
  }

  constructor(target) {
    this.sockets = new Set();
    this.server = net.createServer((client) => {
      const upstream = net.connect(target, "127.0.0.1");
      for (const s of [client, upstream]) {
        this.sockets.add(s);
        s.on("close", () => this.sockets.delete(s));
        s.on("error", () => {});
      }
      client.pipe(upstream);
      upstream.pipe(client);
    });
  }

  url(path = "/fanout") {
    return `ws://127.0.0.1:${this.port}${path}`;
  }

  cut() {
    for (const s of this.sockets) s.destroy();
  }

  close() {
    this.cut();
    this.server.close();
  }
}

/** Collects a room's deliveries. */
export function collector() {
  const got = [];
  const gaps = [];
  return {
    got,
    gaps,
    onMessage: (data, meta) => got.push({ data, ...meta }),
    onGap: (info) => gaps.push(info),
  };
}
