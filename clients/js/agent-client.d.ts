/**
 * Types of agent-client.js, the browser client for agentd's agent WebSocket, and of the wire
 * protocol it speaks. docs/protocol.md is the authority on every message; these declarations
 * follow it, version 1.
 */

// ---------------------------------------------------------------------------------------
// The wire protocol: client to agentd

/** A prompt's `options`: a JSON object of at most 4096 bytes, passed on to the agent. */
export type PromptOptions = Record<string, unknown>;

/** Starts a query. `id` is 1 to 256 characters and unique per session. */
export interface PromptMessage {
  type: "prompt";
  id: string;
  text: string;
  options?: PromptOptions;
}

/** Asks the agent to cancel the query in flight. */
export interface AbortMessage {
  type: "abort";
}

/** Asks agentd for a `pong` with the same `id`. */
export interface PingMessage {
  type: "ping";
  /** A string of at most 256 characters, or an integer from -2^53 to 2^53. */
  id?: string | number;
}

/**
 * The client has every message up to `seq`: the session's holder may let them go. AgentClient
 * sends it a second after it receives messages.
 */
export interface ConfirmMessage {
  type: "confirm";
  seq: number;
}

/** Every message a client may send. */
export type ClientMessage = PromptMessage | AbortMessage | PingMessage | ConfirmMessage;

// ---------------------------------------------------------------------------------------
// The wire protocol: agentd to client

/** The first message of every connection; like agentd's other answers, it has no `seq`. */
export interface SessionMessage {
  type: "session";
  /** Opaque id; reconnect with `?session=<id>&last_seq=<n>` to resume. */
  session: string;
  /** True when an earlier session was re-attached; false starts seq again at 1. */
  resumed: boolean;
  /** False when messages after the client's last_seq are gone (confirmed before, or the
   * session's holder was lost). */
  complete: boolean;
  /** The highest seq the session has sent. */
  lastSeq: number;
  project: string;
  agent: string;
}

/** What the session's messages carry: 1, 2, 3, … per session, without gaps, numbered on the
 * VM, the same whichever agentd instance relays them. */
export interface Sequenced {
  seq: number;
}

/** A prompt was accepted and forwarded to the agent. */
export interface AckMessage extends Sequenced {
  type: "ack";
  id: string;
  /** Present when this id was already accepted in this session: it was not forwarded again. */
  duplicate?: true;
}

/** The answer to `ping`, with the ping's id when it had one; an answer: no `seq`. */
export interface PongMessage {
  type: "pong";
  id?: string | number;
  seq?: undefined;
}

/** The agent started answering the prompt `id`. */
export interface StartMessage extends Sequenced {
  type: "start";
  id: string;
}

/** A piece of the answer; the pieces of one prompt, concatenated, are the answer. */
export interface DeltaMessage extends Sequenced {
  type: "delta";
  id: string;
  text: string;
}

/** Tokens and cost of one query. */
export interface Usage {
  inputTokens: number;
  outputTokens: number;
  cacheReadTokens: number;
  cacheWriteTokens: number;
  /** USD; null when the VM could not price the model (agentd then prices it). */
  cost: number | null;
  model: string;
  /** Counts estimated because the stream stopped before the provider reported them. */
  estimated?: true;
}

/** The query `id` ended normally, or was aborted. */
export interface DoneMessage extends Sequenced {
  type: "done";
  id: string;
  agent: string;
  usage: Usage;
  /** The query was cancelled by `abort` (or the agent was stopped); usage is what it used. */
  aborted?: boolean;
}

/** Codes of the errors agentd itself sends: a closed set (agentd/errors.py). */
export type AgentdErrorCode =
  | "bad_request"
  | "vm_unavailable"
  | "agent_exited"
  | "internal"
  | "rate_limit"
  | "quota_exceeded"
  | "timeout"
  | "backlog_full";

/** Codes of the errors the agent CLI sends, passed through by agentd (docs/agent-cli.md). */
export type AgentErrorCode =
  | "bad_request"
  | "busy"
  | "timeout"
  | "provider_auth"
  | "provider_rate_limit"
  | "provider_unavailable"
  | "provider_error"
  | "internal"
  | "unknown_agent"
  | "bad_config";

export type ErrorCode = AgentdErrorCode | AgentErrorCode;

interface ErrorFields {
  type: "error";
  /** Present on the session's errors (the agent's, `agent_exited`); agentd's own refusals of
   * a connection's message are answers, without one. */
  seq?: number;
  /** Text for people; programs read `code`. */
  error: string;
}

/** The `prompts` rate limit refused the prompt; the same prompt is accepted `retryAfter` ms later. */
export interface RateLimitError extends ErrorFields {
  code: "rate_limit";
  id: string;
  /** Milliseconds. */
  retryAfter: number;
  policy: string;
  limit: number;
  /** Milliseconds. */
  window: number;
}

/** Month-to-date spend reached the user's or the project's budget. */
export interface QuotaExceededError extends ErrorFields {
  code: "quota_exceeded";
  id: string;
  scope: "user" | "project";
  /** USD. */
  budget: number;
  /** USD. */
  spent: number;
}

/** The agent process ended; the next prompt starts a new one. */
export interface AgentExitedError extends ErrorFields {
  code: "agent_exited";
  /** Null when the process was killed or the connection to it was lost. */
  exitStatus: number | null;
}

/** The provider's rate limit outlasted the agent's retries. */
export interface ProviderRateLimitError extends ErrorFields {
  code: "provider_rate_limit";
  id: string;
  /** Milliseconds, when the provider said. */
  retryAfter?: number;
  usage?: Usage;
}

/** An error that ended the query `id`. */
export interface QueryError extends ErrorFields {
  code: "timeout" | "provider_auth" | "provider_unavailable" | "provider_error";
  id: string;
  usage?: Usage;
}

/** The remaining codes; `id` names the prompt when the error is about one. */
export interface OtherError extends ErrorFields {
  code:
    | "bad_request"
    | "vm_unavailable"
    | "internal"
    | "busy"
    | "unknown_agent"
    | "bad_config"
    | "backlog_full";
  id?: string;
}

/** An error message; narrow on `code` for its extra fields. */
export type ErrorMessage =
  RateLimitError | QuotaExceededError | AgentExitedError | ProviderRateLimitError | QueryError | OtherError;

/** What the agent CLI writes, forwarded with `seq` added. */
export type AgentMessage = StartMessage | DeltaMessage | DoneMessage | ErrorMessage;

/** Every message after `session`: the client's "message" event carries these. */
export type ServerMessage = AckMessage | PongMessage | AgentMessage;

// ---------------------------------------------------------------------------------------
// Close codes

/** Close code: another connection took over the session. */
export declare const CLOSE_SUPERSEDED: 4001;

/** Close code: the server refused a message as too big. */
export declare const CLOSE_TOO_BIG: 1009;

/** Close code: agentd is restarting; the client resumes at once, on any instance. */
export declare const CLOSE_RESTARTING: 1012;

/** The longest random wait before resuming after a 1012 close, in ms. */
export declare const RESTART_JITTER_MS: number;

/** How long after a message the client confirms what it has, in ms. */
export declare const CONFIRM_AFTER_MS: number;

// ---------------------------------------------------------------------------------------
// The client

/** The wait before each reconnect attempt, before jitter: 1, 2, 5, 10 and 30 s. */
export declare const RECONNECT_DELAYS_MS: readonly number[];

/** Each delay is scaled by a random factor in [1 - JITTER, 1 + JITTER). */
export declare const JITTER: number;

/** A connection that stays up this long resets the attempt count. */
export declare const STABLE_AFTER_MS: number;

/** agentd's default cap on one client message. */
export declare const MAX_MESSAGE_BYTES: number;

/** The jittered wait before reconnect attempt `attempt` (0 for the first). */
export declare function reconnectDelay(
  attempt: number,
  random?: () => number,
  delays?: readonly number[],
): number;

/** Milliseconds from a Retry-After header (seconds or an HTTP date), or 0. */
export declare function parseRetryAfter(value: string | null | undefined, now?: number): number;

/** What a probe learned about a refused connection attempt. */
export interface ProbeResult {
  status: number;
  retryAfterMs: number;
}

/** Asks why an attempt was refused; null when there is no answer. */
export type Probe = (url: string) => Promise<ProbeResult | null> | ProbeResult | null;

/** The part of `fetch` the probe uses; the browser's and Node's fit. */
export type FetchLike = (
  url: string,
  init?: any,
) => Promise<{ status: number; headers: { get(name: string): string | null } }>;

export interface HttpProbeOptions {
  fetch?: FetchLike;
  /** Default 5000. */
  timeoutMs?: number;
}

/** Asks the WebSocket route with a plain GET why an upgrade was refused. */
export declare function httpProbe(url: string, options?: HttpProbeOptions): Promise<ProbeResult | null>;

/**
 * "connecting": first attempt; "open": session established; "reconnecting": waiting for or
 * making a retry; "disconnected": stopped, `reason` says why; "closed": before connect()
 * and after close().
 */
export type AgentStatus = "connecting" | "open" | "reconnecting" | "disconnected" | "closed";

/** Why a client stopped trying ("disconnected"). */
export type DisconnectReason = "gave_up" | "superseded" | "unauthorized" | "forbidden" | "not_found";

/** The last close of the WebSocket; `opened` is false for an attempt that never opened. */
export interface CloseInfo {
  code: number;
  reason: string;
  wasClean: boolean;
  opened: boolean;
}

/** A snapshot of the client, as the "status" event delivers it. */
export interface AgentClientState {
  status: AgentStatus;
  reason: DisconnectReason | null;
  /** Reconnect attempts since the last stable connection. */
  attempt: number;
  maxAttempts: number;
  /** Epoch milliseconds of the next attempt while waiting for it, else null. */
  nextRetryAt: number | null;
  lastClose: CloseInfo | null;
  /** The probe's HTTP status for the last refused attempt, else null. */
  httpStatus: number | null;
  session: string | null;
  /** The highest seq processed in this session. */
  lastSeq: number;
}

/** A prompt sent but not yet acknowledged. */
export interface PendingPrompt {
  id: string;
  message: PromptMessage;
}

/** Messages with these seqs are gone; `to` is null while the end is not known. */
export interface LostRange {
  from: number;
  to: number | null;
}

/** The events of AgentClient and what each listener receives. */
export interface AgentClientEvents {
  /** Every message with a new seq, in order, exactly once, and agentd's answers without one. */
  message: ServerMessage;
  /** The session message that starts each connection. */
  session: SessionMessage;
  /** A snapshot of the state after every change. */
  status: AgentClientState;
  lost: LostRange;
  /** Unacknowledged prompts discarded after a 1009 close. */
  dropped: PendingPrompt[];
}

export type AgentClientEventType = keyof AgentClientEvents;

/** The constructor of a WebSocket: the browser's, or one with the same interface. */
export interface WebSocketConstructor {
  new (url: string): WebSocketLike;
}

/**
 * The part of a WebSocket the client uses. The client sets the handlers; it reads `data` of
 * a message event and `code`, `reason` and `wasClean` of a close event.
 */
export interface WebSocketLike {
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((event: any) => void) | null;
  onmessage: ((event: any) => void) | null;
  onclose: ((event: any) => void) | null;
}

/** Where `online` events come from: the window, or anything with the same two methods. */
export interface OnlineEvents {
  addEventListener(type: "online", listener: () => void): void;
  removeEventListener(type: "online", listener: () => void): void;
}

/** Where the client connects: a full URL, or agentd's origin and the route's names. */
export type AgentTarget =
  | { url: string; baseUrl?: undefined; project?: string; agent?: string }
  | { url?: undefined; baseUrl?: string; project: string; agent: string };

/** Everything else the constructor takes; each has a default (see docs/client.md). */
export interface AgentClientSettings {
  /** A JWT sent as the `token` query parameter; empty leaves it to the cookie. */
  token?: string;
  /** The wait before each reconnect attempt, in ms; its length is the number of attempts. */
  delays?: readonly number[];
  stableAfterMs?: number;
  maxMessageBytes?: number;
  /** The longest random wait before resuming after a 1012 close. */
  restartJitterMs?: number;
  /** How long after a message the client confirms what it has. */
  confirmAfterMs?: number;
  /** Asks why an attempt was refused; null retries every refusal. */
  probe?: Probe | null;
  WebSocket?: WebSocketConstructor;
  setTimeout?: (fn: () => void, ms: number) => unknown;
  clearTimeout?: (id: any) => void;
  random?: () => number;
  now?: () => number;
  /** Anything with addEventListener("online", …); null ignores online events. */
  onlineEvents?: OnlineEvents | null;
  /** Receives what a listener threw. */
  reportError?: (error: unknown) => void;
}

export type AgentClientOptions = AgentTarget & AgentClientSettings;

/** One conversation with one agent, kept alive across dropped connections. */
export declare class AgentClient {
  constructor(options: AgentClientOptions);

  status: AgentStatus;
  reason: DisconnectReason | null;
  attempt: number;
  nextRetryAt: number | null;
  lastClose: CloseInfo | null;
  httpStatus: number | null;
  session: string | null;
  lastSeq: number;

  readonly maxAttempts: number;
  /** Prompts sent but not yet acknowledged, oldest first. */
  readonly pending: PendingPrompt[];
  readonly state: AgentClientState;

  /** Subscribe; returns a function that unsubscribes. */
  on<K extends AgentClientEventType>(type: K, fn: (detail: AgentClientEvents[K]) => void): () => void;
  off<K extends AgentClientEventType>(type: K, fn: (detail: AgentClientEvents[K]) => void): void;

  /** Start connecting, with a fresh attempt count. */
  connect(): this;
  /** Connect now with a fresh count: ends a wait, or starts over after "disconnected". */
  retryNow(): this;
  /** The token for the next attempt. */
  setToken(token: string): void;
  /** Queue a prompt and return its id; it is sent (and resent) until acknowledged. */
  send(text: string, options?: PromptOptions): string;
  /** Ask the agent to stop the current answer; false when not connected. */
  abort(): boolean;
  /** Ask the server for a pong; false when not connected. */
  ping(): boolean;
  /** Disconnect for good. */
  close(): void;
}
