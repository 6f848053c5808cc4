"use strict";
// The step 04 chat page: one WebSocket, JSON frames (see the README's protocol table).
// Model output is untrusted: it only ever becomes text (textContent, text nodes), never HTML.

const $ = (id) => document.getElementById(id);
const log = $("log");
const input = $("input");
const sendButton = $("send");
const stopButton = $("stop");
const statusBadge = $("status");
const notice = $("notice");

let socket = null;
let reply = null;  // the assistant message being streamed: { element, body }
let everConnected = false;
let reconnectAttempts = 0;

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
  setStatus(streaming ? "streaming" : "ready");
}

// Follow new text only while the reader is at the bottom: scrolling up is never fought.
function isAtBottom() {
  return log.scrollHeight - log.scrollTop - log.clientHeight < 40;
}

function addMessage(kind, text = "") {
  const follow = isAtBottom();
  const element = document.createElement("article");
  element.className = `msg ${kind}`;
  const body = document.createElement("div");
  body.className = "body";
  body.textContent = text;
  element.append(body);
  log.append(element);
  if (follow) log.scrollTop = log.scrollHeight;
  return { element, body };
}

function describeStats(stats, stopped) {
  const parts = [];
  if (stats.first_chunk_ms !== null) parts.push(`first token ${stats.first_chunk_ms} ms`);
  parts.push(`${stats.chunks} chunks`, `${(stats.duration_ms / 1000).toFixed(1)} s`);
  if (stopped) parts.push("stopped");
  return parts.join(" · ");
}

function finishReply(metaText, cut) {
  if (!reply) return;
  reply.element.classList.remove("streaming");
  if (cut && !reply.body.textContent) {
    reply.element.remove();  // cut before its first chunk: nothing to keep
  } else {
    if (cut) reply.element.classList.add("cut");
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.textContent = metaText;
    reply.element.append(meta);
  }
  reply = null;
}

function handleFrame(frame) {
  switch (frame.type) {
    case "start":
      reply = addMessage("assistant streaming");
      setStreaming(true);
      break;
    case "chunk": {
      if (!reply) return;
      const follow = isAtBottom();
      reply.body.append(frame.content);  // a text node: cheap, and never parsed as HTML
      if (follow) log.scrollTop = log.scrollHeight;
      break;
    }
    case "end":
      finishReply(describeStats(frame.stats, frame.stopped), false);
      setStreaming(false);
      break;
    case "error":
      addMessage("error", frame.message);
      if (frame.refused) break;  // about a frame we sent (busy, invalid): a reply goes on
      finishReply("cut off by an error", true);
      setStreaming(false);
      break;
    case "reset":
      log.replaceChildren();
      setStreaming(false);
      break;
  }
}

function connect() {
  setStatus(everConnected ? "reconnecting" : "connecting");
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  socket = new WebSocket(`${scheme}://${location.host}/ws`);

  socket.onopen = () => {
    if (everConnected) {
      // The server keeps a conversation only as long as its connection (step 05 stores them).
      log.replaceChildren();
      showNotice("Reconnected. The server does not keep conversations across connections: this is a new chat.");
    }
    everConnected = true;
    reconnectAttempts = 0;
    setStreaming(false);
  };
  socket.onmessage = (event) => handleFrame(JSON.parse(event.data));
  socket.onclose = () => {
    finishReply("cut off: the connection was lost", true);
    // Back off 0.5 s, 1 s, 2 s ... up to 10 s, with jitter so a classroom doesn't reconnect in step.
    const delay = Math.min(10000, 500 * 2 ** reconnectAttempts) * (0.8 + Math.random() * 0.4);
    reconnectAttempts += 1;
    showNotice(`Connection lost. Reconnecting in ${(delay / 1000).toFixed(1)} s…`);
    setStatus(everConnected ? "reconnecting" : "error");
    sendButton.disabled = false;
    stopButton.hidden = true;
    setTimeout(connect, delay);
  };
}

function send() {
  const text = input.value;
  // Disabled from Send until the reply ends: one reply at a time (the server refuses more).
  if (!text.trim() || sendButton.disabled || !socket || socket.readyState !== WebSocket.OPEN) return;
  addMessage("user", text);
  socket.send(JSON.stringify({ type: "message", content: text }));
  input.value = "";
  setStreaming(true);
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  send();
});

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
  if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify({ type: "reset" }));
  else log.replaceChildren();  // offline: the next connection is a new chat anyway
  input.focus();
});

connect();
