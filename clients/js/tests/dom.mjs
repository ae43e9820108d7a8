// A jsdom window as the global environment, for React DOM and Testing Library under Node.
// Node's own globals win where both exist (fetch, crypto, TextEncoder, EventTarget): the
// browser has them too, and the client uses them the same way. WebSocket comes from jsdom
// (Node 20 has none), and sends the page's origin as a browser does.

import { JSDOM } from "jsdom";

/** Make a page at `url` the global window, document and the rest. */
export function installDom(url) {
  const { window } = new JSDOM("<!doctype html><html><body></body></html>", { url, pretendToBeVisual: true });
  globalThis.window = window;
  for (const name of Object.getOwnPropertyNames(window)) {
    if (!(name in globalThis)) {
      Object.defineProperty(globalThis, name, { configurable: true, writable: true, value: window[name] });
    }
  }
  return window;
}
