/** Types of the React hook, useAgent(): the `@agentd/client/react` entry point. */
import type {
  AgentClientOptions,
  AgentClientState,
  ErrorMessage,
  PromptOptions,
  Usage,
} from "./agent-client.js";

/**
 * AgentClient's options. `url`, or `baseUrl`, `project` and `agent`, identify the
 * conversation: changing one closes it and starts a new one. A new `token` is used from the
 * next connection attempt on. The others are read when a conversation starts.
 */
export type UseAgentOptions = AgentClientOptions;

/**
 * "sending": not acknowledged yet (resent after a reconnect); "accepted": acknowledged,
 * waiting for the agent; "streaming": the answer is arriving; "done"; "aborted"; "error":
 * refused or failed, see `error`; "dropped": refused as too big (close code 1009);
 * "lost": the session ended before the answer did.
 */
export type TurnStatus =
  "sending" | "accepted" | "streaming" | "done" | "aborted" | "error" | "dropped" | "lost";

/** One prompt and its answer. */
export interface Turn {
  /** The prompt's id, as send() returned it. */
  id: string;
  prompt: string;
  options: PromptOptions | undefined;
  status: TurnStatus;
  /** The streamed answer so far. */
  answer: string;
  usage: Usage | null;
  /** The error that ended or refused this prompt. */
  error: ErrorMessage | null;
  /** Some messages went missing while this answer streamed (the replay log overflowed). */
  incomplete: boolean;
}

export interface UseAgentResult {
  /** The client's state: `status`, and `reason` once "disconnected". */
  connection: AgentClientState;
  /** Whole seconds until the next reconnect attempt while waiting for one, else null. */
  retryIn: number | null;
  /** Prompts and answers, oldest first. */
  transcript: Turn[];
  /** The last error message; narrow on `code` (e.g. "rate_limit" has `retryAfter`). */
  error: ErrorMessage | null;
  /** Queue a prompt and return its id; throws like AgentClient.send(). */
  send(text: string, options?: PromptOptions): string;
  /** Ask the agent to stop the current answer; false when not connected. */
  abort(): boolean;
  /** Connect now: ends a wait, or starts over after "disconnected". */
  retryNow(): void;
}

/** One conversation with one agent for the life of the component. */
export declare function useAgent(options: UseAgentOptions): UseAgentResult;
