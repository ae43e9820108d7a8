/**
 * The demo console at /: connects with AgentClient, renders the connection status with a
 * reconnect countdown, and groups each prompt's streamed answer in the transcript.
 */
import { AgentClient } from "./agent-client.js";

const $ = (id) => document.getElementById(id);
const fields = { token: $("token"), project: $("project"), agent: $("agent") };
const pill = $("status-pill");
const detail = $("status-detail");
const transcript = $("transcript");
const turns = new Map();

let client = null;
let target = null;
let unsubscribe = [];
let countdown = null;

const REASONS = {
  gave_up: (s) => `gave up after ${s.maxAttempts} attempts${closeText(s.lastClose)}`,
  superseded: () => "another tab or window took over this session",
  unauthorized: () => "the token was refused (HTTP 401): paste a fresh one and connect",
  forbidden: () => "HTTP 403: the token does not grant this project, or this page's origin is not allowed",
  not_found: () => "HTTP 404: no such project or agent",
};

function closeText(close) {
  if (!close) return "";
  if (!close.opened) return `; the connection failed before opening (code ${close.code})`;
  if (close.code === 1006) return "; the connection was lost (code 1006)";
  return `; the server closed the connection (code ${close.code}${close.reason ? `: ${close.reason}` : ""})`;
}

function renderStatus(state) {
  pill.dataset.status = state.status;
  $("retry").hidden = !(state.status === "disconnected" || (state.status === "reconnecting" && state.nextRetryAt));
  $("disconnect").disabled = state.status === "closed";
  $("send").disabled = state.status === "closed";
  $("abort").disabled = state.status !== "open";
  clearInterval(countdown);
  countdown = null;
  const attempt = `attempt ${state.attempt} of ${state.maxAttempts}`;
  switch (state.status) {
    case "closed":
      pill.textContent = "Not connected";
      detail.textContent = "";
      break;
    case "connecting":
      pill.textContent = "Connecting…";
      detail.textContent = "";
      break;
    case "open":
      pill.textContent = "Connected";
      detail.textContent = progressText(state);
      break;
    case "reconnecting":
      if (state.nextRetryAt) {
        const tick = () => {
          const seconds = Math.max(0, Math.ceil((state.nextRetryAt - Date.now()) / 1000));
          pill.textContent = `Reconnecting in ${seconds} s`;
        };
        tick();
        countdown = setInterval(tick, 250);
        detail.textContent = attempt + closeText(state.lastClose);
      } else {
        pill.textContent = "Reconnecting…";
        detail.textContent = attempt;
      }
      break;
    case "disconnected":
      pill.textContent = "Disconnected";
      detail.textContent = REASONS[state.reason](state);
      break;
  }
  // The countdown ticks in the pill only; assistive technology hears each change once.
  $("status-announcement").textContent = `${pill.textContent}. ${detail.textContent}`;
}

function progressText(state) {
  return `session ${state.session.slice(0, 8)}, message ${state.lastSeq}`;
}

function notice(text, kind = "") {
  const item = document.createElement("li");
  item.className = `notice ${kind}`.trim();
  item.textContent = text;
  append(item);
}

function append(item) {
  const atBottom = transcript.scrollHeight - transcript.scrollTop - transcript.clientHeight < 40;
  transcript.append(item);
  if (atBottom) transcript.scrollTop = transcript.scrollHeight;
}

function bubble(className, who) {
  const box = document.createElement("div");
  box.className = `bubble ${className}`;
  const name = document.createElement("span");
  name.className = "who";
  name.textContent = who;
  const text = document.createElement("p");
  text.className = "text";
  box.append(name, text);
  return box;
}

function addTurn(id, text) {
  const item = document.createElement("li");
  item.className = "turn";
  item.dataset.id = id;
  const prompt = bubble("prompt", "You");
  prompt.querySelector(".text").textContent = text;
  const answer = bubble("answer", fields.agent.value);
  const body = document.createTextNode("");
  answer.querySelector(".text").append(body);
  const meta = document.createElement("p");
  meta.className = "meta";
  answer.append(meta);
  item.append(prompt, answer);
  const turn = { item, body, meta };
  turns.set(id, turn);
  setTurnState(turn, "pending", "waiting for the server");
  append(item);
}

function setTurnState(turn, state, text) {
  turn.item.dataset.state = state;
  turn.meta.textContent = text;
}

function usageText(usage = {}) {
  return `${usage.inputTokens ?? 0} in, ${usage.outputTokens ?? 0} out tokens`;
}

function errorText(message) {
  const wait = message.retryAfter ? ` (retry in ${(message.retryAfter / 1000).toFixed(1)} s)` : "";
  return `${message.code}: ${message.error}${wait}`;
}

function onMessage(message) {
  const turn = turns.get(message.id);
  switch (message.type) {
    case "ack":
      if (turn && turn.item.dataset.state === "pending") setTurnState(turn, "accepted", "accepted");
      break;
    case "start":
      if (turn) setTurnState(turn, "answering", "answering…");
      break;
    case "delta":
      if (turn) {
        turn.body.data += message.text;
        if (turn.item.dataset.state !== "answering") setTurnState(turn, "answering", "answering…");
        if (transcript.scrollHeight - transcript.scrollTop - transcript.clientHeight < 80) {
          transcript.scrollTop = transcript.scrollHeight;
        }
      }
      break;
    case "done":
      if (turn) {
        const [state, word] = message.aborted ? ["aborted", "stopped"] : ["done", "done"];
        setTurnState(turn, state, `${word} · ${usageText(message.usage)}`);
      }
      break;
    case "error":
      if (turn) setTurnState(turn, "error", errorText(message));
      else notice(errorText(message), "error");
      break;
  }
  detail.textContent = progressText(client.state);
}

let previousSession = null;

function onSession(message) {
  if (previousSession === null) notice("Connected: new session");
  else if (message.resumed) notice("Reconnected: session resumed");
  else notice("Reconnected to a new session: the agent lost the earlier conversation", "warning");
  previousSession = message.session;
}

function onLost({ from, to }) {
  const range = to === null ? `from message ${from}` : `messages ${from}–${to}`;
  notice(`Some output was lost (${range})`, "warning");
}

function onDropped(prompts) {
  for (const { id } of prompts) {
    const turn = turns.get(id);
    if (turn) setTurnState(turn, "error", "the server refused this prompt as too big");
  }
}

function connect() {
  const token = fields.token.value.trim();
  const project = fields.project.value.trim();
  const agent = fields.agent.value.trim();
  if (client && target.project === project && target.agent === agent) {
    client.setToken(token);
    client.retryNow();
    return;
  }
  disconnect();
  client = new AgentClient({ project, agent, token });
  target = { project, agent };
  previousSession = null;
  unsubscribe = [
    client.on("status", renderStatus),
    client.on("message", onMessage),
    client.on("session", onSession),
    client.on("lost", onLost),
    client.on("dropped", onDropped),
  ];
  client.connect();
}

function disconnect() {
  if (!client) return;
  client.close();
  for (const off of unsubscribe) off();
  unsubscribe = [];
  client = null;
  target = null;
}

$("connection").addEventListener("submit", (event) => {
  event.preventDefault();
  connect();
});
$("disconnect").addEventListener("click", disconnect);
$("retry").addEventListener("click", () => client?.retryNow());
$("abort").addEventListener("click", () => client?.abort());

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const error = $("composer-error");
  error.textContent = "";
  const text = $("prompt").value;
  if (!client || !text.trim()) return;
  let options = {};
  const raw = $("options").value.trim();
  if (raw) {
    try {
      options = JSON.parse(raw);
    } catch {
      options = null;
    }
    if (options === null || typeof options !== "object" || Array.isArray(options)) {
      error.textContent = "Options must be a JSON object.";
      return;
    }
  }
  let id;
  try {
    id = client.send(text, options);
  } catch (failure) {
    error.textContent = failure.message;
    return;
  }
  addTurn(id, text);
  $("prompt").value = "";
});

$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});

const query = new URLSearchParams(location.search);
for (const [name, input] of Object.entries(fields)) input.value = query.get(name) ?? "";
if (Object.values(fields).every((input) => input.value)) connect();
