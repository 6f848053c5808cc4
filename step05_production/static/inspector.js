"use strict";
// The flow inspector (as in step 03): draws the flow and, per turn, the phases PocketFlow
// ran with their snapshots. New here: the page reconnects, so the panel asks again on every
// new socket, and the server may have the inspector turned off and say so.
// Everything shown is text (textContent): snapshots hold model output.

function createInspector({ send, button, panel }) {
  const timeline = panel.querySelector(".timeline");
  const note = panel.querySelector(".inspector-note");
  let turn = null;  // the <ol> of the turn being traced

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function describe(frame) {
    const parts = [];
    if (frame.ms !== undefined) parts.push(`${frame.ms} ms`);
    if (frame.chunks !== undefined) parts.push(`${frame.chunks} chunks`);
    if (frame.returned?.stopped) parts.push("stopped");
    if (frame.returned?.error) parts.push(`caught ${frame.returned.error}`);
    if (frame.action !== undefined) parts.push(`action "${frame.action}"`);
    if (frame.sent) parts.push(frame.sent.type === "error" ? `sent error: ${frame.sent.message}` : `sent ${frame.sent.type}`);
    if (frame.history_length !== undefined) parts.push(`history: ${frame.history_length} messages`);
    if (frame.error !== undefined) parts.push(frame.error);
    return parts.join(" · ");
  }

  function snapshotOf(frame) {
    if (frame.phase === "prep" && frame.returned) return frame.returned[0];  // the messages for the model
    if (frame.phase === "post" && frame.history) return frame.history;       // the shared store's history
    if (frame.phase === "exec" && frame.returned !== undefined) return frame.returned;
    return null;
  }

  function newTurn(note = "") {
    turn = element("ol", "turn");
    const item = element("li");
    item.append(element("h3", null, `Turn ${timeline.children.length + 1}${note}`), turn);
    timeline.append(item);
  }

  function handle(frame) {
    if (frame.phase === "flow" && frame.event === "start") newTurn();
    else if (!turn) newTurn(" (the panel opened mid-turn)");  // its first phases were not traced
    if (frame.event === "start") {  // a placeholder while the phase runs (exec: the whole stream)
      if (frame.phase !== "flow") turn.append(element("li", "running", `${frame.phase} running…`));
      return;
    }
    turn.querySelector(".running")?.remove();
    const row = element("li", `phase ${frame.phase} ${frame.event}`);
    row.dataset.phase = frame.phase;
    row.dataset.event = frame.event;
    row.append(element("strong", null, `${frame.phase} ${frame.event === "error" ? "failed" : ""}`.trim()),
               element("span", "facts", ` ${describe(frame)}`));
    const shown = snapshotOf(frame);
    if (shown !== null) {
      const details = element("details");
      details.append(element("summary", null, frame.phase === "post" ? "shared store" : "snapshot"),
                     // Invisible characters as JSON escapes: a reply's direction override must
                     // not reorder the snapshot it is shown in.
                     element("pre", null, ChatRender.escapeInvisible(JSON.stringify(shown, null, 1))));
      row.append(details);
    }
    turn.append(row);
    if (frame.phase === "flow") turn = null;  // this turn is over
    panel.scrollTop = panel.scrollHeight;
  }

  // The server's answer to an inspect frame: on, or off with the reason.
  function answered(frame) {
    note.textContent = frame.message || "";
    note.hidden = !frame.message;
  }

  function isOpen() {
    return !panel.hidden;
  }

  function setOpen(open) {
    panel.hidden = !open;
    if (!open) {  // no more traces: a phase still running will not report its end
      for (const running of panel.querySelectorAll(".running")) running.remove();
      turn = null;
    }
    button.setAttribute("aria-pressed", String(open));
    document.body.classList.toggle("inspecting", open);
    send({ type: "inspect", on: open });
  }

  function clear() {  // a new conversation: its turns start again at 1
    timeline.replaceChildren();
    turn = null;
  }

  button.addEventListener("click", () => setOpen(!isOpen()));
  // A new connection starts with the inspector off: ask again if the panel is open.
  function connected() {
    if (isOpen()) send({ type: "inspect", on: true });
  }
  return { handle, answered, connected, clear };
}
