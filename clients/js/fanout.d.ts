// Types for fanout.js: the fanout protocol's client (PROTOCOL.md, part 1).

/** The WebSocket subprotocol the client offers: `fanout.v1`. */
export const SUBPROTOCOL: "fanout.v1";

/** A durable room's position: its history's epoch and the message's seq in it. */
export interface Position {
  epoch: string;
  seq: number;
}

/** An error reply (`code` from PROTOCOL.md section 5), a timeout (`"timeout"`) or a closed client (`"closed"`). */
export class FanoutError extends Error {
  readonly code: string;
  readonly reason: string;
}

/** Where a delivered message sits. */
export interface MessageMeta {
  room: string;
  /** The message's seq in a durable room, else `null`. */
  seq: number | null;
  epoch: string | null;
}

/** Why messages of a room may be missing: refetch what the application shows. */
export interface Gap {
  room: string;
  /**
   * `missed` (the node may have lost messages), `trimmed`, `epoch_changed`, `too_far_behind`
   * (a resume was refused), `rejoined`, `unsent` (a fire-and-forget publish failed: `code`),
   * `reconnected` (a plain room, which keeps no position, re-joined after the connection
   * dropped: `since` and `until` span the time away).
   */
  reason: string;
  from?: Position | null;
  to?: Position;
  since?: number;
  until?: number;
  dropped?: number | null;
  /** `unsent`: the error code (PROTOCOL.md, section 5). */
  code?: string;
  detail?: string;
}

export interface Member {
  user: string;
  connections?: number;
  info?: unknown;
}

/** A join or re-join took effect (see `JoinOptions.onJoin`). */
export interface JoinInfo {
  room: string;
  /** The room keeps history: its messages have positions and a re-join resumes. */
  durable: boolean;
  /** Durable rooms: the join asked to resume (`since`) or for the last N messages. */
  resumed: boolean;
  /** With `resumed`: whether everything after the position follows (else see `reason`). */
  recovered?: boolean;
  /** Why a resume was refused: `trimmed`, `epoch_changed`, `too_far_behind`. */
  reason?: string;
  /** Durable rooms: the position the room's messages follow. */
  epoch?: string;
  seq?: number;
}

export interface JoinOptions {
  onMessage?: (data: unknown, meta: MessageMeta) => void;
  onGap?: (gap: Gap) => void;
  /**
   * Every join and re-join (after a reconnect, or to fill a gap), before the room's first
   * message of it: durable rooms at the node's position notice, plain rooms at the reply.
   * Called before `onGap` for a refused resume.
   */
  onJoin?: (info: JoinInfo) => void;
  /** Join as a presence member (the room must have presence on the node). */
  presence?: boolean;
  /** The live member map, after every change. */
  onPresence?: (members: Map<string, Member>) => void;
  /** Durable rooms: start with the last N messages, and fall back to them when a resume is refused. */
  last?: number;
}

/** A synchronous key-value store such as `localStorage`: positions survive a page reload. */
export interface PositionStorage {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
  removeItem(key: string): void;
}

export interface ClientOptions {
  /** Credentials for a `connect` command (kept out of the URL). */
  token?: unknown;
  /** Fresh credentials: for `connect` on every (re)connect and `refresh` before they expire. */
  getToken?: () => unknown | Promise<unknown>;
  /** A WebSocket constructor (default: the global one). */
  WebSocket?: new (url: string, protocols?: string | string[]) => WebSocket;
  storage?: PositionStorage;
  /** Command timeout in ms (default 10000). */
  timeout?: number;
  /** How long a publish may wait for its acknowledgement, across reconnects (default 60000). */
  publishTimeout?: number;
  /** Reconnect backoff: full jitter up to min(cap, base * 2^attempt) ms (defaults 250, 10000). */
  backoffBase?: number;
  backoffCap?: number;
  /** Publishes wait while the socket's bufferedAmount is above this (default 1 MiB). */
  highWaterMark?: number;
  /** Publishes per second at most, and the burst (defaults 800 and 1000: under the node's default limit). */
  publishRate?: number;
  publishBurst?: number;
  onOpen?: () => void;
  onDisconnect?: (event: { code: number; reason: string }) => void;
  onDisconnectFrame?: (frame: { code: number; reason: string; reconnect: boolean }) => void;
  /** The client stopped for good (closed by you, or by a policy close from the node). */
  onClose?: (error: FanoutError) => void;
  onError?: (error: unknown) => void;
  /** Reserved: messages to this user (not sent by protocol version 1). */
  onDirect?: (payload: unknown) => void;
}

export interface PublishResult {
  nodes?: number;
  epoch?: string;
  seq?: number;
  duplicate?: boolean;
  /** `{ ack: false }`: written to the socket (no reply comes). */
  sent?: boolean;
}

export interface PublishOptions {
  /** The idempotency key (default: a random one, reused by resends). */
  key?: string;
  /** How long to wait for the acknowledgement, across reconnects. */
  timeout?: number;
  /**
   * `false`: fire-and-forget (no id, no reply, never resent; resolves once written; a failure
   * reaches `onGap` as `unsent`). Default `true`.
   */
  ack?: boolean;
}

export interface Room {
  readonly name: string;
  readonly durable: boolean;
  /** The live member map (presence rooms). */
  readonly members: Map<string, Member>;
  position(): Position | null;
  publish(data: unknown, options?: PublishOptions): Promise<PublishResult>;
  leave(): Promise<unknown>;
  history(limit?: number): Promise<{ room: string; epoch: string; seq: number; messages: { seq: number; data?: unknown; text?: string }[] }>;
}

export class FanoutClient {
  /** `url`: the endpoint (`ws://host/fanout`), or several nodes' to rotate through on reconnect. */
  constructor(url: string | string[], options?: ClientOptions);
  /** `"idle" | "connecting" | "open" | "closed"`. */
  readonly state: string;
  /** How many times the socket opened. */
  readonly connects: number;
  /** The identity the node gave (after a `connect` command). */
  readonly user: string | null;
  connect(): void;
  join(room: string, options?: JoinOptions): Promise<Room>;
  leave(room: string): Promise<unknown>;
  publish(room: string, data: unknown, options?: PublishOptions): Promise<PublishResult>;
  presence(room: string): Promise<{ room: string; version: number; members: Member[] }>;
  /** Any command (`{cmd, ...}`), answered by its result. */
  request(command: { cmd: string; [field: string]: unknown }): Promise<any>;
  close(): void;
}
