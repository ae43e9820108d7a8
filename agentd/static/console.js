/**
 * The demo console at /: connects with AgentClient, renders the connection status with a
 * reconnect countdown, and groups each prompt's streamed answer in the transcript. Beside the
 * chat, it shows the token's user this month's usage against their budget (/api/usage) and
 * lets them store, replace and delete their provider keys (/api/keys).
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
      scheduleUsageRefresh();
      break;
    case "error":
      if (turn) {
        setTurnState(turn, "error", errorText(message));
        // A prompt's end: its usage may be recorded, or the budget may be what refused it.
        scheduleUsageRefresh();
      } else {
        notice(errorText(message), "error");
      }
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
  useToken(token);
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

// Usage and provider keys, read and changed with the token the console connected with.

const PROVIDER_NAMES = { anthropic: "Anthropic", openai: "OpenAI" };
// agentd records a query's usage just after its done leaves; a burst of dones reads once.
const USAGE_REFRESH_DELAY_MS = 300;
const dollarsFormat = new Intl.NumberFormat("en-US", { style: "currency", currency: "USD" });
const centsFormat = new Intl.NumberFormat("en-US", {
  style: "currency",
  currency: "USD",
  maximumFractionDigits: 4,
});
const monthFormat = new Intl.DateTimeFormat("en-GB", {
  month: "long",
  year: "numeric",
  timeZone: "UTC",
});
const timeFormat = new Intl.DateTimeFormat("en-GB", {
  dateStyle: "medium",
  timeStyle: "short",
  timeZone: "UTC",
});

let apiToken = "";
let usageTimer = null;
let usageReading = false;
let usageAgain = false;
let usageReadAt = null;
let storedKeys = [];
let keysBusy = false;

class RefusedError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** One call to agentd's HTTP API; its JSON answer, or a RefusedError that says why. */
async function api(method, path, body) {
  const init = { method, cache: "no-store", headers: { Authorization: `Bearer ${apiToken}` } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch {
    throw new RefusedError(0, "agentd did not answer");
  }
  if (response.ok) return response.status === 204 ? null : response.json();
  let error = "";
  try {
    error = (await response.json()).error ?? "";
  } catch {
    // Not agentd's JSON refusal (a proxy's page, say): the status alone must do.
  }
  if (response.status === 401) {
    throw new RefusedError(401, "the token was refused (HTTP 401): paste a fresh one and connect");
  }
  const wait = response.headers.get("retry-after");
  const retry = wait ? `; try again in ${wait} s` : "";
  throw new RefusedError(response.status, `${error || "refused"} (HTTP ${response.status})${retry}`);
}

function setStatus(id, text, kind = "") {
  const status = $(id);
  status.className = `panel-status ${kind}`.trim();
  status.textContent = text;
}

function useToken(token) {
  if (token === apiToken) return;
  apiToken = token;
  const ready = Boolean(token);
  $("usage-refresh").disabled = !ready;
  $("key-fields").disabled = !ready;
  if (!ready) return;
  usageReadAt = null;
  refreshUsage();
  refreshKeys();
}

function money(usd) {
  return (usd > 0 && usd < 1 ? centsFormat : dollarsFormat).format(usd);
}

function count(number) {
  return number.toLocaleString("en-US");
}

function scheduleUsageRefresh() {
  clearTimeout(usageTimer);
  usageTimer = setTimeout(refreshUsage, USAGE_REFRESH_DELAY_MS);
}

async function refreshUsage() {
  clearTimeout(usageTimer);
  if (!apiToken) return;
  if (usageReading) {
    usageAgain = true;
    return;
  }
  usageReading = true;
  if (!usageReadAt) setStatus("usage-status", "Reading usage…");
  try {
    renderUsage(await api("GET", "/api/usage"));
    usageReadAt = new Date();
    setStatus("usage-status", "");
  } catch (failure) {
    const since = usageReadAt && ` The figures shown are from ${timeFormat.format(usageReadAt)} UTC.`;
    setStatus("usage-status", `Could not read usage: ${failure.message}.${since || ""}`, "error");
  } finally {
    usageReading = false;
    if (usageAgain) {
      usageAgain = false;
      refreshUsage();
    }
  }
}

function renderUsage(report) {
  const totals = report.totals;
  const [year, month] = report.month.split("-").map(Number);
  $("usage-month").textContent = monthFormat.format(new Date(Date.UTC(year, month - 1, 1)));
  $("usage-cost").textContent = money(totals.cost_usd);
  $("usage-queries").textContent = count(totals.queries);
  $("usage-input").textContent = count(totals.input_tokens);
  $("usage-output").textContent = count(totals.output_tokens);
  const [read, written] = [totals.cache_read_tokens, totals.cache_write_tokens];
  $("usage-cache-row").hidden = read + written === 0;
  $("usage-cache").textContent = `${count(read)}, ${count(written)}`;
  $("usage-own-row").hidden = totals.user_key_cost_usd === 0;
  $("usage-own").textContent = `${money(totals.user_key_cost_usd)}, not counted against the budget`;
  renderBudget(report.budget);
  $("usage-figures").hidden = false;
}

function renderBudget(budget) {
  const box = $("budget");
  const bar = $("budget-bar");
  $("budget-meter").hidden = !budget;
  if (!budget) {
    box.dataset.state = "none";
    $("budget-amount").textContent = "none set";
    $("budget-note").textContent = "";
    return;
  }
  const share = budget.spent_usd / budget.monthly_usd;
  const soft = Math.round(budget.soft_ratio * 100);
  // Rounded down, so that 79.9 % never reads as the 80 % warning it has not reached.
  const percent = Math.floor(share * 100);
  const amount = `${money(budget.spent_usd)} of ${money(budget.monthly_usd)} (${percent} %)`;
  $("budget-amount").textContent = amount;
  bar.setAttribute("aria-valuemax", String(budget.monthly_usd));
  bar.setAttribute("aria-valuenow", String(Math.min(budget.spent_usd, budget.monthly_usd)));
  bar.setAttribute("aria-valuetext", amount);
  bar.querySelector(".fill").style.width = `${Math.min(100, share * 100)}%`;
  bar.querySelector(".soft-mark").style.left = `calc(${budget.soft_ratio * 100}% - 1px)`;
  const [state, note] = budget.reached
    ? ["reached", "Budget reached: prompts are refused until next month (UTC)."]
    : budget.soft_warning
      ? ["warning", `Over ${soft} % of your budget is spent: prompts are refused once it is reached.`]
      : ["ok", `The mark shows ${soft} %, where a warning starts; prompts are refused at 100 %.`];
  box.dataset.state = state;
  $("budget-note").textContent = note;
}

function providerName(provider) {
  return PROVIDER_NAMES[provider] ?? provider;
}

async function refreshKeys() {
  try {
    renderKeys(await api("GET", "/api/keys"));
    return true;
  } catch (failure) {
    setStatus("keys-status", `Could not read your keys: ${failure.message}.`, "error");
    return false;
  }
}

function renderKeys(listing) {
  storedKeys = listing.keys;
  const select = $("key-provider");
  const chosen = select.value;
  select.replaceChildren(
    ...listing.providers.map((provider) => new Option(providerName(provider), provider)),
  );
  if (listing.providers.includes(chosen)) select.value = chosen;
  $("key-list").replaceChildren(...storedKeys.map(keyItem));
  $("keys-empty").hidden = storedKeys.length > 0;
  setStatus("keys-status", "");
  showFormMode();
}

function keyItem({ provider, last4, setAt }) {
  const name = providerName(provider);
  const item = document.createElement("li");
  item.className = "key";
  item.dataset.provider = provider;
  const title = document.createElement("span");
  title.className = "key-name";
  title.textContent = name;
  const detail = document.createElement("span");
  detail.className = "key-detail";
  const ending = document.createElement("span");
  ending.className = "key-last4";
  ending.textContent = last4;
  const when = document.createElement("time");
  when.dateTime = setAt;
  when.textContent = `${timeFormat.format(new Date(setAt))} UTC`;
  detail.append("ending in ", ending, " · set ", when);
  const actions = document.createElement("div");
  actions.className = "key-actions";
  const replace = document.createElement("button");
  replace.type = "button";
  replace.className = "small";
  replace.textContent = "Replace";
  replace.setAttribute("aria-label", `Replace the ${name} key`);
  replace.addEventListener("click", () => {
    $("key-provider").value = provider;
    showFormMode();
    $("key-value").focus();
  });
  const remove = document.createElement("button");
  remove.type = "button";
  remove.className = "small";
  remove.textContent = "Delete";
  remove.setAttribute("aria-label", `Delete the ${name} key`);
  remove.addEventListener("click", () => deleteKey(provider));
  actions.append(replace, remove);
  item.append(title, actions, detail);
  return item;
}

/** The form says whether saving adds a key or replaces the stored one. */
function showFormMode() {
  const provider = $("key-provider").value;
  const stored = storedKeys.find((key) => key.provider === provider);
  $("key-legend").textContent = stored ? `Replace the ${providerName(provider)} key` : "Add a key";
  $("key-save").textContent = stored ? "Replace key" : "Save key";
}

async function saveKey() {
  if (keysBusy) return;
  const input = $("key-value");
  // The key leaves the page's state at once: nothing shows, keeps or logs it after this.
  const key = input.value.trim();
  input.value = "";
  const provider = $("key-provider").value;
  const name = providerName(provider);
  if (!key) {
    setStatus("keys-status", `Paste the ${name} key first.`, "error");
    return;
  }
  const replacing = storedKeys.some((stored) => stored.provider === provider);
  keysBusy = true;
  $("key-save").disabled = true;
  setStatus("keys-status", `Saving the ${name} key…`);
  try {
    await api("PUT", `/api/keys/${encodeURIComponent(provider)}`, { key });
  } catch (failure) {
    setStatus("keys-status", `The ${name} key was not saved: ${failure.message}.`, "error");
    return;
  } finally {
    keysBusy = false;
    $("key-save").disabled = false;
  }
  if (await refreshKeys()) {
    const stored = storedKeys.find((entry) => entry.provider === provider);
    const verb = replacing ? "Replaced" : "Saved";
    setStatus("keys-status", `${verb} the ${name} key ending in ${stored?.last4 ?? "…"}.`, "ok");
  }
}

async function deleteKey(provider) {
  if (keysBusy) return;
  const name = providerName(provider);
  keysBusy = true;
  try {
    await api("DELETE", `/api/keys/${encodeURIComponent(provider)}`);
  } catch (failure) {
    // 404: it was already gone (deleted in another tab, say); the list catches up below.
    if (failure.status !== 404) {
      setStatus("keys-status", `The ${name} key was not deleted: ${failure.message}.`, "error");
      return;
    }
  } finally {
    keysBusy = false;
  }
  // Its buttons are gone with it: keep keyboard focus in the panel.
  $("keys-heading").focus();
  if (await refreshKeys()) setStatus("keys-status", `Deleted the ${name} key.`, "ok");
}

$("usage-refresh").addEventListener("click", refreshUsage);
$("key-provider").addEventListener("change", showFormMode);
$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  saveKey();
});

const query = new URLSearchParams(location.search);
for (const [name, input] of Object.entries(fields)) input.value = query.get(name) ?? "";
if (Object.values(fields).every((input) => input.value)) connect();
