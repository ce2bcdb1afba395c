// Troupe web client: talk to a character of your session (DESIGN.md §2 and §6).
//
//   page load ─▶ POST /v1/realtime/client_secrets (to the server that served the page)
//                200 ─▶ a short-lived secret "ek_…"
//                401 ─▶ the server needs a key: the page asks for one, posts it once with
//                       Authorization: Bearer, and forgets it (never stored anywhere)
//            ─▶ WebSocket /v1/realtime?model=troupe, subprotocols "realtime" and
//               "openai-insecure-api-key.<secret>" (OpenAI GA dialect; ?server=ws://host:port
//               points it at another server, which must accept this server's secrets)
//   session.created ─▶ session.characters.list ─▶ listed: fill the character menu
//   pick a character ─▶ session.update {type: "realtime", audio: {output: {voice}}}
//   Reload ─▶ session.characters.reload {directory} ─▶ reloaded: new menu, per-file errors
//   type text ─▶ conversation.item.create (input_text) + response.create
//   microphone ─▶ AudioWorklet: resample to 24 kHz mono pcm16, post every 80 ms
//              ─▶ input_audio_buffer.append (base64); the server's VAD ends the turn
//   response.output_text.delta ─▶ the character's line in the log
//   response.output_audio.delta (base64 pcm16 24 kHz) ─▶ AudioBuffers queued back to back
//   input_audio_buffer.speech_started / unmute.interrupted_by_vad ─▶ stop playback now
//   error ─▶ a red line in the log
//
// No framework and no build step; only same-origin requests. Regular-expression
// literals are avoided on purpose so tests/test_webclient.py can check the syntax.
"use strict";

const SAMPLE_RATE = 24000; // pcm16 mono, both ways
const CHUNK_MS = 80;

const $ = (id) => document.getElementById(id);
let ws = null;
let secret = null; // {value, expires_at} from POST /v1/realtime/client_secrets
let eventCount = 0;
let audio = null; // AudioContext, created on the first click (autoplay policy)
let playhead = 0; // context time at which the next audio delta starts
const playing = new Set();
let mic = null; // {stream, node} while the microphone is on
const lines = new Map(); // item or response id ─▶ its text element in the log

// ── connection ──────────────────────────────────────────────────────────────

function serverUrl() {
  const given = new URLSearchParams(location.search).get("server");
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  let base = given && (given.startsWith("ws:") || given.startsWith("wss:"))
    ? given : `${scheme}//${location.host}`;
  while (base.endsWith("/")) base = base.slice(0, -1);
  return `${base}/v1/realtime?model=troupe`;
}

// The long-lived key is only ever in the password field and in the one request that
// trades it for a client secret; the field is cleared at once.
async function clientSecret(key) {
  const headers = { "Content-Type": "application/json" };
  if (key) headers.Authorization = `Bearer ${key}`;
  const response = await fetch("/v1/realtime/client_secrets", {
    method: "POST",
    headers,
    body: JSON.stringify({ expires_after: { anchor: "created_at", seconds: 600 } }),
    credentials: "omit",
    cache: "no-store",
  });
  const body = await response.json().catch(() => ({}));
  if (response.status === 401) return { needsKey: true, message: body.error?.message };
  if (!response.ok) throw new Error(body.error?.message || `HTTP ${response.status}`);
  return { value: body.value, expires_at: body.expires_at };
}

async function connect(key = "") {
  $("reconnect").hidden = true;
  setStatus("connecting…");
  if (key || secret === null || secret.expires_at - 30 < Date.now() / 1000) {
    let answer;
    try {
      answer = await clientSecret(key);
    } catch (error) {
      setStatus("disconnected");
      note(`no client secret: ${error.message}`, "error");
      $("reconnect").hidden = false;
      return;
    }
    if (answer.needsKey) {
      secret = null;
      setStatus("this server needs an API key");
      if (key) note(answer.message || "that key was refused", "error");
      $("key-form").hidden = false;
      $("api-key").focus();
      return;
    }
    secret = answer;
  }
  $("key-form").hidden = true;
  ws = new WebSocket(serverUrl(), ["realtime", `openai-insecure-api-key.${secret.value}`]);
  ws.onmessage = (message) => handle(JSON.parse(message.data));
  ws.onerror = () => note(`cannot reach ${serverUrl()} (or it refused the connection: `
    + "full, too many connections, or a page from another origin)", "error");
  ws.onclose = (closed) => {
    ws = null;
    stopMic();
    stopPlayback();
    setStatus(`disconnected (${closed.code}${closed.reason ? ": " + closed.reason : ""})`);
    $("reconnect").hidden = false;
    $("characters").disabled = true;
  };
}

function send(type, fields = {}) {
  if (ws === null || ws.readyState !== WebSocket.OPEN) {
    note("not connected", "error");
    return false;
  }
  ws.send(JSON.stringify({ type, event_id: `evt_web_${++eventCount}`, ...fields }));
  return true;
}

// ── server events ───────────────────────────────────────────────────────────

function handle(event) {
  switch (event.type) {
    case "session.created":
      setStatus(`connected · ${event.session.id}`);
      showVoice(event.session);
      send("session.characters.list");
      break;
    case "session.updated":
      showVoice(event.session);
      break;
    case "session.characters.listed":
      showCharacters(event.characters);
      break;
    case "session.characters.reloaded":
      showReload(event);
      break;
    case "error":
      note(`${event.error.code}: ${event.error.message}`, "error");
      $("characters").value = $("characters").dataset.voice || ""; // undo a refused pick
      break;
    case "conversation.item.added":
      if (event.item.role === "user") showUserItem(event.item);
      break;
    case "conversation.item.input_audio_transcription.delta":
      lineFor(event.item_id, "user", "You").textContent += event.delta;
      break;
    case "conversation.item.input_audio_transcription.completed":
      if (event.transcript) lineFor(event.item_id, "user", "You").textContent = event.transcript;
      break;
    case "input_audio_buffer.speech_started":
      stopPlayback();
      $("mic-state").textContent = "hearing you…";
      break;
    case "input_audio_buffer.speech_stopped":
      $("mic-state").textContent = mic ? "listening" : "";
      break;
    case "unmute.interrupted_by_vad":
      stopPlayback();
      note("(interrupted)");
      break;
    case "response.created":
      lineFor(event.response.id, "character", event.response.voice);
      break;
    case "response.output_text.delta":
    case "response.output_audio_transcript.delta": // a spoken reply's text
      lineFor(event.response_id, "character", "…").textContent += event.delta;
      break;
    case "response.output_audio.delta":
      play(event.delta);
      break;
    case "response.done":
      if (event.response.status !== "completed") {
        lineFor(event.response.id, "character", event.response.voice)
          .textContent += ` [${event.response.status}]`;
      }
      break;
    default:
      break; // other events (committed, audio done, …) change nothing on the page
  }
}

// ── characters ──────────────────────────────────────────────────────────────

function showCharacters(characters) {
  const menu = $("characters");
  const chosen = menu.dataset.voice || "";
  const placeholder = new Option("Choose a character…", "");
  placeholder.disabled = true;
  menu.replaceChildren(placeholder);
  for (const character of characters) {
    const label = character.good === false ? `${character.name} (not good)` : character.name;
    const option = new Option(label, character.name);
    if (character.comment) option.title = character.comment;
    menu.add(option);
  }
  menu.value = characters.some((c) => c.name === chosen) ? chosen : "";
  menu.disabled = false;
}

function showVoice(session) {
  const voice = session.audio?.output?.voice ?? null;
  $("characters").dataset.voice = voice || "";
  $("characters").value = voice || "";
  $("selected").textContent = voice
    ? `Talking to ${voice}.` : "No character chosen: the first one answers.";
}

function showReload(reloaded) {
  $("reload-summary").textContent = `${reloaded.directory}: ${reloaded.loaded_count} of `
    + `${reloaded.total_files} files loaded in ${Math.round(reloaded.duration_ms)} ms.`;
  $("reload-errors").replaceChildren(...reloaded.errors.map((error) => {
    const item = document.createElement("li");
    item.textContent = `${error.file}: ${error.error_type}: ${error.message}`;
    return item;
  }));
  showVoice({}); // a reload ends the conversation and the choice of character
  showCharacters(reloaded.characters);
  note(`characters reloaded from ${reloaded.directory}`);
}

// ── the log ─────────────────────────────────────────────────────────────────

function note(text, kind = "note") {
  const line = document.createElement("p");
  line.className = kind;
  line.textContent = text;
  appendToLog(line);
}

function lineFor(id, kind, who) {
  if (!lines.has(id)) {
    const line = document.createElement("p");
    line.className = kind;
    const name = document.createElement("span");
    name.className = "who";
    name.textContent = `${who}: `;
    const text = document.createElement("span");
    line.append(name, text);
    appendToLog(line);
    lines.set(id, text);
  }
  return lines.get(id);
}

function appendToLog(line) {
  const log = $("log");
  const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
  log.append(line);
  if (atBottom) log.scrollTop = log.scrollHeight;
}

function showUserItem(item) {
  const part = item.content.find((p) => p.type === "input_text");
  if (part) lineFor(item.id, "user", "You").textContent = part.text;
}

function setStatus(text) {
  $("status").textContent = text;
}

// ── playback ────────────────────────────────────────────────────────────────

function audioContext() {
  if (audio === null) audio = new AudioContext();
  if (audio.state === "suspended") audio.resume();
  return audio;
}

function play(base64) {
  const context = audioContext();
  const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
  if (bytes.length < 2) return;
  const view = new DataView(bytes.buffer);
  const buffer = context.createBuffer(1, bytes.length >> 1, SAMPLE_RATE);
  const channel = buffer.getChannelData(0);
  for (let i = 0; i < channel.length; i++) channel[i] = view.getInt16(2 * i, true) / 32768;
  const source = context.createBufferSource();
  source.buffer = buffer;
  source.connect(context.destination);
  // Back to back with what is queued; a short lead when the queue ran dry.
  playhead = Math.max(playhead, context.currentTime + 0.05);
  source.start(playhead);
  playhead += buffer.duration;
  playing.add(source);
  source.onended = () => playing.delete(source);
}

function stopPlayback() {
  for (const source of playing) source.stop();
  playing.clear();
  playhead = 0;
}

// ── microphone ──────────────────────────────────────────────────────────────

// Runs on the audio thread: linear interpolation from the context's rate to 24 kHz,
// posting one ArrayBuffer of pcm16 little-endian every CHUNK_MS.
const WORKLET = `
class Pcm16Resampler extends AudioWorkletProcessor {
  constructor() {
    super();
    this.step = sampleRate / ${SAMPLE_RATE};
    this.position = 0; // in input samples, relative to the current block; -1 is "last"
    this.last = 0;
    this.size = ${SAMPLE_RATE * CHUNK_MS / 1000};
    this.chunk = new DataView(new ArrayBuffer(2 * this.size));
    this.filled = 0;
  }
  process(inputs) {
    const input = inputs[0][0];
    if (!input) return true;
    let t = this.position;
    while (t < input.length - 1) {
      const i = Math.floor(t);
      const a = i < 0 ? this.last : input[i];
      const value = a + (input[i + 1] - a) * (t - i);
      this.chunk.setInt16(2 * this.filled++, Math.max(-1, Math.min(1, value)) * 32767, true);
      if (this.filled === this.size) {
        this.port.postMessage(this.chunk.buffer, [this.chunk.buffer]);
        this.chunk = new DataView(new ArrayBuffer(2 * this.size));
        this.filled = 0;
      }
      t += this.step;
    }
    this.position = t - input.length;
    this.last = input[input.length - 1];
    return true;
  }
}
registerProcessor("pcm16-resampler", Pcm16Resampler);
`;
let workletLoaded = null;

async function startMic() {
  if (!navigator.mediaDevices) throw new Error("the microphone needs https or localhost");
  const context = audioContext();
  if (workletLoaded === null) {
    const url = URL.createObjectURL(new Blob([WORKLET], { type: "text/javascript" }));
    workletLoaded = context.audioWorklet.addModule(url).finally(() => URL.revokeObjectURL(url));
  }
  await workletLoaded;
  const stream = await navigator.mediaDevices.getUserMedia({
    audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true },
  });
  // No outputs: the node is a sink, pulled by the graph without reaching the speakers.
  const node = new AudioWorkletNode(context, "pcm16-resampler", { numberOfOutputs: 0 });
  node.port.onmessage = (message) => {
    send("input_audio_buffer.append", { audio: toBase64(message.data) });
  };
  context.createMediaStreamSource(stream).connect(node);
  mic = { stream, node };
  $("mic").textContent = "Stop microphone";
  $("mic").classList.add("on");
  $("mic-state").textContent = "listening";
}

function stopMic() {
  if (mic === null) return;
  mic.node.port.onmessage = null;
  mic.node.disconnect();
  for (const track of mic.stream.getTracks()) track.stop();
  mic = null;
  $("mic").textContent = "Start microphone";
  $("mic").classList.remove("on");
  $("mic-state").textContent = "";
}

function toBase64(buffer) {
  const bytes = new Uint8Array(buffer);
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(binary);
}

// ── controls ────────────────────────────────────────────────────────────────

$("characters").addEventListener("change", (change) => {
  const voice = change.target.value;
  if (voice) send("session.update", { session: { type: "realtime", audio: { output: { voice } } } });
});

$("reload-form").addEventListener("submit", (submit) => {
  submit.preventDefault();
  const directory = $("directory").value.trim() || "default";
  if (send("session.characters.reload", { directory })) $("reload-summary").textContent = "reloading…";
});

$("text-form").addEventListener("submit", (submit) => {
  submit.preventDefault();
  const text = $("text").value.trim();
  if (!text) return;
  audioContext(); // a click: the moment the browser lets audio start
  const item = { type: "message", role: "user", content: [{ type: "input_text", text }] };
  if (send("conversation.item.create", { item })) {
    send("response.create");
    $("text").value = "";
  }
});

$("mic").addEventListener("click", () => {
  if (mic !== null) {
    stopMic();
  } else if (ws !== null) {
    startMic().catch((error) => note(`microphone: ${error.message}`, "error"));
  } else {
    note("not connected", "error");
  }
});

$("reconnect").addEventListener("click", () => connect());

$("key-form").addEventListener("submit", (submit) => {
  submit.preventDefault();
  const key = $("api-key").value.trim();
  $("api-key").value = "";
  if (key) connect(key);
});

connect();
