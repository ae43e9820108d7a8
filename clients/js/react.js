/**
 * React binding of agent-client.js: useAgent() keeps one AgentClient per component and turns
 * its events into state (the connection, a transcript of prompts and answers, the last error).
 *
 * The client is made in an effect and kept in a ref. An effect's cleanup closes it on the
 * next macrotask, not at once: React's StrictMode unmounts and mounts again synchronously,
 * and that second mount takes the same client back, so a page opens one WebSocket (one
 * session) instead of two that evict each other. A real unmount closes it a tick later.
 */
import { useCallback, useEffect, useReducer, useRef, useState } from "react";

import { AgentClient, RECONNECT_DELAYS_MS } from "./agent-client.js";

/** Turns whose answer can still change. */
const UNFINISHED = new Set(["sending", "accepted", "streaming"]);

function closedState(options) {
  return {
    status: "closed",
    reason: null,
    attempt: 0,
    maxAttempts: (options.delays ?? RECONNECT_DELAYS_MS).length,
    nextRetryAt: null,
    lastClose: null,
    httpStatus: null,
    session: null,
    lastSeq: 0,
  };
}

function initialState(options) {
  return { connection: closedState(options), session: null, transcript: [], error: null };
}

/** The client's settings that identify a conversation: a change starts a new one. */
function conversationKey({ url, baseUrl, project, agent }) {
  return JSON.stringify([url ?? null, baseUrl ?? null, project ?? null, agent ?? null]);
}

function updateTurns(transcript, ids, update) {
  let changed = false;
  const next = transcript.map((turn) => {
    if (!ids(turn)) return turn;
    changed = true;
    return { ...turn, ...update(turn) };
  });
  return changed ? next : transcript;
}

function receive(state, message) {
  const byId = (turn) => turn.id === message.id;
  switch (message.type) {
    case "ack":
      return {
        ...state,
        transcript: updateTurns(
          state.transcript,
          (t) => byId(t) && t.status === "sending",
          () => ({
            status: "accepted",
          }),
        ),
      };
    case "start":
      return { ...state, transcript: updateTurns(state.transcript, byId, () => ({ status: "streaming" })) };
    case "delta":
      return {
        ...state,
        transcript: updateTurns(state.transcript, byId, (t) => ({
          status: "streaming",
          answer: t.answer + message.text,
        })),
      };
    case "done":
      return {
        ...state,
        transcript: updateTurns(state.transcript, byId, () => ({
          status: message.aborted ? "aborted" : "done",
          usage: message.usage ?? null,
        })),
      };
    case "error": {
      // agent_exited names no prompt: it ends every query that was running.
      const ended =
        message.code === "agent_exited" ? (t) => t.status === "accepted" || t.status === "streaming" : byId;
      return {
        ...state,
        error: message,
        transcript: updateTurns(state.transcript, ended, (t) => ({
          status: "error",
          error: message,
          usage: message.usage ?? t.usage,
        })),
      };
    }
    default:
      return state;
  }
}

function reduce(state, action) {
  switch (action.type) {
    case "reset":
      return { connection: action.connection, session: null, transcript: [], error: null };
    case "status":
      return { ...state, connection: action.connection };
    case "prompt":
      return {
        ...state,
        transcript: [
          ...state.transcript,
          {
            id: action.id,
            prompt: action.text,
            options: action.options,
            status: "sending",
            answer: "",
            usage: null,
            error: null,
            incomplete: false,
          },
        ],
      };
    case "message":
      return receive(state, action.message);
    case "session": {
      const fresh = state.session !== null && !action.message.resumed;
      return {
        ...state,
        session: action.message.session,
        // A fresh session after another one: the answers that lived in the old one are gone.
        // Prompts not yet acknowledged stay "sending"; the client sends them again.
        transcript: fresh
          ? updateTurns(
              state.transcript,
              (t) => t.status === "accepted" || t.status === "streaming",
              () => ({ status: "lost" }),
            )
          : state.transcript,
      };
    }
    case "lost":
      return {
        ...state,
        transcript: updateTurns(
          state.transcript,
          (t) => UNFINISHED.has(t.status),
          () => ({ incomplete: true }),
        ),
      };
    case "dropped": {
      const ids = new Set(action.prompts.map((p) => p.id));
      return {
        ...state,
        transcript: updateTurns(
          state.transcript,
          (t) => ids.has(t.id),
          () => ({ status: "dropped" }),
        ),
      };
    }
    default:
      return state;
  }
}

function subscribe(client, dispatch) {
  return [
    client.on("status", (connection) => dispatch({ type: "status", connection })),
    client.on("session", (message) => dispatch({ type: "session", message })),
    client.on("message", (message) => dispatch({ type: "message", message })),
    client.on("lost", (range) => dispatch({ type: "lost", range })),
    client.on("dropped", (prompts) => dispatch({ type: "dropped", prompts })),
  ];
}

function finish(held) {
  for (const off of held.offs) off();
  held.client.close();
}

/** Whole seconds until `at` (epoch ms on the clock `now`), re-rendered as each one passes. */
function useCountdown(at, now) {
  const [time, setTime] = useState(now);
  // The clock is fixed for the life of the client, like the client's other settings.
  useEffect(() => {
    if (at === null) return undefined;
    let timer = null;
    const tick = () => {
      const t = now();
      setTime(t);
      const left = at - t;
      if (left > 0) timer = setTimeout(tick, left % 1000 || 1000);
    };
    tick();
    return () => clearTimeout(timer);
  }, [at]);
  return at === null ? null : Math.max(0, Math.ceil((at - time) / 1000));
}

/**
 * One conversation with one agent for the life of the component. `options` are
 * AgentClient's: `url`, or `baseUrl`, `project` and `agent`, which identify the
 * conversation (changing one starts a new one), `token` (a change applies to the next
 * connection attempt) and the rest, read when the conversation starts.
 */
export function useAgent(options) {
  const [state, dispatch] = useReducer(reduce, options, initialState);
  const held = useRef(null);
  const key = conversationKey(options);

  // Only the conversation's identity restarts it; the token has its own effect below.
  useEffect(() => {
    let current = held.current;
    // The cleanup before this run scheduled a close: StrictMode's remount takes the client
    // back; a new conversation closes it now.
    if (current) {
      clearTimeout(current.closing);
      current.closing = null;
      if (current.key !== key) {
        finish(current);
        current = null;
      }
    }
    if (!current) {
      const client = new AgentClient(options);
      current = { key, client, offs: subscribe(client, dispatch), closing: null };
      held.current = current;
      dispatch({ type: "reset", connection: client.state });
      client.connect();
    }
    const mine = current;
    return () => {
      mine.closing = setTimeout(() => {
        mine.closing = null;
        if (held.current === mine) held.current = null;
        finish(mine);
      }, 0);
    };
  }, [key]);

  const token = options.token ?? "";
  useEffect(() => {
    held.current?.client.setToken(token);
  }, [token]);

  const send = useCallback((text, promptOptions) => {
    const client = held.current?.client;
    if (!client) throw new Error("useAgent: the component is not mounted");
    const id = client.send(text, promptOptions);
    dispatch({ type: "prompt", id, text, options: promptOptions });
    return id;
  }, []);
  const abort = useCallback(() => held.current?.client.abort() ?? false, []);
  const retryNow = useCallback(() => {
    held.current?.client.retryNow();
  }, []);

  const retryIn = useCountdown(state.connection.nextRetryAt, options.now ?? Date.now);
  return {
    connection: state.connection,
    retryIn,
    transcript: state.transcript,
    error: state.error,
    send,
    abort,
    retryNow,
  };
}
