// useAgent() with React DOM and Testing Library under jsdom, against a real agentd behind a
// proxy that the tests cut. Run: npm test (in clients/js), or make test.

import assert from "node:assert/strict";
import { after, afterEach, test } from "node:test";

import { SeverableProxy, sample, startAgentd, token } from "./agentd.mjs";
import { installDom } from "./dom.mjs";

// Two prompts a minute per user, so that a third one meets the rate limit.
const agentd = await startAgentd("[ratelimit]\nprompts_per_minute = 2\n");
const proxy = new SeverableProxy(agentd.port);
await proxy.start();
// The page's origin is the proxy's: agentd admits a WebSocket whose Origin matches its Host.
installDom(`${proxy.http}/`);

const React = await import("react");
const { act, cleanup, fireEvent, render, renderHook, screen, waitFor } =
  await import("@testing-library/react");
const { useAgent } = await import("@agentd/client/react");
// Answers arrive from a real socket, outside act(); Testing Library's waitFor renders them.
globalThis.IS_REACT_ACT_ENVIRONMENT = false;

const h = React.createElement;
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const until = (check, timeout = 10_000) => waitFor(check, { timeout, interval: 20 });

let users = 0;
/** Each test is its own user: agentd keys sessions and rate limits by user. */
const newUser = () => `user${++users}`;

/** `count` numbered words: a repeated or missing delta shows in the text. */
const numberedWords = (count) =>
  Array.from({ length: count }, (_, i) => `w${String(i).padStart(3, "0")}`).join(" ");

function route(user, extra = {}) {
  return { baseUrl: proxy.http, project: "demo", agent: "echo", token: token(user), ...extra };
}

async function counters() {
  const text = await agentd.metrics();
  return {
    created: sample(text, "agentd_session_events_total", 'event="created"'),
    resumed: sample(text, "agentd_session_events_total", 'event="resumed"'),
    superseded: sample(text, "agentd_session_events_total", 'event="superseded"'),
    detached: sample(text, "agentd_session_events_total", 'event="detached"'),
    upgrades: sample(text, "agentd_handshakes_total", 'status="101"'),
    attached: sample(text, "agent_active_connections", 'agent="echo"'),
  };
}

async function open(result) {
  await until(() => assert.equal(result.current.connection.status, "open"));
}

afterEach(async () => {
  cleanup();
  // Every test's sockets close once its components unmount.
  await until(() => assert.equal(proxy.clients.size, 0));
});

after(async () => {
  await proxy.stop();
  await agentd.stop();
});

test("a component connects, sends a prompt and renders the streamed answer", async () => {
  function Chat({ url, token }) {
    const { connection, transcript, send } = useAgent({ url, token });
    return h(
      "main",
      null,
      h("p", { "data-testid": "status" }, connection.status),
      transcript.map((turn) =>
        h("p", { key: turn.id, "data-testid": "turn" }, `${turn.prompt} => ${turn.answer} [${turn.status}]`),
      ),
      h("button", { onClick: () => send("hello from a component") }, "Send"),
    );
  }
  render(h(Chat, { url: `${proxy.ws}/projects/demo/agent/echo`, token: token(newUser()) }));
  await until(() => assert.equal(screen.getByTestId("status").textContent, "open"));
  fireEvent.click(screen.getByText("Send"));
  await until(() =>
    assert.equal(
      screen.getByTestId("turn").textContent,
      "hello from a component => hello from a component [done]",
    ),
  );
});

test("a turn goes from sending to done with its usage, and the connection reports its session", async () => {
  const options = route(newUser());
  const { result } = renderHook(() => useAgent(options));
  assert.equal(result.current.connection.status, "connecting");
  await open(result);
  assert.equal(typeof result.current.connection.session, "string");
  let id;
  act(() => {
    id = result.current.send("one two three", { repeat: 2 });
  });
  assert.deepEqual(
    result.current.transcript.map((t) => [t.id, t.status]),
    [[id, "sending"]],
  );
  await until(() => assert.equal(result.current.transcript[0].status, "done"));
  const [turn] = result.current.transcript;
  assert.equal(turn.prompt, "one two three");
  assert.deepEqual(turn.options, { repeat: 2 });
  assert.equal(turn.answer, "one two threeone two three");
  assert.equal(turn.usage.inputTokens, 3);
  assert.equal(turn.usage.outputTokens, 6);
  assert.equal(turn.usage.model, "echo");
  assert.equal(result.current.error, null);
});

test("a dropped connection counts down, resumes the session and finishes the answer once", async () => {
  const options = route(newUser());
  const { result } = renderHook(() => useAgent(options));
  await open(result);
  const session = result.current.connection.session;
  const before = await counters();
  const acceptedBefore = proxy.accepted;
  const text = numberedWords(80);
  act(() => {
    result.current.send(text, { delay_ms: 30 });
  });
  await until(() => assert.match(result.current.transcript[0].answer, /w020/));

  proxy.sever();

  await until(() => {
    assert.equal(result.current.connection.status, "reconnecting");
    assert.notEqual(result.current.retryIn, null);
  }, 3000);
  const { connection, retryIn, transcript } = result.current;
  assert.equal(connection.attempt, 1);
  assert.equal(connection.maxAttempts, 5);
  assert.equal(connection.lastClose.code, 1006);
  assert.ok(retryIn === 1 || retryIn === 2, `the first retry waits 0.8 to 1.2 s, not ${retryIn} s`);
  assert.ok(text.startsWith(transcript[0].answer) && transcript[0].answer !== text, "cut mid-answer");

  await open(result);
  assert.equal(result.current.connection.session, session);
  await until(() => assert.equal(result.current.transcript[0].status, "done"), 20_000);
  assert.equal(result.current.transcript[0].answer, text);
  assert.equal(result.current.transcript[0].incomplete, false);
  const now = await counters();
  assert.equal(now.resumed - before.resumed, 1);
  assert.equal(now.created - before.created, 0);
  assert.equal(proxy.accepted - acceptedBefore, 1);
});

test("StrictMode's double mount opens one WebSocket and one session", async () => {
  const before = await counters();
  const acceptedBefore = proxy.accepted;
  const options = route(newUser());
  const { result } = renderHook(() => useAgent(options), { reactStrictMode: true });
  await open(result);
  act(() => {
    result.current.send("strict mode");
  });
  await until(() => assert.equal(result.current.transcript.at(-1).status, "done"));
  // Long enough for a second connection, had one been opened, to arrive and take over.
  await sleep(300);
  const now = await counters();
  assert.equal(proxy.accepted - acceptedBefore, 1, "TCP connections to agentd");
  assert.equal(now.upgrades - before.upgrades, 1, "WebSocket upgrades");
  assert.equal(now.created - before.created, 1, "sessions");
  assert.equal(now.superseded - before.superseded, 0);
  assert.equal(result.current.connection.status, "open");
  assert.deepEqual(
    result.current.transcript.map((t) => [t.answer, t.status]),
    [["strict mode", "done"]],
  );
});

test("unmounting closes the socket and nothing reconnects", async () => {
  const options = route(newUser(), { delays: [50, 50, 50] });
  const { result, unmount } = renderHook(() => useAgent(options));
  await open(result);
  const before = await counters();
  assert.equal(proxy.clients.size, 1);
  const acceptedBefore = proxy.accepted;

  unmount();

  await until(() => assert.equal(proxy.clients.size, 0));
  await until(async () => assert.equal((await counters()).detached - before.detached, 1));
  assert.equal((await counters()).attached, before.attached - 1);
  await sleep(300);
  assert.equal(proxy.accepted, acceptedBefore, "a reconnect after unmount");
});

test("abort() stops the answer, which ends as aborted", async () => {
  const options = route(newUser());
  const { result } = renderHook(() => useAgent(options));
  await open(result);
  const text = numberedWords(200);
  act(() => {
    result.current.send(text, { delay_ms: 20 });
  });
  await until(() => assert.match(result.current.transcript[0].answer, /w005/));
  let sent;
  act(() => {
    sent = result.current.abort();
  });
  assert.equal(sent, true);
  await until(() => assert.equal(result.current.transcript[0].status, "aborted"));
  const [turn] = result.current.transcript;
  assert.ok(turn.answer.length < text.length && text.startsWith(turn.answer));
  assert.equal(turn.usage.outputTokens, turn.answer.split(" ").filter(Boolean).length);
});

test("a rate-limited prompt is the last error, with its code and retryAfter", async () => {
  const options = route(newUser());
  const { result } = renderHook(() => useAgent(options));
  await open(result);
  for (const text of ["first", "second"]) {
    act(() => {
      result.current.send(text);
    });
    await until(() => assert.equal(result.current.transcript.at(-1).status, "done"));
  }
  let id;
  act(() => {
    id = result.current.send("third");
  });
  await until(() => assert.equal(result.current.transcript.at(-1).status, "error"));
  const { error, transcript } = result.current;
  assert.equal(error.code, "rate_limit");
  assert.equal(error.id, id);
  assert.ok(error.retryAfter > 0 && error.retryAfter <= 60_000, `retryAfter ${error.retryAfter}`);
  assert.equal(error.limit, 2);
  assert.equal(transcript.at(-1).error, error);
  assert.equal(transcript.at(-1).answer, "");
});

test("retryNow() reconnects at once instead of waiting out the delay", async () => {
  const options = route(newUser(), { delays: [20_000, 20_000] });
  const { result } = renderHook(() => useAgent(options));
  await open(result);
  const session = result.current.connection.session;
  proxy.sever();
  await until(() => assert.notEqual(result.current.retryIn, null), 3000);
  assert.ok(
    result.current.retryIn >= 16 && result.current.retryIn <= 24,
    `retryIn ${result.current.retryIn}`,
  );

  act(() => {
    result.current.retryNow();
  });

  await until(() => assert.equal(result.current.connection.status, "open"), 3000);
  assert.equal(result.current.connection.session, session);
  assert.equal(result.current.retryIn, null);
});

test("a token without the project ends disconnected as forbidden; a new token is used on retry", async () => {
  const user = newUser();
  const { result, rerender } = renderHook((props) => useAgent(route(user, props)), {
    initialProps: { token: token(user, ["another-project"]) },
  });
  await until(() => assert.equal(result.current.connection.status, "disconnected"));
  assert.equal(result.current.connection.reason, "forbidden");
  assert.equal(result.current.connection.httpStatus, 403);
  assert.equal(result.current.retryIn, null);

  rerender({ token: token(user, ["demo"]) });
  act(() => {
    result.current.retryNow();
  });

  await open(result);
});

test("changing the project closes the conversation and starts a new one", async () => {
  const user = newUser();
  const { result, rerender } = renderHook((props) => useAgent(route(user, props)), {
    initialProps: { project: "demo", token: token(user, ["*"]) },
  });
  await open(result);
  const first = result.current.connection.session;
  act(() => {
    result.current.send("in demo");
  });
  await until(() => assert.equal(result.current.transcript[0]?.status, "done"));
  const acceptedBefore = proxy.accepted;

  rerender({ project: "other", token: token(user, ["*"]) });

  await until(() => {
    assert.equal(result.current.connection.status, "open");
    assert.notEqual(result.current.connection.session, first);
  });
  assert.deepEqual(result.current.transcript, []);
  assert.equal(proxy.accepted - acceptedBefore, 1);
  await until(() => assert.equal(proxy.clients.size, 1), 3000);
});

test("an agent that exits ends the turn it was running with agent_exited", async () => {
  const options = route(newUser());
  const { result } = renderHook(() => useAgent(options));
  await open(result);
  act(() => {
    result.current.send("goodbye", { exit: 3 });
  });
  await until(() => assert.equal(result.current.transcript[0].status, "error"));
  const { error, transcript } = result.current;
  assert.equal(error.code, "agent_exited");
  assert.equal(error.exitStatus, 3);
  assert.equal(transcript[0].error, error);
});

test("a prompt over agentd's message limit is dropped, not resent, and the client reconnects", async () => {
  // The client's own limit is raised past agentd's 1 MiB so that the server refuses it (1009).
  const options = route(newUser(), { maxMessageBytes: 4 * 1024 * 1024, delays: [50] });
  const { result } = renderHook(() => useAgent(options));
  await open(result);
  const session = result.current.connection.session;
  act(() => {
    result.current.send("x".repeat(1024 * 1024 + 1));
  });
  await until(() => assert.equal(result.current.transcript[0].status, "dropped"));
  assert.equal(result.current.connection.lastClose.code, 1009);
  await open(result);
  assert.equal(result.current.connection.session, session);
  act(() => {
    result.current.send("small again");
  });
  await until(() => assert.equal(result.current.transcript[1].status, "done"));
  assert.equal(result.current.transcript[0].status, "dropped");
});
