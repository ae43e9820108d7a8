// The package's main module is the file agentd serves at /agent-client.js. It lives in
// agentd/static (the Python package ships it from there); npm packs only files under this
// directory and skips symlinks, so it is copied here before packing and testing. The copy
// is ignored by git: the served file stays the only source.
import { readFileSync, writeFileSync } from "node:fs";

const served = readFileSync(new URL("../../agentd/static/agent-client.js", import.meta.url));
const copy = new URL("agent-client.js", import.meta.url);
let current = null;
try {
  current = readFileSync(copy);
} catch {}
// Rewriting an identical copy could let a test that is importing it read half a file.
if (!current?.equals(served)) writeFileSync(copy, served);
