// A TypeScript program written against the package's declarations, as a product team would,
// that names every export of both entry points. tsc --noEmit must accept it; the lines
// marked @ts-expect-error must each be an error.

import {
  AgentClient,
  CLOSE_RESTARTING,
  CLOSE_SUPERSEDED,
  CLOSE_TOO_BIG,
  CONFIRM_AFTER_MS,
  JITTER,
  MAX_MESSAGE_BYTES,
  RECONNECT_DELAYS_MS,
  RESTART_JITTER_MS,
  STABLE_AFTER_MS,
  httpProbe,
  parseRetryAfter,
  reconnectDelay,
  type AbortMessage,
  type AckMessage,
  type AgentClientEventType,
  type AgentClientEvents,
  type AgentClientOptions,
  type AgentClientSettings,
  type AgentClientState,
  type AgentErrorCode,
  type AgentExitedError,
  type AgentMessage,
  type AgentStatus,
  type AgentTarget,
  type AgentdErrorCode,
  type ClientMessage,
  type CloseInfo,
  type ConfirmMessage,
  type DeltaMessage,
  type DisconnectReason,
  type DoneMessage,
  type ErrorCode,
  type ErrorMessage,
  type FetchLike,
  type HttpProbeOptions,
  type LostRange,
  type OnlineEvents,
  type OtherError,
  type PendingPrompt,
  type PingMessage,
  type PongMessage,
  type Probe,
  type ProbeResult,
  type PromptMessage,
  type PromptOptions,
  type ProviderRateLimitError,
  type QueryError,
  type QuotaExceededError,
  type RateLimitError,
  type Sequenced,
  type ServerMessage,
  type SessionMessage,
  type StartMessage,
  type Usage,
  type WebSocketConstructor,
  type WebSocketLike,
} from "@agentd/client";
import {
  useAgent,
  type Turn,
  type TurnStatus,
  type UseAgentOptions,
  type UseAgentResult,
} from "@agentd/client/react";

// --- Client to agentd

const options: PromptOptions = { repeat: 2 };
const prompt: PromptMessage = { type: "prompt", id: "p1", text: "hello", options };
const abort: AbortMessage = { type: "abort" };
const pings: PingMessage[] = [{ type: "ping" }, { type: "ping", id: "a" }, { type: "ping", id: 7 }];
export const outgoing: ClientMessage[] = [prompt, abort, ...pings];
// @ts-expect-error: abort takes no text
export const wrongAbort: ClientMessage = { type: "abort", text: "stop" };
// @ts-expect-error: there is no resume message; resuming is a URL parameter
export const noResume: ClientMessage = { type: "resume", session: "s" };

// --- agentd to client

const session: SessionMessage = {
  type: "session",
  session: "s1",
  resumed: false,
  complete: true,
  lastSeq: 0,
  project: "demo",
  agent: "echo",
};
const sequenced: Sequenced = { seq: 1 };
const ack: AckMessage = { type: "ack", id: "p1", seq: 1, duplicate: true };
const pong: PongMessage = { type: "pong", id: 7 };
// @ts-expect-error: agentd's answers carry no seq
export const numberedPong: PongMessage = { type: "pong", id: 7, seq: 2 };
const confirm: ConfirmMessage = { type: "confirm", seq: 4 };
// @ts-expect-error: a confirm names the seq it reached
export const confirmWithoutSeq: ConfirmMessage = { type: "confirm" };
export const confirmations: ClientMessage[] = [confirm];
const start: StartMessage = { type: "start", id: "p1", seq: 3 };
const delta: DeltaMessage = { type: "delta", id: "p1", text: "hel", seq: 4 };
const usage: Usage = {
  inputTokens: 1,
  outputTokens: 2,
  cacheReadTokens: 0,
  cacheWriteTokens: 0,
  cost: null,
  model: "echo",
  estimated: true,
};
const done: DoneMessage = { type: "done", id: "p1", agent: "echo", usage, aborted: false, seq: 5 };
const rateLimit: RateLimitError = {
  type: "error",
  code: "rate_limit",
  error: "Rate limited.",
  id: "p2",
  retryAfter: 1834,
  policy: "prompts",
  limit: 60,
  window: 60000,
  seq: 6,
};
const quota: QuotaExceededError = {
  type: "error",
  code: "quota_exceeded",
  error: "Budget reached.",
  id: "p3",
  scope: "user",
  budget: 10,
  spent: 10.5,
  seq: 7,
};
const exited: AgentExitedError = {
  type: "error",
  code: "agent_exited",
  error: "ended",
  exitStatus: null,
  seq: 8,
};
const providerLimit: ProviderRateLimitError = {
  type: "error",
  code: "provider_rate_limit",
  error: "slow down",
  id: "p4",
  retryAfter: 2000,
  usage,
  seq: 9,
};
const failed: QueryError = { type: "error", code: "timeout", error: "too slow", id: "p5", usage, seq: 10 };
const other: OtherError = { type: "error", code: "busy", error: "busy", id: "p6", seq: 11 };
const agentdCodes: AgentdErrorCode[] = ["vm_unavailable", "quota_exceeded"];
const agentCodes: AgentErrorCode[] = ["busy", "provider_auth", "bad_config"];
const codes: ErrorCode[] = [...agentdCodes, ...agentCodes];
const errors: ErrorMessage[] = [rateLimit, quota, exited, providerLimit, failed, other];
const fromAgent: AgentMessage[] = [start, delta, done, ...errors];
export const incoming: ServerMessage[] = [ack, pong, ...fromAgent];
// @ts-expect-error: a rate-limit refusal always says when to retry
export const noRetryAfter: RateLimitError = { ...rateLimit, retryAfter: undefined };
// @ts-expect-error: an error's code is one of the documented ones
export const unknownCode: ErrorMessage = { type: "error", code: "oops", error: "?", seq: 1 };

/** What a UI does with each message; the `never` proves every type is handled. */
export function describe(message: ServerMessage): string {
  switch (message.type) {
    case "ack":
      return `accepted ${message.id}${message.duplicate ? " again" : ""}`;
    case "pong":
      return `pong ${message.id ?? ""}`;
    case "start":
      return `started ${message.id}`;
    case "delta":
      return message.text;
    case "done":
      return `${message.aborted ? "aborted" : "done"}: ${message.usage.outputTokens} tokens, $${message.usage.cost ?? "?"}`;
    case "error":
      switch (message.code) {
        case "rate_limit":
          return `wait ${message.retryAfter} ms (${message.limit} per ${message.window} ms)`;
        case "quota_exceeded":
          return `${message.scope} budget ${message.budget} reached`;
        case "agent_exited":
          return `agent exited with ${message.exitStatus ?? "a signal"}`;
        case "provider_rate_limit":
          return `provider says wait ${message.retryAfter ?? "a while"}`;
        default:
          return `${message.code}: ${message.error}`;
      }
    default: {
      const unhandled: never = message;
      return unhandled;
    }
  }
}

export function textOf(message: ServerMessage): string {
  // @ts-expect-error: only a delta has text; narrow on `type` first
  return message.text;
}

// --- The client

const delays: readonly number[] = RECONNECT_DELAYS_MS;
export const limits = [
  JITTER,
  STABLE_AFTER_MS,
  MAX_MESSAGE_BYTES,
  reconnectDelay(0),
  reconnectDelay(2, Math.random, delays),
];
export const closes: [4001, 1009, 1012] = [CLOSE_SUPERSEDED, CLOSE_TOO_BIG, CLOSE_RESTARTING];
export const waitMs: number = parseRetryAfter("120") + parseRetryAfter(null, Date.now());

const fetchLike: FetchLike = fetch;
const probeOptions: HttpProbeOptions = { fetch: fetchLike, timeoutMs: 2000 };
const probe: Probe = (url) => httpProbe(url, probeOptions);
const fixedProbe: Probe = (): ProbeResult => ({ status: 426, retryAfterMs: 0 });

const target: AgentTarget = { baseUrl: "https://agentd.example.com", project: "demo", agent: "echo" };
const settings: AgentClientSettings = {
  token: "jwt",
  delays: [500, 1000],
  stableAfterMs: 5000,
  maxMessageBytes: MAX_MESSAGE_BYTES,
  restartJitterMs: RESTART_JITTER_MS,
  confirmAfterMs: CONFIRM_AFTER_MS,
  probe,
  WebSocket,
  setTimeout: (fn, ms) => setTimeout(fn, ms),
  clearTimeout: (id) => clearTimeout(id),
  random: Math.random,
  now: Date.now,
  onlineEvents: window,
  reportError: (error) => console.error(error),
};
const clientOptions: AgentClientOptions = { ...target, ...settings };
const client = new AgentClient(clientOptions);
export const byUrl = new AgentClient({
  url: "wss://agentd.example.com/projects/demo/agent/echo",
  probe: fixedProbe,
});
// @ts-expect-error: the client needs url, or project and agent
export const nowhere = new AgentClient({ token: "jwt" });

class TestSocket implements WebSocketLike {
  onopen: ((event: any) => void) | null = null;
  onmessage: ((event: any) => void) | null = null;
  onclose: ((event: any) => void) | null = null;
  constructor(readonly url: string) {}
  send(data: string): void {
    void data;
  }
  close(code?: number): void {
    this.onclose?.({ code: code ?? 1000, reason: "", wasClean: true });
  }
}
const sockets: WebSocketConstructor = TestSocket;
const online: OnlineEvents = new EventTarget();
export const underTest = new AgentClient({
  project: "demo",
  agent: "echo",
  WebSocket: sockets,
  onlineEvents: online,
  probe: null,
});

const onStatus = (state: AgentClientState) => {
  const status: AgentStatus = state.status;
  const reason: DisconnectReason | null = state.reason;
  const close: CloseInfo | null = state.lastClose;
  console.log(status, reason, close?.code, state.nextRetryAt, state.attempt, state.maxAttempts);
};
const offs: Array<() => void> = [
  client.on("status", onStatus),
  client.on("session", (message: SessionMessage) => console.log(message.resumed)),
  client.on("message", (message) => console.log(describe(message))),
  client.on("lost", ({ from, to }: LostRange) => console.log(from, to ?? "?")),
  client.on("dropped", (prompts: PendingPrompt[]) => console.log(prompts.map((p) => p.message.text))),
];
// @ts-expect-error: there is no such event
client.on("closed", () => {});
// @ts-expect-error: a status listener gets the state, not a message
client.on("status", (message: ServerMessage) => console.log(message));
const eventType: AgentClientEventType = "lost";
const firstLoss: AgentClientEvents["lost"] = { from: 3, to: null };
client.off(eventType, () => console.log(firstLoss));

client.connect().retryNow();
client.setToken("next-jwt");
export const id: string = client.send("Explain this repository", { model: "fast" });
export const aborted: boolean = client.abort() && client.ping();
export const snapshot: AgentClientState = client.state;
export const waiting: PendingPrompt[] = client.pending;
export const lastSeq: number = client.lastSeq + client.maxAttempts + client.attempt;
offs.forEach((off) => off());
client.close();
// @ts-expect-error: options are an object
client.send("x", "fast");

// --- The React hook

export function useChat(token: string): string {
  const hookOptions: UseAgentOptions = { project: "demo", agent: "echo", token, delays: [1000] };
  const agent: UseAgentResult = useAgent(hookOptions);
  const { connection, retryIn, transcript, error, send, abort: stop, retryNow } = agent;
  if (connection.status === "reconnecting" && retryIn !== null) return `reconnecting in ${retryIn} s`;
  if (connection.status === "disconnected") retryNow();
  if (error?.code === "rate_limit") return `try again in ${Math.ceil(error.retryAfter / 1000)} s`;
  const last: Turn | undefined = transcript.at(-1);
  const status: TurnStatus | undefined = last?.status;
  if (status === "streaming") stop();
  const promptId: string = send("hi", { repeat: 1 });
  return `${promptId} ${last?.prompt}: ${last?.answer} (${last?.usage?.outputTokens ?? 0} tokens)${last?.incomplete ? " [gap]" : ""}`;
}
// @ts-expect-error: the hook needs a target as the client does
useAgent({ token: "jwt" });
