// The Playground page (pages/playground.py): one message goes to every column; each column streams its own
// answer from POST /playground/chat (server-sent events read from fetch) and keeps its own conversation.
"use strict";

function playgroundToken() {
  const meta = document.querySelector("meta[name=csrf-token]");
  return meta ? meta.content : "";
}

function bubble(log, role, text) {
  const div = document.createElement("div");
  div.className = `pg-msg ${role}`;
  div.textContent = text;
  log.appendChild(div);
  log.scrollTop = log.scrollHeight;
  return div;
}

function sseBlocks(buffer, handle) {  // complete "event: X\ndata: Y" blocks out of buffer; returns the rest
  let end;
  while ((end = buffer.indexOf("\n\n")) >= 0) {
    const block = buffer.slice(0, end);
    buffer = buffer.slice(end + 2);
    const name = (block.match(/^event: (.*)$/m) || [])[1];
    const data = (block.match(/^data: (.*)$/m) || [])[1];
    if (name) handle(name, data ? JSON.parse(data) : {});
  }
  return buffer;
}

async function askColumn(column, history, options) {
  const log = column.querySelector(".pg-log");
  const answer = bubble(log, "assistant streaming", "");
  answer.innerHTML = '<span class="pg-wait">writing...</span>';
  let reply = "", pieces = 0, failed = null;
  try {
    const response = await fetch("/playground/chat", {method: "POST", headers: {
      "Content-Type": "application/json", "X-CSRF-Token": playgroundToken()},
      body: JSON.stringify({model: column.dataset.model, messages: history, ...options})});
    if (!response.ok || !response.body) throw new Error(`the studio answered HTTP ${response.status}; reload the page`);
    const reader = response.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer = sseBlocks(buffer + decoder.decode(value, {stream: true}), (name, data) => {
        if (name === "loading" && !reply) answer.innerHTML = '<span class="pg-wait">loading the model...</span>';
        if (name === "text") { reply += data.text; pieces += 1; answer.textContent = reply; }
        if (name === "error") failed = data.message;
        log.scrollTop = log.scrollHeight;
      });
    }
  } catch (err) {
    failed = `No answer: ${err.message}`;
  }
  answer.classList.remove("streaming");
  answer.dataset.pieces = pieces;
  if (failed) { answer.className = "pg-msg error"; answer.setAttribute("role", "alert"); answer.textContent = failed; }
  else if (!reply) answer.innerHTML = '<span class="pg-wait">(an empty answer: the model ended at once)</span>';
  return failed ? null : reply;
}

function playgroundChat(root) {
  const form = root.querySelector("form.pg-send");
  const box = form.querySelector("textarea");
  const note = form.querySelector("[data-note]");
  const columns = [...root.querySelectorAll(".pg-col[data-model]")];
  const histories = new Map(columns.map((c) => [c, []]));
  let busy = false;
  box.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); form.requestSubmit(); }
  });
  form.querySelector("[data-clear]").addEventListener("click", () => {
    if (busy) return;
    columns.forEach((c) => { histories.set(c, []); c.querySelector(".pg-log").replaceChildren(); });
    note.textContent = "";
    box.focus();
  });
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const text = box.value.trim();
    if (!text || busy) return;
    busy = true;
    form.querySelector("button[type=submit]").disabled = true;
    note.textContent = "Writing the answers...";
    box.value = "";
    const options = {max_tokens: Number(form.max_tokens.value), temperature: Number(form.temperature.value)};
    await Promise.all(columns.map(async (column) => {
      const history = histories.get(column).concat([{role: "user", content: text}]);
      bubble(column.querySelector(".pg-log"), "user", text);
      const reply = await askColumn(column, history, options);
      if (reply !== null) histories.set(column, history.concat([{role: "assistant", content: reply}]));
    }));
    busy = false;
    form.querySelector("button[type=submit]").disabled = false;
    note.textContent = "";
    box.focus();
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const root = document.getElementById("playground");
  if (root) playgroundChat(root);
});
