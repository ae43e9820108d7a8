// The npm package as a product team gets it: `npm pack`, installed from the tarball into a
// fresh project, both entry points imported by Node, the declarations checked by tsc, and
// the main module byte for byte the file agentd serves at /agent-client.js.

import assert from "node:assert/strict";
import { execFileSync, spawnSync } from "node:child_process";
import {
  copyFileSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  rmSync,
  symlinkSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { after, before, test } from "node:test";

import { startAgentd } from "./agentd.mjs";

const PACKAGE = fileURLToPath(new URL("../", import.meta.url));
const TYPES = join(PACKAGE, "tests", "types");
const TSC = join(PACKAGE, "node_modules", "typescript", "bin", "tsc");

let work;
let packed;
let tarball;
let app;

function npm(args, cwd) {
  return execFileSync("npm", args, { cwd, encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
}

function tsc(project) {
  return spawnSync(process.execPath, [TSC, "-p", project], { cwd: app, encoding: "utf8" });
}

function node(source) {
  return execFileSync(process.execPath, ["--input-type=module", "-e", source], {
    cwd: app,
    encoding: "utf8",
    stdio: ["ignore", "pipe", "pipe"],
  });
}

/** The names a declaration file exports: `kinds` picks values (const, function, class) or all. */
function declared(file, kinds = "const|function|class|interface|type") {
  const text = readFileSync(join(PACKAGE, file), "utf8");
  const pattern = new RegExp(`^export (?:declare )?(?:${kinds}) (\\w+)`, "gm");
  return [...text.matchAll(pattern)].map((m) => m[1]).sort();
}

before(() => {
  work = mkdtempSync(join(tmpdir(), "agentd-npm-"));
  [packed] = JSON.parse(npm(["pack", "--json", "--pack-destination", work], PACKAGE));
  tarball = join(work, packed.filename);
  app = join(work, "app");
  mkdirSync(app);
  writeFileSync(join(app, "package.json"), JSON.stringify({ name: "app", private: true, type: "module" }));
  npm(["install", "--offline", "--no-audit", "--no-fund", tarball], app);
});

after(() => rmSync(work, { recursive: true, force: true }));

test("npm pack carries the two entry points, their declarations and nothing else", () => {
  assert.deepEqual(packed.files.map((f) => f.path).sort(), [
    "agent-client.d.ts",
    "agent-client.js",
    "package.json",
    "react.d.ts",
    "react.js",
  ]);
});

test("the packed main module is the file agentd serves at /agent-client.js, byte for byte", async () => {
  const inTarball = execFileSync("tar", ["-xzOf", tarball, "package/agent-client.js"]);
  const agentd = await startAgentd();
  try {
    const response = await fetch(`${agentd.http}/agent-client.js`);
    assert.equal(response.status, 200);
    const served = Buffer.from(await response.arrayBuffer());
    assert.ok(served.equals(inTarball), "the packed agent-client.js differs from the served one");
  } finally {
    await agentd.stop();
  }
});

const exportsOf = (entry) =>
  JSON.parse(node(`console.log(JSON.stringify(Object.keys(await import("${entry}")).sort()))`));

test("a fresh project imports the main entry without React, and the hook's entry with it", () => {
  // Each entry point exports exactly what its declarations declare.
  assert.deepEqual(exportsOf("@agentd/client"), declared("agent-client.d.ts", "const|function|class"));
  assert.throws(() => exportsOf("@agentd/client/react"), /Cannot find package 'react'/);

  // React is a peer: the application brings it (here, the version these tests use).
  symlinkSync(join(PACKAGE, "node_modules", "react"), join(app, "node_modules", "react"), "dir");
  assert.deepEqual(exportsOf("@agentd/client/react"), declared("react.d.ts", "const|function|class"));
  assert.deepEqual(exportsOf("@agentd/client/react"), ["useAgent"]);
});

test("tsc --noEmit accepts a consumer that uses every exported type", () => {
  const consumer = readFileSync(join(TYPES, "consumer.ts"), "utf8");
  for (const name of [...declared("agent-client.d.ts"), ...declared("react.d.ts")]) {
    assert.match(consumer, new RegExp(`\\b${name}\\b`), `consumer.ts does not use ${name}`);
  }
  copyFileSync(join(TYPES, "tsconfig.json"), join(app, "tsconfig.json"));
  copyFileSync(join(TYPES, "consumer.ts"), join(app, "consumer.ts"));
  const result = tsc("tsconfig.json");
  assert.equal(result.status, 0, result.stdout + result.stderr);
});

test("tsc refuses a prompt message whose id is a number", () => {
  copyFileSync(join(TYPES, "tsconfig.json"), join(app, "tsconfig.json"));
  copyFileSync(join(TYPES, "wrong-message.ts"), join(app, "wrong-message.ts"));
  writeFileSync(
    join(app, "tsconfig.wrong.json"),
    JSON.stringify({ extends: "./tsconfig.json", files: ["wrong-message.ts"] }),
  );
  const result = tsc("tsconfig.wrong.json");
  assert.notEqual(result.status, 0);
  const errors = result.stdout.split("\n").filter((line) => line.includes("error TS"));
  assert.deepEqual(errors, [
    "wrong-message.ts(4,56): error TS2322: Type 'number' is not assignable to type 'string'.",
  ]);
});
