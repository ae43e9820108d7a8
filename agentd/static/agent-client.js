/**
 * Browser client for agentd's agent WebSocket: prompts with ids, the message stream, and
 * reconnection that resumes the session without losing or repeating output.
 *
 * An ES module with no dependencies. Everything the client touches in its environment
 * (WebSocket, timers, randomness, the clock, `online` events, the HTTP probe) can be passed
 * in through the constructor, so it runs the same under Node's test runner as in a browser.
 * The protocol is described in docs/protocol.md, this client in docs/client.md.
 */

/** The wait before each reconnect attempt, before jitter. Its length caps the attempts. */
export const RECONNECT_DELAYS_MS = Object.freeze([1000, 2000, 5000, 10000, 30000]);

/** Each delay is scaled by a random factor in [1 - JITTER, 1 + JITTER). */
export const JITTER = 0.2;

/** A connection that stays up this long resets the attempt count. */
export const STABLE_AFTER_MS = 5000;

/** agentd's default cap on one client message; larger prompts are refused by send(). */
export const MAX_MESSAGE_BYTES = 1048576;

/** Close code: another connection took over the session. Reconnecting would steal it back. */
export const CLOSE_SUPERSEDED = 4001;

/** Close code: the server refused a message as too big. */
export const CLOSE_TOO_BIG = 1009;

/**
 * Close code: agentd is restarting (a deploy). The session lives on its VM, so the client
 * resumes at once on another instance, after a random wait of up to RESTART_JITTER_MS so
 * that an instance's clients do not all arrive in the same millisecond.
 */
export const CLOSE_RESTARTING = 1012;
export const RESTART_JITTER_MS = 1000;

/**
 * How long after a message the client confirms it has every message up to its lastSeq.
 * The session's holder keeps what is not confirmed (and pauses the agent when that is too
 * much), so confirming lets it go; a resume confirms too.
 */
export const CONFIRM_AFTER_MS = 1000;

/**
 * HTTP statuses that mean "retrying will not help": the client stops and reports why.
 * A browser cannot read the status of a refused WebSocket upgrade, so these come from
 * the probe (see httpProbe).
 */
const REJECTIONS = Object.freeze({ 401: "unauthorized", 403: "forbidden", 404: "not_found" });

/** The ids of prompts are random, so that two tabs never collide within one session. */
function randomId() {
  const bytes = new Uint8Array(12);
  globalThis.crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/**
 * The jittered wait before reconnect attempt number `attempt` (0 for the first).
 * Attempts past the end of the schedule wait as long as its last entry.
 */
export function reconnectDelay(attempt, random = Math.random, delays = RECONNECT_DELAYS_MS) {
  const base = delays[Math.min(attempt, delays.length - 1)];
  return Math.round(base * (1 - JITTER + 2 * JITTER * random()));
}

/** Milliseconds from a Retry-After header (seconds or an HTTP date), or 0. */
export function parseRetryAfter(value, now = Date.now()) {
  if (!value) return 0;
  const seconds = Number(value);
  if (Number.isFinite(seconds)) return Math.max(0, seconds * 1000);
  const date = Date.parse(value);
  return Number.isNaN(date) ? 0 : Math.max(0, date - now);
}

/**
 * Ask the WebSocket route with a plain GET why an upgrade was refused.
 *
 * agentd answers a GET on the agent route with the same checks as the upgrade: 401, 403,
 * 404 or 429 (with Retry-After), and 426 when the request would have been accepted.
 * Resolves to `{status, retryAfterMs}`, or null when there is no answer (network down,
 * timeout, or a cross-origin server that does not allow the request).
 */
export async function httpProbe(url, { fetch = globalThis.fetch, timeoutMs = 5000 } = {}) {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), timeoutMs);
  try {
    const response = await fetch(url.replace(/^ws/, "http"), {
      cache: "no-store",
      redirect: "manual",
      signal: controller.signal,
    });
    return { status: response.status, retryAfterMs: parseRetryAfter(response.headers.get("Retry-After")) };
  } catch {
    return null;
  } finally {
    clearTimeout(timer);
  }
}

function websocketBase(base) {
  return base.replace(/^http(s?):/, "ws$1:").replace(/\/+$/, "");
}

function defaultBaseUrl() {
  const location = globalThis.location;
  if (!location) throw new TypeError("AgentClient needs url or baseUrl outside a browser page");
  return `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}`;
}

/**
 * One conversation with one agent, kept alive across dropped connections.
 *
 * Status: "connecting" (first attempt), "open" (session established), "reconnecting"
 * (waiting for or making a retry; `nextRetryAt` is set while waiting), "disconnected"
 * (stopped; `reason` says why and retryNow() starts over) and "closed" (before connect()
 * and after close()).
 *
 * Events, subscribed with on(type, fn) which returns a function that unsubscribes:
 *   "message"  every server message with a new seq, in order, exactly once, and the
 *              server's answers without a seq (pong, refusals of a prompt)
 *   "session"  the session message that starts each connection
 *   "status"   a snapshot of `state` after every change
 *   "lost"     {from, to}: messages with these seqs are gone (`to` null when not yet known)
 *   "dropped"  [prompt, ...]: unacknowledged prompts discarded after a 1009 close
 */
export class AgentClient {
  constructor(options = {}) {
    const {
      url,
      baseUrl,
      project,
      agent,
      token = "",
      WebSocket = globalThis.WebSocket,
      setTimeout = (fn, ms) => globalThis.setTimeout(fn, ms),
      clearTimeout = (id) => globalThis.clearTimeout(id),
      random = Math.random,
      now = Date.now,
      onlineEvents = globalThis.window ?? null,
      probe = typeof globalThis.fetch === "function" ? httpProbe : null,
      delays = RECONNECT_DELAYS_MS,
      stableAfterMs = STABLE_AFTER_MS,
      maxMessageBytes = MAX_MESSAGE_BYTES,
      restartJitterMs = RESTART_JITTER_MS,
      confirmAfterMs = CONFIRM_AFTER_MS,
      reportError = (error) =>
        globalThis.reportError ? globalThis.reportError(error) : console.error(error),
    } = options;
    if (url) {
      this._endpoint = new URL(websocketBase(url));
    } else {
      if (!project || !agent) throw new TypeError("AgentClient needs url, or project and agent");
      const base = websocketBase(baseUrl ?? defaultBaseUrl());
      const path = `/projects/${encodeURIComponent(project)}/agent/${encodeURIComponent(agent)}`;
      this._endpoint = new URL(base + path);
    }
    if (!delays.length) throw new TypeError("AgentClient needs at least one reconnect delay");
    this._token = token;
    this._WebSocket = WebSocket;
    this._setTimeout = setTimeout;
    this._clearTimeout = clearTimeout;
    this._random = random;
    this._now = now;
    this._onlineEvents = onlineEvents;
    this._probe = probe;
    this._delays = delays;
    this._stableAfterMs = stableAfterMs;
    this._maxMessageBytes = maxMessageBytes;
    this._restartJitterMs = restartJitterMs;
    this._confirmAfterMs = confirmAfterMs;
    this._reportError = reportError;
    this._encoder = new TextEncoder();
    this._listeners = new Map();
    this._pending = new Map();
    this._onOnline = () => this._handleOnline();
    this._listeningOnline = false;

    this.status = "closed";
    /** Why the client stopped: "gave_up", "superseded", "unauthorized", "forbidden", "not_found". */
    this.reason = null;
    /** Reconnect attempts made since the last stable connection; 0 while none. */
    this.attempt = 0;
    /** Epoch milliseconds of the next attempt while waiting for it, else null. */
    this.nextRetryAt = null;
    /** The last close: {code, reason, wasClean, opened}; opened is false for a refused attempt. */
    this.lastClose = null;
    /** The probe's HTTP status for the last refused attempt, else null. */
    this.httpStatus = null;
    this.session = null;
    /** The highest seq processed in this session. */
    this.lastSeq = 0;

    this._ws = null;
    this._opened = false;
    this._ready = false;
    this._connection = 0;
    this._generation = 0;
    this._retryTimer = null;
    this._stableTimer = null;
    this._confirmTimer = null;
    this._confirmed = 0;
    this._announcedLossFrom = null;
  }

  get maxAttempts() {
    return this._delays.length;
  }

  /** Prompts sent but not yet acknowledged, oldest first: [{id, message}]. */
  get pending() {
    return Array.from(this._pending.values(), ({ id, message }) => ({ id, message }));
  }

  get state() {
    return {
      status: this.status,
      reason: this.reason,
      attempt: this.attempt,
      maxAttempts: this.maxAttempts,
      nextRetryAt: this.nextRetryAt,
      lastClose: this.lastClose,
      httpStatus: this.httpStatus,
      session: this.session,
      lastSeq: this.lastSeq,
    };
  }

  on(type, fn) {
    if (!this._listeners.has(type)) this._listeners.set(type, new Set());
    this._listeners.get(type).add(fn);
    return () => this.off(type, fn);
  }

  off(type, fn) {
    this._listeners.get(type)?.delete(fn);
  }

  /** Start connecting, with a fresh attempt count. Does nothing while open or connecting. */
  connect() {
    if (this.status === "connecting") return this;
    return this.retryNow();
  }

  /** Give up waiting, or start over after "disconnected": connect now with a fresh count. */
  retryNow() {
    if (this.status === "open") return this;
    this._listenOnline(true);
    this.attempt = 0;
    this._dial("connecting");
    return this;
  }

  /** The token for the next attempt, e.g. after "unauthorized"; follow with retryNow(). */
  setToken(token) {
    this._token = token;
  }

  /**
   * Queue a prompt and return its id. It goes out as soon as a session is established and
   * again after every reconnect until the server acknowledges it. `options`, a plain object
   * of at most 4 KiB as JSON, reaches the agent as the prompt's `options`; agentd passes on
   * nothing else.
   */
  send(text, options = {}) {
    if (this.status === "closed") throw new Error("AgentClient is closed; call connect() first");
    if (options === null || typeof options !== "object" || Array.isArray(options)) {
      throw new TypeError("prompt options must be an object");
    }
    const id = randomId();
    const message = { type: "prompt", id, text };
    if (Object.keys(options).length) message.options = options;
    const data = JSON.stringify(message);
    const size = this._encoder.encode(data).length;
    if (size > this._maxMessageBytes) {
      throw new RangeError(`prompt is ${size} bytes; the limit is ${this._maxMessageBytes}`);
    }
    const entry = { id, message, data, connection: null };
    this._pending.set(id, entry);
    if (this._ready) this._transmit(entry);
    return id;
  }

  /** Ask the agent to stop the current answer. Returns false when not connected. */
  abort() {
    return this._sendControl({ type: "abort" });
  }

  /** Ask the server for a pong. Returns false when not connected. */
  ping() {
    return this._sendControl({ type: "ping" });
  }

  /** Disconnect for good; nothing reconnects until connect() is called again. */
  close() {
    this._generation += 1;
    this._clearTimers();
    this._listenOnline(false);
    const ws = this._ws;
    this._ws = null;
    this._ready = false;
    if (ws) ws.close(1000);
    this.nextRetryAt = null;
    this.reason = null;
    this._setStatus("closed");
  }

  _sendControl(message) {
    if (!this._ready) return false;
    this._ws.send(JSON.stringify(message));
    return true;
  }

  _transmit(entry) {
    entry.connection = this._connection;
    this._ws.send(entry.data);
  }

  _dial(status) {
    this._generation += 1;
    this._clearTimers();
    const previous = this._ws;
    if (previous) {
      this._ws = null;
      previous.close(1000);
    }
    this.reason = null;
    this.nextRetryAt = null;
    this._opened = false;
    this._ready = false;
    const generation = this._generation;
    this._setStatus(status);
    if (generation !== this._generation) return; // a status listener closed or redialled
    const url = this._url();
    const ws = new this._WebSocket(url);
    this._ws = ws;
    ws.onopen = () => {
      if (ws === this._ws) this._opened = true;
    };
    ws.onmessage = (event) => {
      if (ws === this._ws) this._receive(event.data);
    };
    ws.onclose = (event) => {
      if (ws === this._ws) this._closed(event, url);
    };
  }

  _url() {
    const url = new URL(this._endpoint);
    if (this._token) url.searchParams.set("token", this._token);
    if (this.session !== null) {
      url.searchParams.set("session", this.session);
      url.searchParams.set("last_seq", String(this.lastSeq));
    }
    return url.toString();
  }

  _receive(data) {
    let message;
    try {
      message = JSON.parse(data);
    } catch {
      return;
    }
    if (message === null || typeof message !== "object") return;
    if (message.type === "session") {
      this._startSession(message);
      return;
    }
    if (Number.isInteger(message.seq)) {
      if (message.seq <= this.lastSeq) return;
      if (message.seq > this.lastSeq + 1) this._gap(this.lastSeq + 1, message.seq - 1);
      this.lastSeq = message.seq;
      if (this._confirmTimer === null) {
        this._confirmTimer = this._setTimeout(() => this._confirm(), this._confirmAfterMs);
      }
    }
    if (typeof message.id === "string") this._pending.delete(message.id);
    this._emit("message", message);
  }

  _confirm() {
    this._confirmTimer = null;
    if (this._ready && this.lastSeq > this._confirmed) {
      this._confirmed = this.lastSeq;
      this._ws.send(JSON.stringify({ type: "confirm", seq: this.lastSeq }));
    }
  }

  _startSession(message) {
    if (!(message.resumed === true && message.session === this.session)) this.lastSeq = 0;
    // Resuming with last_seq confirmed everything up to it.
    this._confirmed = this.lastSeq;
    this.session = message.session;
    this._connection += 1;
    this._ready = true;
    this._announcedLossFrom = null;
    this._setStatus("open");
    this._emit("session", message);
    if (message.complete === false) {
      this._announcedLossFrom = this.lastSeq + 1;
      this._emit("lost", { from: this.lastSeq + 1, to: null });
    }
    for (const entry of this._pending.values()) {
      if (!this._ready) break;
      this._transmit(entry);
    }
    const generation = this._generation;
    this._stableTimer = this._setTimeout(() => {
      this._stableTimer = null;
      if (generation !== this._generation || this.attempt === 0) return;
      this.attempt = 0;
      this._setStatus("open");
    }, this._stableAfterMs);
  }

  _gap(from, to) {
    if (from === this._announcedLossFrom) {
      this._announcedLossFrom = null;
      return;
    }
    this._emit("lost", { from, to });
  }

  _closed(event, url) {
    this._ws = null;
    this._ready = false;
    this._clearTimers();
    const opened = this._opened;
    this.lastClose = { code: event.code, reason: event.reason, wasClean: event.wasClean, opened };
    this.httpStatus = null;
    if (event.code === CLOSE_TOO_BIG) this._dropSentPrompts();
    if (event.code === CLOSE_SUPERSEDED) {
      this._stop("superseded");
    } else if (event.code === CLOSE_RESTARTING && opened) {
      this._scheduleRestart();
    } else if (!opened && this._probe) {
      this._probeRefusal(url);
    } else {
      this._scheduleRetry(0);
    }
  }

  _dropSentPrompts() {
    const dropped = [];
    for (const entry of this._pending.values()) {
      if (entry.connection === this._connection) {
        this._pending.delete(entry.id);
        dropped.push({ id: entry.id, message: entry.message });
      }
    }
    if (dropped.length) this._emit("dropped", dropped);
  }

  _probeRefusal(url) {
    const generation = this._generation;
    Promise.resolve()
      .then(() => this._probe(url))
      .catch(() => null)
      .then((result) => {
        if (generation !== this._generation) return;
        this.httpStatus = result?.status ?? null;
        const rejection = REJECTIONS[this.httpStatus];
        if (rejection) this._stop(rejection);
        else this._scheduleRetry(result?.retryAfterMs ?? 0);
      });
  }

  _scheduleRetry(minimumDelay) {
    if (this.attempt >= this._delays.length) {
      this._stop("gave_up");
      return;
    }
    const delay = Math.max(reconnectDelay(this.attempt, this._random, this._delays), minimumDelay);
    this.attempt += 1;
    this._redialAfter(delay);
  }

  /** agentd is restarting: resume elsewhere at once; this is not a failed attempt. */
  _scheduleRestart() {
    this._redialAfter(Math.round(this._random() * this._restartJitterMs));
  }

  _redialAfter(delay) {
    this.nextRetryAt = this._now() + delay;
    this._retryTimer = this._setTimeout(() => {
      this._retryTimer = null;
      this._dial("reconnecting");
    }, delay);
    this._setStatus("reconnecting");
  }

  _stop(reason) {
    this._clearTimers();
    this.nextRetryAt = null;
    this.reason = reason;
    this._setStatus("disconnected");
  }

  _handleOnline() {
    if (this.status === "reconnecting" && this._retryTimer !== null) {
      this._dial("reconnecting");
    } else if (this.status === "disconnected" && this.reason === "gave_up") {
      this.retryNow();
    }
  }

  _listenOnline(on) {
    if (!this._onlineEvents || on === this._listeningOnline) return;
    if (on) this._onlineEvents.addEventListener("online", this._onOnline);
    else this._onlineEvents.removeEventListener("online", this._onOnline);
    this._listeningOnline = on;
  }

  _clearTimers() {
    if (this._retryTimer !== null) this._clearTimeout(this._retryTimer);
    if (this._stableTimer !== null) this._clearTimeout(this._stableTimer);
    if (this._confirmTimer !== null) this._clearTimeout(this._confirmTimer);
    this._retryTimer = null;
    this._stableTimer = null;
    this._confirmTimer = null;
  }

  _setStatus(status) {
    this.status = status;
    this._emit("status", this.state);
  }

  _emit(type, detail) {
    for (const fn of [...(this._listeners.get(type) ?? [])]) {
      try {
        fn(detail);
      } catch (error) {
        // A broken listener must not break reconnection; report it like an uncaught error.
        this._reportError(error);
      }
    }
  }
}
