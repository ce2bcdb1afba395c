// Runs server/static/client.js the way a page would, in node, against a real server:
// the DOM is a set of stubs, fetch and WebSocket are node's own (the WebSocket needs
// --experimental-websocket on node 20). Used by tests/test_front_door.py.
//
//   node --experimental-websocket webclient_harness.js CLIENT_JS ORIGIN KEY TIMEOUT_MS
//
// Types KEY into the page's key field when the page asks for one, waits until the
// session's characters are listed (or the page notes an error), then prints what
// happened as JSON on stdout.
"use strict";
const fs = require("fs");
const vm = require("vm");

const [script, origin, key, timeout] = process.argv.slice(2);
const elements = new Map();

function element(id) {
  if (!elements.has(id)) {
    const listeners = {};
    elements.set(id, {
      id, listeners, hidden: id === "key-form" || id === "reconnect",
      value: id === "directory" ? "default" : "", textContent: "", dataset: {},
      disabled: id === "characters", classList: { add() {}, remove() {} },
      scrollHeight: 0, scrollTop: 0, clientHeight: 0,
      addEventListener(type, listener) { listeners[type] = listener; },
      focus() {}, replaceChildren() {}, append() {}, add() {},
    });
  }
  return elements.get(id);
}

let created = 0;
globalThis.document = {
  getElementById: element,
  createElement: () => element(`created-${++created}`),
};
globalThis.location = new URL(`${origin}/`);
globalThis.Option = function Option(text, value) { this.text = text; this.value = value; };
for (const name of ["localStorage", "sessionStorage", "indexedDB"]) {
  Object.defineProperty(globalThis, name, { get() { throw new Error(`${name} used`); } });
}

const requests = [];
const nodeFetch = globalThis.fetch;
globalThis.fetch = (url, options) => {
  requests.push({ url: String(url), authorization: options.headers.Authorization || null });
  // As a browser would: relative to the page, with the page's Origin.
  return nodeFetch(new URL(url, location.href),
    { ...options, headers: { ...options.headers, Origin: location.origin } });
};
const sockets = [];
const NodeWebSocket = globalThis.WebSocket;
globalThis.WebSocket = class extends NodeWebSocket {
  constructor(url, protocols) {
    super(url, protocols);
    sockets.push({ url, protocols });
  }
};

function errors() {
  return [...elements.values()].filter((e) => e.className === "error").map((e) => e.textContent);
}

function report(outcome) {
  process.stdout.write(JSON.stringify({
    outcome,
    errors: errors(),
    status: element("status").textContent,
    keyFormHidden: element("key-form").hidden,
    keyField: element("api-key").value,
    charactersListed: !element("characters").disabled,
    requests,
    sockets,
  }));
  process.exit(0);
}

setTimeout(() => report("timeout"), Number(timeout));
vm.runInThisContext(fs.readFileSync(script, "utf8"), { filename: script });

let typed = false;
setInterval(() => {
  if (!element("key-form").hidden && !typed) {
    typed = true;
    element("api-key").value = key;
    element("key-form").listeners.submit({ preventDefault() {} });
  } else if (!element("characters").disabled) {
    report("listed");
  } else if (errors().length) {
    report("error");
  }
}, 10);
