// A real agentd for the package's tests: twistd on a free loopback port with the local echo
// agent (started with --test-options, so prompts can ask for slow answers), a proxy in front
// of it that the tests can cut, tokens signed with its secret, and its /metrics read back.
//
// agentd runs from the virtualenv of the Python AGENTD_PYTHON names (its twistd and
// agentd-agent), by default the repository's .venv, which `make test` sets up.

import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

export const REPO = fileURLToPath(new URL("../../../", import.meta.url));
export const SECRET = "test-secret-0123456789abcdef-0123456789abcdef";

const PYTHON = process.env.AGENTD_PYTHON || join(REPO, ".venv", "bin", "python");

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function shellQuote(text) {
  return `'${text.replaceAll("'", "'\\''")}'`;
}

function base64url(value) {
  return Buffer.from(typeof value === "string" ? value : JSON.stringify(value)).toString("base64url");
}

/** An HS256 JWT for `user`, valid for ten minutes. */
export function token(user, projects = ["demo"]) {
  const body = `${base64url({ alg: "HS256", typ: "JWT" })}.${base64url({
    sub: user,
    projects,
    exp: Math.floor(Date.now() / 1000) + 600,
  })}`;
  return `${body}.${createHmac("sha256", SECRET).update(body).digest("base64url")}`;
}

function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/** The value of one sample in Prometheus text, 0 when absent. */
export function sample(text, name, labels = "") {
  const prefix = labels ? `${name}{${labels}} ` : `${name} `;
  const line = text.split("\n").find((l) => l.startsWith(prefix));
  return line ? Number(line.slice(prefix.length)) : 0;
}

/** End every session holder under `sessions`, with its agent (each leads its process group). */
function killHolders(sessions) {
  let names = [];
  try {
    names = readdirSync(sessions);
  } catch {
    return;
  }
  for (const name of names) {
    try {
      const pid = Number(readFileSync(join(sessions, name, "holder.pid"), "utf8"));
      if (pid > 1) process.kill(-pid, "SIGKILL");
    } catch {}
  }
}

/**
 * Start agentd with `config` (TOML) added to the test's own; resolves once it answers
 * /health/live. Stop it with stop().
 */
export async function startAgentd(config = "") {
  const dir = mkdtempSync(join(tmpdir(), "agentd-js-"));
  const port = await freePort();
  const agent = `env PYTHONPATH=${shellQuote(REPO)} ${shellQuote(join(dirname(PYTHON), "agentd-agent"))}`;
  // Sessions are held in the test's own directory; their holders outlive agentd by design,
  // so stop() ends them.
  const sessions = join(dir, "sessions");
  writeFileSync(
    join(dir, "agentd.toml"),
    `[server]\ndrain_seconds = 0.0\n[agents]\ncommand = ${JSON.stringify(`${agent} --test-options {agent}`)}\n` +
      `attach_command = ${JSON.stringify(`${agent} attach`)}\nsessions_dir = ${JSON.stringify(sessions)}\n${config}`,
  );
  const log = join(dir, "agentd.log");
  const child = spawn(
    join(dirname(PYTHON), "twistd"),
    [
      "--nodaemon",
      "--pidfile=",
      `--logfile=${log}`,
      "agentd",
      "--config",
      "agentd.toml",
      "--listen",
      `tcp:${port}:interface=127.0.0.1`,
    ],
    { cwd: dir, env: { ...process.env, AGENTD_JWT_SECRET: SECRET, PYTHONPATH: REPO }, stdio: "ignore" },
  );
  let spawnError = null;
  child.once("error", (error) => {
    spawnError = error;
  });
  const exited = new Promise((resolve) => child.once("exit", resolve));
  const http = `http://127.0.0.1:${port}`;
  const deadline = Date.now() + 30_000;
  for (;;) {
    if (spawnError || child.exitCode !== null || Date.now() > deadline) {
      child.kill("SIGKILL");
      let detail = spawnError ? String(spawnError) : "";
      try {
        detail += readFileSync(log, "utf8").slice(-3000);
      } catch {}
      rmSync(dir, { recursive: true, force: true });
      throw new Error(`agentd (${PYTHON}) did not start:\n${detail}`);
    }
    try {
      if ((await fetch(`${http}/health/live`)).ok) break;
    } catch {}
    await sleep(50);
  }
  return {
    port,
    http,
    async metrics() {
      return (await fetch(`${http}/metrics`)).text();
    },
    async stop() {
      child.kill("SIGTERM");
      const timer = setTimeout(() => child.kill("SIGKILL"), 20_000);
      await exited;
      clearTimeout(timer);
      killHolders(sessions);
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/**
 * A loopback TCP proxy in front of agentd. sever() drops every connection without a
 * goodbye (the browser sees close code 1006), as a dead network or a crashed server would.
 */
export class SeverableProxy {
  constructor(upstreamPort) {
    this.upstreamPort = upstreamPort;
    this.port = null;
    /** Connections accepted since start. */
    this.accepted = 0;
    this.clients = new Set();
    this._server = null;
  }

  get http() {
    return `http://127.0.0.1:${this.port}`;
  }

  get ws() {
    return `ws://127.0.0.1:${this.port}`;
  }

  start() {
    this._server = net.createServer((client) => {
      this.accepted += 1;
      this.clients.add(client);
      const upstream = net.connect(this.upstreamPort, "127.0.0.1");
      client.pipe(upstream).pipe(client);
      const hangUp = () => {
        this.clients.delete(client);
        client.destroy();
        upstream.destroy();
      };
      for (const socket of [client, upstream]) {
        socket.on("close", hangUp);
        socket.on("error", hangUp);
      }
    });
    return new Promise((resolve) =>
      this._server.listen(0, "127.0.0.1", () => {
        this.port = this._server.address().port;
        resolve();
      }),
    );
  }

  sever() {
    for (const client of this.clients) client.destroy();
  }

  async stop() {
    const server = this._server;
    this._server = null;
    this.sever();
    if (server) await new Promise((resolve) => server.close(resolve));
  }
}
