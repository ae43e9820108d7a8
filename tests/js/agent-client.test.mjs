// Unit tests of agent-client.js: backoff schedule, attempt accounting, seq handling,
// resume and resend, and when the client must not reconnect. Run: node --test tests/js/

import assert from "node:assert/strict";
import { beforeEach, describe, test } from "node:test";

import {
  AgentClient,
  CONFIRM_AFTER_MS,
  JITTER,
  RECONNECT_DELAYS_MS,
  STABLE_AFTER_MS,
  httpProbe,
  parseRetryAfter,
  reconnectDelay,
} from "../../agentd/static/agent-client.js";

/** A WebSocket stand-in whose server side the test drives. */
class FakeSocket {
  static instances = [];

  constructor(url) {
    this.url = new URL(url);
    this.sent = [];
    this.closedWith = null;
    FakeSocket.instances.push(this);
  }

  static get last() {
    return FakeSocket.instances.at(-1);
  }

  send(data) {
    this.sent.push(JSON.parse(data));
  }

  close(code) {
    this.closedWith = code;
  }

  open() {
    this.onopen?.({});
  }

  receive(message) {
    this.onmessage?.({ data: typeof message === "string" ? message : JSON.stringify(message) });
  }

  startSession(session, { resumed = false, complete = true, lastSeq = 0 } = {}) {
    this.open();
    this.receive({ type: "session", session, resumed, complete, lastSeq });
  }

  drop(code = 1006, reason = "") {
    this.onclose?.({ code, reason, wasClean: code !== 1006 });
  }

  prompts() {
    return this.sent.filter((m) => m.type === "prompt");
  }
}

/** Timers that run only when the test advances the clock. */
class FakeClock {
  constructor() {
    this.time = 1_000_000;
    this.timers = new Map();
    this.nextId = 1;
    this.setTimeout = (fn, ms) => {
      const id = this.nextId++;
      this.timers.set(id, { fn, at: this.time + ms });
      return id;
    };
    this.clearTimeout = (id) => this.timers.delete(id);
    this.now = () => this.time;
  }

  advance(ms) {
    const until = this.time + ms;
    for (;;) {
      const due = [...this.timers].filter(([, t]) => t.at <= until).sort((a, b) => a[1].at - b[1].at);
      if (!due.length) break;
      const [id, timer] = due[0];
      this.timers.delete(id);
      this.time = timer.at;
      timer.fn();
    }
    this.time = until;
  }

  /** The delay of the only pending timer. */
  pendingDelay() {
    assert.equal(this.timers.size, 1, "exactly one timer should be pending");
    return [...this.timers.values()][0].at - this.time;
  }
}

let clock;
let online;

function makeClient(options = {}) {
  return new AgentClient({
    baseUrl: "wss://agentd.example",
    project: "demo",
    agent: "echo",
    token: "t0k",
    WebSocket: FakeSocket,
    setTimeout: clock.setTimeout,
    clearTimeout: clock.clearTimeout,
    now: clock.now,
    random: () => 0.5,
    onlineEvents: online,
    probe: null,
    ...options,
  });
}

/** Lets promise callbacks (the probe) run. */
const settle = () => new Promise((resolve) => setImmediate(resolve));

beforeEach(() => {
  FakeSocket.instances = [];
  clock = new FakeClock();
  online = new EventTarget();
});

describe("backoff schedule", () => {
  test("follows 1 s, 2 s, 5 s, 10 s, 30 s without jitter at the midpoint", () => {
    assert.deepEqual([...RECONNECT_DELAYS_MS], [1000, 2000, 5000, 10000, 30000]);
    assert.deepEqual(
      RECONNECT_DELAYS_MS.map((_, i) => reconnectDelay(i, () => 0.5)),
      [1000, 2000, 5000, 10000, 30000],
    );
  });

  test("stays within the jitter bounds and uses the whole range", () => {
    for (const [i, base] of RECONNECT_DELAYS_MS.entries()) {
      assert.equal(reconnectDelay(i, () => 0), Math.round(base * (1 - JITTER)));
      assert.equal(reconnectDelay(i, () => 0.999999), Math.round(base * (1 + JITTER)));
      for (let n = 0; n < 200; n++) {
        const delay = reconnectDelay(i);
        assert.ok(delay >= base * (1 - JITTER) && delay <= base * (1 + JITTER), `${delay} for ${base}`);
      }
    }
  });

  test("attempts past the schedule wait as long as its last entry", () => {
    assert.equal(reconnectDelay(9, () => 0.5), 30000);
  });

  test("the client waits the jittered delays between failed attempts", () => {
    const randoms = [0, 0.999999, 0.25, 0.75, 0.5];
    const client = makeClient({ random: () => randoms.shift() });
    client.connect();
    const waits = [];
    for (let i = 0; i < 5; i++) {
      FakeSocket.last.drop();
      waits.push(clock.pendingDelay());
      assert.equal(client.nextRetryAt, clock.time + waits.at(-1));
      clock.advance(waits.at(-1));
    }
    assert.deepEqual(waits, [800, 2400, 4500, 11000, 30000]);
  });
});

describe("attempts", () => {
  test("gives up as disconnected after five failed attempts", () => {
    const client = makeClient();
    const statuses = [];
    client.on("status", (s) => statuses.push(`${s.status}:${s.attempt}`));
    client.connect();
    for (let i = 0; i < 5; i++) {
      FakeSocket.last.drop();
      assert.equal(client.status, "reconnecting");
      clock.advance(30_000);
    }
    FakeSocket.last.drop();
    assert.equal(client.status, "disconnected");
    assert.equal(client.reason, "gave_up");
    assert.equal(client.nextRetryAt, null);
    assert.equal(clock.timers.size, 0);
    clock.advance(600_000);
    assert.equal(FakeSocket.instances.length, 6, "the first try and five retries");
    assert.deepEqual(statuses, [
      "connecting:0",
      "reconnecting:1", "reconnecting:1",
      "reconnecting:2", "reconnecting:2",
      "reconnecting:3", "reconnecting:3",
      "reconnecting:4", "reconnecting:4",
      "reconnecting:5", "reconnecting:5",
      "disconnected:5",
    ]);
  });

  test("the count resets once a connection has stayed up", () => {
    const client = makeClient();
    client.connect();
    for (let i = 0; i < 4; i++) {
      FakeSocket.last.drop();
      clock.advance(30_000);
    }
    assert.equal(client.attempt, 4);
    FakeSocket.last.startSession("s1");
    clock.advance(STABLE_AFTER_MS);
    assert.equal(client.attempt, 0);
    FakeSocket.last.drop();
    assert.equal(clock.pendingDelay(), 1000);
  });

  test("a connection that drops before it is stable keeps counting", () => {
    const client = makeClient();
    client.connect();
    FakeSocket.last.drop();
    clock.advance(1000);
    FakeSocket.last.startSession("s1");
    clock.advance(STABLE_AFTER_MS - 1);
    FakeSocket.last.drop();
    assert.equal(client.attempt, 2);
    assert.equal(clock.pendingDelay(), 2000);
  });

  test("retryNow after giving up starts over with a fresh count", () => {
    const client = makeClient();
    client.connect();
    for (let i = 0; i < 6; i++) {
      FakeSocket.last.drop();
      clock.advance(30_000);
    }
    assert.equal(client.status, "disconnected");
    client.retryNow();
    assert.equal(client.status, "connecting");
    assert.equal(FakeSocket.instances.length, 7);
    FakeSocket.last.drop();
    assert.equal(client.attempt, 1);
    assert.equal(clock.pendingDelay(), 1000);
  });

  test("close() from a status listener stops the attempt it was told about", () => {
    const client = makeClient();
    client.connect();
    FakeSocket.last.drop();
    client.on("status", (s) => {
      if (s.status === "reconnecting" && s.nextRetryAt === null) client.close();
    });
    clock.advance(1000);
    assert.equal(client.status, "closed");
    assert.equal(FakeSocket.instances.length, 1);
  });

  test("close() stops reconnecting", () => {
    const client = makeClient();
    client.connect();
    FakeSocket.last.startSession("s1");
    const socket = FakeSocket.last;
    client.close();
    assert.equal(socket.closedWith, 1000);
    socket.drop(1000);
    clock.advance(600_000);
    assert.equal(client.status, "closed");
    assert.equal(FakeSocket.instances.length, 1);
  });
});

describe("seq handling", () => {
  test("each seq is delivered once, in order; duplicates are skipped", () => {
    const client = makeClient();
    const seen = [];
    client.on("message", (m) => seen.push(m.seq));
    client.connect();
    const socket = FakeSocket.last;
    socket.startSession("s1");
    for (const seq of [1, 2, 2, 3, 1, 4, 3]) socket.receive({ type: "delta", id: "a", text: "x", seq });
    assert.deepEqual(seen, [1, 2, 3, 4]);
    assert.equal(client.lastSeq, 4);
  });

  test("replayed messages after a resume are not delivered twice", () => {
    const client = makeClient();
    const seen = [];
    client.on("message", (m) => seen.push(m.seq));
    client.connect();
    FakeSocket.last.startSession("s1");
    for (const seq of [1, 2, 3]) FakeSocket.last.receive({ type: "delta", id: "a", text: "x", seq });
    FakeSocket.last.drop();
    clock.advance(1000);
    FakeSocket.last.startSession("s1", { resumed: true, lastSeq: 5 });
    for (const seq of [2, 3, 4, 5, 6]) FakeSocket.last.receive({ type: "delta", id: "a", text: "x", seq });
    assert.deepEqual(seen, [1, 2, 3, 4, 5, 6]);
  });

  test("a new session restarts seqs from 1", () => {
    const client = makeClient();
    const seen = [];
    client.on("message", (m) => seen.push(`${client.session}:${m.seq}`));
    client.connect();
    FakeSocket.last.startSession("s1");
    for (const seq of [1, 2, 3]) FakeSocket.last.receive({ type: "delta", id: "a", text: "x", seq });
    FakeSocket.last.drop();
    clock.advance(1000);
    FakeSocket.last.startSession("s2", { resumed: false });
    assert.equal(client.lastSeq, 0);
    FakeSocket.last.receive({ type: "pong", seq: 1 });
    assert.deepEqual(seen, ["s1:1", "s1:2", "s1:3", "s2:1"]);
  });

  test("a resume the server could not complete reports lost output once", () => {
    const client = makeClient();
    const lost = [];
    client.on("lost", (l) => lost.push(l));
    client.connect();
    FakeSocket.last.startSession("s1");
    FakeSocket.last.receive({ type: "pong", seq: 1 });
    FakeSocket.last.drop();
    clock.advance(1000);
    FakeSocket.last.startSession("s1", { resumed: true, complete: false, lastSeq: 9 });
    FakeSocket.last.receive({ type: "pong", seq: 7 });
    assert.deepEqual(lost, [{ from: 2, to: null }]);
  });

  test("a gap in seqs is reported as lost", () => {
    const client = makeClient();
    const lost = [];
    client.on("lost", (l) => lost.push(l));
    client.connect();
    FakeSocket.last.startSession("s1");
    FakeSocket.last.receive({ type: "pong", seq: 1 });
    FakeSocket.last.receive({ type: "pong", seq: 4 });
    assert.deepEqual(lost, [{ from: 2, to: 3 }]);
  });

  test("frames that are not JSON objects are ignored", () => {
    const client = makeClient();
    const seen = [];
    client.on("message", (m) => seen.push(m));
    client.connect();
    FakeSocket.last.startSession("s1");
    FakeSocket.last.receive("not json");
    FakeSocket.last.receive("42");
    FakeSocket.last.receive({ type: "pong", seq: 1 });
    assert.deepEqual(seen, [{ type: "pong", seq: 1 }]);
  });
});

describe("resume and resend", () => {
  test("the resume URL carries the session and the last processed seq", () => {
    const client = makeClient();
    client.connect();
    const first = FakeSocket.last.url;
    assert.equal(first.origin + first.pathname, "wss://agentd.example/projects/demo/agent/echo");
    assert.equal(first.searchParams.get("token"), "t0k");
    assert.equal(first.searchParams.has("session"), false);
    assert.equal(first.searchParams.has("last_seq"), false);
    FakeSocket.last.startSession("abc");
    for (const seq of [1, 2, 3, 4]) FakeSocket.last.receive({ type: "delta", id: "a", text: "x", seq });
    FakeSocket.last.drop();
    clock.advance(1000);
    const second = FakeSocket.last.url;
    assert.equal(second.searchParams.get("session"), "abc");
    assert.equal(second.searchParams.get("last_seq"), "4");
    assert.equal(second.searchParams.get("token"), "t0k");
  });

  test("prompts are sent once a session exists, with ids and their options", () => {
    const client = makeClient();
    client.connect();
    const id = client.send("hello", { repeat: 3, type: "stays inside" });
    const plain = client.send("again");
    FakeSocket.last.open();
    assert.deepEqual(FakeSocket.last.sent, []);
    FakeSocket.last.receive({ type: "session", session: "s1", resumed: false, complete: true, lastSeq: 0 });
    assert.deepEqual(FakeSocket.last.sent, [
      { type: "prompt", id, text: "hello", options: { repeat: 3, type: "stays inside" } },
      { type: "prompt", id: plain, text: "again" },
    ]);
    assert.match(id, /^[0-9a-f]{24}$/);
    assert.notEqual(plain, id);
  });

  test("options that are not an object are refused before anything is queued", () => {
    const client = makeClient();
    client.connect();
    for (const options of [null, [1], "repeat", 3]) {
      assert.throws(() => client.send("hello", options), TypeError);
    }
    FakeSocket.last.open();
    FakeSocket.last.receive({ type: "session", session: "s1", resumed: false, complete: true, lastSeq: 0 });
    assert.deepEqual(FakeSocket.last.sent, []);
  });

  test("unacknowledged prompts are resent after a resume, acknowledged ones are not", () => {
    const client = makeClient();
    client.connect();
    FakeSocket.last.startSession("s1");
    const acked = client.send("one");
    const unacked = client.send("two");
    FakeSocket.last.receive({ type: "ack", id: acked, seq: 1 });
    assert.deepEqual(client.pending.map((p) => p.id), [unacked]);
    FakeSocket.last.drop();
    const queued = client.send("three");
    clock.advance(1000);
    FakeSocket.last.startSession("s1", { resumed: true, lastSeq: 1 });
    assert.deepEqual(FakeSocket.last.prompts().map((p) => [p.id, p.text]), [
      [unacked, "two"],
      [queued, "three"],
    ]);
  });

  test("a prompt answered with an error is not resent", () => {
    const client = makeClient();
    client.connect();
    FakeSocket.last.startSession("s1");
    const id = client.send("too fast");
    FakeSocket.last.receive({ type: "error", code: "rate_limit", error: "slow down", id, retryAfter: 500, seq: 1 });
    FakeSocket.last.drop();
    clock.advance(1000);
    FakeSocket.last.startSession("s1", { resumed: true, lastSeq: 1 });
    assert.deepEqual(FakeSocket.last.prompts(), []);
  });

  test("a 1009 close drops the prompts sent on that connection and keeps the rest", () => {
    const client = makeClient();
    const dropped = [];
    client.on("dropped", (d) => dropped.push(...d.map((p) => p.id)));
    client.connect();
    FakeSocket.last.startSession("s1");
    const big = client.send("big");
    FakeSocket.last.drop(1009, "message too big");
    const later = client.send("later");
    clock.advance(1000);
    FakeSocket.last.startSession("s1", { resumed: true });
    assert.deepEqual(dropped, [big]);
    assert.deepEqual(FakeSocket.last.prompts().map((p) => p.id), [later]);
  });

  test("send refuses a prompt over the message size limit", () => {
    const client = makeClient({ maxMessageBytes: 100 });
    client.connect();
    assert.throws(() => client.send("é".repeat(50)), RangeError);
    assert.deepEqual(client.pending, []);
  });

  test("received messages are confirmed once a second, with the last seq, and not again", () => {
    const client = makeClient();
    client.connect();
    const ws = FakeSocket.last;
    ws.startSession("s1");
    ws.receive({ type: "delta", text: "a", seq: 1 });
    ws.receive({ type: "delta", text: "b", seq: 2 });
    ws.receive({ type: "pong" }); // agentd's own answers carry no seq: nothing to confirm
    assert.deepEqual(ws.sent, []);
    clock.advance(CONFIRM_AFTER_MS);
    assert.deepEqual(ws.sent, [{ type: "confirm", seq: 2 }]);
    clock.advance(10 * CONFIRM_AFTER_MS);
    assert.deepEqual(ws.sent, [{ type: "confirm", seq: 2 }]);
    ws.receive({ type: "delta", text: "c", seq: 3 });
    clock.advance(CONFIRM_AFTER_MS);
    assert.deepEqual(ws.sent.at(-1), { type: "confirm", seq: 3 });
    assert.equal(client.lastSeq, 3);
  });

  test("a resume confirms by its last_seq: no confirm message repeats it", () => {
    const client = makeClient();
    client.connect();
    FakeSocket.last.startSession("s1");
    FakeSocket.last.receive({ type: "delta", text: "a", seq: 1 });
    FakeSocket.last.drop();
    clock.advance(RECONNECT_DELAYS_MS[0] * 2);
    const ws = FakeSocket.last;
    assert.equal(ws.url.searchParams.get("last_seq"), "1");
    ws.startSession("s1", { resumed: true, lastSeq: 1 });
    clock.advance(CONFIRM_AFTER_MS);
    assert.deepEqual(ws.sent, []);
  });

  test("abort is sent only while connected", () => {
    const client = makeClient();
    client.connect();
    assert.equal(client.abort(), false);
    FakeSocket.last.startSession("s1");
    assert.equal(client.abort(), true);
    assert.deepEqual(FakeSocket.last.sent, [{ type: "abort" }]);
  });
});

describe("restarts", () => {
  test("a 1012 close (agentd restarting) resumes at once, within the jitter, without counting", () => {
    const client = makeClient({ random: () => 0.25 });
    client.connect();
    FakeSocket.last.startSession("s1");
    FakeSocket.last.receive({ type: "delta", text: "a", seq: 4 });
    FakeSocket.last.drop(1012, "server restarting");
    assert.equal(client.status, "reconnecting");
    assert.equal(client.attempt, 0);
    assert.equal(clock.pendingDelay(), 250);
    clock.advance(250);
    assert.equal(FakeSocket.instances.length, 2);
    const url = FakeSocket.last.url;
    assert.equal(url.searchParams.get("session"), "s1");
    assert.equal(url.searchParams.get("last_seq"), "4");
  });

  test("a 1012 on an attempt that never opened is an ordinary failed attempt", () => {
    const client = makeClient();
    client.connect();
    FakeSocket.last.drop(1012, "server restarting");
    assert.equal(client.attempt, 1);
    assert.equal(clock.pendingDelay(), RECONNECT_DELAYS_MS[0]);
  });
});

describe("when not to reconnect", () => {
  test("a 4001 close (superseded) stops without retrying", () => {
    const client = makeClient();
    client.connect();
    FakeSocket.last.startSession("s1");
    FakeSocket.last.drop(4001, "superseded");
    assert.equal(client.status, "disconnected");
    assert.equal(client.reason, "superseded");
    assert.deepEqual(client.lastClose, { code: 4001, reason: "superseded", wasClean: true, opened: true });
    clock.advance(600_000);
    online.dispatchEvent(new Event("online"));
    assert.equal(FakeSocket.instances.length, 1);
  });

  for (const [status, reason] of [[401, "unauthorized"], [403, "forbidden"], [404, "not_found"]]) {
    test(`a refused attempt the probe explains as HTTP ${status} stops as ${reason}`, async () => {
      const probed = [];
      const client = makeClient({ probe: async (url) => (probed.push(url), { status, retryAfterMs: 0 }) });
      client.connect();
      FakeSocket.last.drop();
      await settle();
      assert.deepEqual(probed, [FakeSocket.last.url.toString()]);
      assert.equal(client.status, "disconnected");
      assert.equal(client.reason, reason);
      assert.equal(client.httpStatus, status);
      clock.advance(600_000);
      online.dispatchEvent(new Event("online"));
      assert.equal(FakeSocket.instances.length, 1);
    });
  }

  test("a refused attempt with an acceptable token (426) is retried", async () => {
    const client = makeClient({ probe: async () => ({ status: 426, retryAfterMs: 0 }) });
    client.connect();
    FakeSocket.last.drop();
    await settle();
    assert.equal(client.status, "reconnecting");
    assert.equal(clock.pendingDelay(), 1000);
  });

  test("a refused attempt with no probe answer is retried", async () => {
    const client = makeClient({ probe: async () => { throw new TypeError("network"); } });
    client.connect();
    FakeSocket.last.drop();
    await settle();
    assert.equal(client.status, "reconnecting");
    assert.equal(client.httpStatus, null);
  });

  test("a 429 waits at least as long as Retry-After", async () => {
    const client = makeClient({ probe: async () => ({ status: 429, retryAfterMs: 7000 }) });
    client.connect();
    FakeSocket.last.drop();
    await settle();
    assert.equal(client.status, "reconnecting");
    assert.equal(clock.pendingDelay(), 7000);
  });

  test("a connection that opened and then dropped is retried without probing", async () => {
    let probes = 0;
    const client = makeClient({ probe: async () => (probes++, { status: 401, retryAfterMs: 0 }) });
    client.connect();
    FakeSocket.last.startSession("s1");
    FakeSocket.last.drop();
    await settle();
    assert.equal(probes, 0);
    assert.equal(client.status, "reconnecting");
  });

  test("close() while probing wins over the probe's answer", async () => {
    const client = makeClient({ probe: async () => ({ status: 426, retryAfterMs: 0 }) });
    client.connect();
    FakeSocket.last.drop();
    client.close();
    await settle();
    assert.equal(client.status, "closed");
    assert.equal(clock.timers.size, 0);
  });
});

describe("online events", () => {
  test("coming back online reconnects at once instead of waiting", () => {
    const client = makeClient();
    client.connect();
    FakeSocket.last.startSession("s1");
    FakeSocket.last.drop();
    clock.advance(1000);
    FakeSocket.last.drop();
    assert.equal(clock.pendingDelay(), 2000);
    online.dispatchEvent(new Event("online"));
    assert.equal(FakeSocket.instances.length, 3);
    assert.equal(client.nextRetryAt, null);
    assert.equal(clock.timers.size, 0);
    assert.equal(client.attempt, 2, "the online attempt uses the slot it replaces");
  });

  test("coming back online after giving up starts over", () => {
    const client = makeClient();
    client.connect();
    for (let i = 0; i < 6; i++) {
      FakeSocket.last.drop();
      clock.advance(30_000);
    }
    assert.equal(client.reason, "gave_up");
    online.dispatchEvent(new Event("online"));
    assert.equal(client.status, "connecting");
    assert.equal(FakeSocket.instances.length, 7);
  });

  test("online events are ignored while connected and after close()", () => {
    const client = makeClient();
    client.connect();
    FakeSocket.last.startSession("s1");
    online.dispatchEvent(new Event("online"));
    assert.equal(FakeSocket.instances.length, 1);
    client.close();
    online.dispatchEvent(new Event("online"));
    assert.equal(FakeSocket.instances.length, 1);
  });
});

describe("helpers", () => {
  test("Retry-After is read as seconds or as an HTTP date", () => {
    assert.equal(parseRetryAfter("3"), 3000);
    assert.equal(parseRetryAfter(null), 0);
    assert.equal(parseRetryAfter("Thu, 01 Jan 1970 00:00:10 GMT", 4000), 6000);
    assert.equal(parseRetryAfter("soon"), 0);
  });

  test("httpProbe asks the route over HTTP and reports the status", async () => {
    const requests = [];
    const fetch = async (url) => {
      requests.push(url);
      return { status: 429, headers: new Headers({ "Retry-After": "2" }) };
    };
    const result = await httpProbe("wss://h/projects/p/agent/a?token=x", { fetch });
    assert.deepEqual(requests, ["https://h/projects/p/agent/a?token=x"]);
    assert.deepEqual(result, { status: 429, retryAfterMs: 2000 });
    assert.equal(await httpProbe("ws://h/", { fetch: async () => { throw new TypeError("down"); } }), null);
  });

  test("the constructor builds the route from a page URL and refuses missing names", () => {
    const client = makeClient({ baseUrl: "http://127.0.0.1:8080/", project: "p 1", agent: "a" });
    client.connect();
    assert.equal(FakeSocket.last.url.toString(), "ws://127.0.0.1:8080/projects/p%201/agent/a?token=t0k");
    assert.throws(() => makeClient({ project: "" }), TypeError);
  });

  test("a throwing listener does not stop the client", () => {
    const reported = [];
    const client = makeClient({ reportError: (error) => reported.push(error.message) });
    client.on("status", () => {
      throw new Error("listener bug");
    });
    client.connect();
    FakeSocket.last.drop();
    assert.equal(client.status, "reconnecting");
    assert.deepEqual(reported, ["listener bug", "listener bug"]);
  });
});
