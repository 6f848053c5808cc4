"use strict";
// The step 05 chat page: one WebSocket, JSON frames (see the README's protocol table).

const $ = (id) => document.getElementById(id);
const log = $("log");
const input = $("input");
const sendButton = $("send");
const stopButton = $("stop");
const statusBadge = $("status");
const notice = $("notice");

// The conversation's id is the only key to it: kept in this browser, sent on every connect.
const CONVERSATION_KEY = "chat.conversation";

let socket = null;
let reconnectAttempts = 0;
let reply = null;        // the assistant message being streamed: { element, body, view, queued }
let everConnected = false;
let everConnectedBefore = false;  // whether this connection is a reconnect
let conversationId = localStorage.getItem(CONVERSATION_KEY);
// The server closes an idle connection with this code when it is full, to let someone else
// in (main.py). Reconnecting at once would take a place back from them, so the page waits
// until its user types or sends.
const RECLAIMED = 4001;
let waitingForUser = false;

// The flow inspector (inspector.js): a side panel of trace frames, off until opened.
const inspector = createInspector({
  send: (frame) => socket && socket.readyState === WebSocket.OPEN && socket.send(JSON.stringify(frame)),
  button: $("inspect"),
  panel: $("inspector"),
});

function setStatus(state) {
  statusBadge.dataset.state = state;
  statusBadge.textContent = state;
}

function showNotice(text) {
  notice.textContent = text;
  notice.hidden = !text;
}

function setStreaming(streaming) {
  sendButton.disabled = streaming;
  stopButton.hidden = !streaming;
  if (streaming) setStatus("streaming");
}

// Auto-scroll follows new text only while the reader is already at the bottom:
// scrolling up to read earlier messages is never fought.
function isAtBottom() {
  return log.scrollHeight - log.scrollTop - log.clientHeight < 40;
}

function addMessage(kind, text = "") {
  const follow = isAtBottom();
  const element = document.createElement("article");
  element.className = `msg ${kind}`;
  const body = document.createElement("div");
  body.className = "body";
  body.replaceChildren(ChatRender.plainText(text));  // user text and errors are always plain text
  element.append(body);
  log.append(element);
  if (follow) log.scrollTop = log.scrollHeight;
  return { element, body };
}

function addMeta(message, text) {
  const meta = document.createElement("div");
  meta.className = "meta";
  meta.textContent = text;
  message.element.append(meta);
}

// Model output is Markdown and untrusted: render.js turns it into safe HTML, one
// finished block at a time, and falls back to plain text if rendering ever fails.
function renderMarkdown(message, final = false) {
  const follow = isAtBottom();
  const followNewText = () => follow && (log.scrollTop = log.scrollHeight);
  if (final) {
    return message.view.finish().then(followNewText);  // a long reply is rendered in a few tasks
  } else {
    message.view.render();
    followNewText();
  }
}

// Chunks can arrive faster than the screen refreshes. Re-render the streaming message
// (only that one, never the whole log) at most once per animation frame, and for at most a
// quarter of the time: a render that took d ms (its layout included) waits 3d before the next.
// A block costly to render again (a table of a thousand cells, lists 15 deep), rendered
// 60 times a second, kept the page busy for the whole reply (review 26).
const RENDER_SHARE = 4;
function scheduleRender(message) {
  if (message.queued) return;
  message.queued = true;
  const wait = (message.renderedAt ?? 0) + (RENDER_SHARE - 1) * (message.renderCost ?? 0) - performance.now();
  setTimeout(() => requestAnimationFrame(() => {
    message.queued = false;
    const start = performance.now();
    renderMarkdown(message);
    message.element.offsetHeight;  // the layout it causes, done now, so that it is counted
    message.renderedAt = performance.now();
    message.renderCost = message.renderedAt - start;
    if (message.view.behind) scheduleRender(message);  // a page that joined mid-reply catches up
  }), Math.max(0, wait));
}

function finishReply(metaText, cut) {
  if (reply && cut && !reply.view.text) {  // cut before its first chunk: nothing to keep
    reply.element.remove();
    reply = null;
  }
  if (reply) {
    renderMarkdown(reply, true);
    reply.element.classList.remove("streaming");
    if (cut) reply.element.classList.add("cut");
    if (metaText) addMeta(reply, metaText);
    reply = null;
  }
  setStreaming(false);
}

function describeStats(stats, stopped, truncated) {
  if (!stats) return stopped ? "stopped" : "";
  const parts = [];
  if (stats.first_chunk_ms !== null) parts.push(`first token ${stats.first_chunk_ms} ms`);
  const streamingMs = stats.duration_ms - (stats.first_chunk_ms || 0);
  const rate = streamingMs > 0 ? (stats.chunks / (streamingMs / 1000)).toFixed(1) : "–";
  parts.push(`${stats.chunks} chunks`, `${rate} chunks/s`);
  if (stopped) parts.push("stopped");
  if (truncated) parts.push("cut at the length limit");
  return parts.join(" · ");
}

// The server's copy of the conversation replaces what the page shows, so a reload, a
// reconnect or another tab all end up showing the same thing. A reply still being
// written comes next, from its start, into a fresh bubble: never a duplicate.
function showConversation(frame) {
  const known = frame.id === conversationId;
  conversationId = frame.id;
  localStorage.setItem(CONVERSATION_KEY, frame.id);
  reply = null;
  log.replaceChildren();
  const stored = [];
  for (const message of frame.messages) {
    if (message.role === "user") {
      addMessage("user", message.content);
    } else {  // stored replies are model output: rendered like a live one, then finished
      const shown = addMessage("assistant");
      shown.view = ChatRender.createMarkdownView(shown.body);
      shown.view.append(message.content);
      shown.view.showText();
      stored.push(shown);
    }
  }
  renderStored(stored);
  const replying = frame.messages.some((message) => message.status === "replying");
  setStreaming(replying);
  if (!replying) setStatus("ready");
  return known;
}

// Stored replies are rendered one per task, in order, each shown as plain text until then:
// the whole history (up to 32,000 characters) in one task froze the page on every reload
// when the replies were costly to render (ten of nested lists: over 1 s).
async function renderStored(replies) {
  for (const shown of replies) {
    await new Promise((resolve) => setTimeout(resolve));  // the next task
    if (!shown.element.isConnected) return;  // a newer copy of the conversation replaced it
    await renderMarkdown(shown, true);
  }
}

function handleFrame(frame) {
  switch (frame.type) {
    case "conversation":
      if (!showConversation(frame) && everConnectedBefore) {
        showNotice("Reconnected. That conversation is no longer stored: this is a new one.");
      }
      break;
    case "start":
      reply = addMessage("assistant streaming");
      reply.view = ChatRender.createMarkdownView(reply.body);
      setStreaming(true);
      break;
    case "chunk":
      if (!reply) return;
      reply.view.append(frame.content);
      scheduleRender(reply);
      break;
    case "end":
      finishReply(describeStats(frame.stats, frame.stopped, frame.truncated), false);
      if (frame.saved === false) addMessage("error", frame.message);  // the store refused the turn
      setStatus("ready");
      break;
    case "error":
      if (frame.refused) {  // about a frame we sent (busy, too fast, invalid): a reply goes on
        addMessage("error", frame.message);
        break;
      }
      finishReply("cut off by an error", true);
      addMessage("error", frame.message);
      setStatus("error");
      break;
    case "reset":  // a new, empty conversation frame follows
      log.replaceChildren();
      inspector.clear();
      setStatus("ready");
      break;
    case "trace":    // only sent while the inspector is open
      inspector.handle(frame);
      break;
    case "inspect":  // the server's answer when the panel opens or closes
      inspector.answered(frame);
      break;
  }
}

function connect() {
  setStatus(everConnected ? "reconnecting" : "connecting");
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const query = conversationId ? `?conversation=${encodeURIComponent(conversationId)}` : "";
  socket = new WebSocket(`${scheme}://${location.host}/ws${query}`);

  socket.onopen = () => {
    everConnectedBefore = everConnected;
    if (everConnected) showNotice("Reconnected.");
    everConnected = true;
    reconnectAttempts = 0;
    inspector.connected();
  };
  socket.onmessage = (event) => handleFrame(JSON.parse(event.data));
  socket.onclose = (event) => {
    finishReply("cut off: the connection was lost", true);
    if (event.code === RECLAIMED) {
      waitingForUser = true;
      showNotice("The chat was full, so your place went to someone else. Type to reconnect.");
      setStatus("paused");
      return;
    }
    // Back off 0.5 s, 1 s, 2 s ... up to 10 s, with jitter so a classroom doesn't reconnect in step.
    const delay = Math.min(10000, 500 * 2 ** reconnectAttempts) * (0.8 + Math.random() * 0.4);
    reconnectAttempts += 1;
    const why = event.reason ? ` (${event.reason})` : "";
    showNotice(`Connection lost${why}. Reconnecting in ${(delay / 1000).toFixed(1)} s…`);
    setStatus(everConnected ? "reconnecting" : "error");
    setTimeout(connect, delay);
  };
}

// After the server reclaimed this page's idle connection: the user is back.
function reconnectForUser() {
  if (!waitingForUser) return;
  waitingForUser = false;
  reconnectAttempts = 0;
  connect();
}

function send() {
  reconnectForUser();  // the text stays in the box until the connection is back
  const text = input.value;
  if (!text.trim() || reply || !socket || socket.readyState !== WebSocket.OPEN) return;
  addMessage("user", text);
  socket.send(JSON.stringify({ type: "message", content: text }));
  input.value = "";
  setStreaming(true);
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  send();
});

input.addEventListener("input", reconnectForUser);

input.addEventListener("keydown", (event) => {
  // Enter sends, Shift+Enter is a new line, and Enter that confirms an IME
  // composition (Japanese, Chinese, Korean input) must not send half a word.
  if (event.key !== "Enter" || event.shiftKey || event.isComposing || event.keyCode === 229) return;
  event.preventDefault();
  send();
});

stopButton.addEventListener("click", () => {
  if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify({ type: "stop" }));
});

$("new-chat").addEventListener("click", () => {
  if (socket && socket.readyState === WebSocket.OPEN) {
    socket.send(JSON.stringify({ type: "reset" }));
  } else {  // offline: forget it here; the server gives a new id on the next connect
    conversationId = null;
    localStorage.removeItem(CONVERSATION_KEY);
    log.replaceChildren();
  }
  reconnectForUser();  // (after the line above: a reclaimed page starts its new chat offline)
  input.focus();
});

connect();
