// A prompt whose id is a number: tsc must refuse to compile this file.
import type { ClientMessage } from "@agentd/client";

export const prompt: ClientMessage = { type: "prompt", id: 42, text: "hello" };
