// The Feedback page (pages/feedback.py): keys for the answer buttons, ordering responses by dragging, moving or
// typing their numbers, and waiting for sampled responses (the session's event stream says when to reload).
"use strict";

function feedbackWait(root) {
  if (!["loading", "sampling"].includes(root.dataset.state)) return;
  const source = new EventSource(`/feedback/s/${root.dataset.session}/events?version=${root.dataset.version}`);
  source.addEventListener("state", (e) => {
    if (JSON.parse(e.data).version !== Number(root.dataset.version)) { source.close(); location.reload(); }
  });
}

function rankingOrder(list) {
  return [...list.querySelectorAll("li[data-n]")].map((li) => li.dataset.n).join(" ");
}

function feedbackRanking(form) {
  const list = form.querySelector("ol.fb-ranking");
  if (!list) return null;
  const field = form.querySelector("input.fb-order");
  const sync = () => { field.value = rankingOrder(list); };
  let dragged = null;
  list.addEventListener("dragstart", (e) => { dragged = e.target.closest("li"); dragged.classList.add("dragging"); });
  list.addEventListener("dragend", () => { if (dragged) dragged.classList.remove("dragging"); dragged = null; sync(); });
  list.addEventListener("dragover", (e) => {
    e.preventDefault();
    const over = e.target.closest("li");
    if (!dragged || !over || over === dragged) return;
    const box = over.getBoundingClientRect();
    list.insertBefore(dragged, e.clientY > box.top + box.height / 2 ? over.nextSibling : over);
  });
  const move = (li, step) => {
    if (step < 0 && li.previousElementSibling) list.insertBefore(li, li.previousElementSibling);
    if (step > 0 && li.nextElementSibling) list.insertBefore(li.nextElementSibling, li);
    sync();
  };
  list.addEventListener("click", (e) => {
    const button = e.target.closest("button[data-move]");
    if (button) { move(button.closest("li"), Number(button.dataset.move)); button.focus(); }
  });
  list.addEventListener("keydown", (e) => {
    const li = e.target.closest("li");
    if (e.target !== li || !["ArrowUp", "ArrowDown"].includes(e.key)) return;
    e.preventDefault();
    move(li, e.key === "ArrowUp" ? -1 : 1);
    li.focus();
  });
  field.addEventListener("change", () => {  // a typed ranking reorders the cards
    for (const n of field.value.trim().split(/[\s,]+/)) {
      const li = list.querySelector(`li[data-n="${n}"]`);
      if (li) list.appendChild(li);
    }
  });
  let typed = [];
  return (key) => {  // a digit: that response goes next in the order being typed
    const li = list.querySelector(`li[data-n="${key}"]`);
    if (!li) return false;
    typed = typed.filter((n) => n !== key).concat([key]);
    const placed = typed.map((n) => list.querySelector(`li[data-n="${n}"]`));
    placed.forEach((item) => list.insertBefore(item, null));
    [...list.children].filter((item) => !placed.includes(item)).forEach((item) => list.appendChild(item));
    sync();
    return true;
  };
}

function feedbackKeys(form) {
  const typeRank = feedbackRanking(form);
  let sent = false;
  form.addEventListener("submit", (e) => {
    if (sent) { e.preventDefault(); return; }
    sent = true;  // one answer per prompt: a second click or key would answer the next one
  });
  document.addEventListener("keydown", (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey || sent) return;
    if (["INPUT", "TEXTAREA", "SELECT"].includes(e.target.tagName)) return;
    const key = e.key.toLowerCase();
    if (typeRank && /^[0-9]$/.test(key)) { if (typeRank(key)) e.preventDefault(); return; }
    if (typeRank && key === "enter" && e.target.tagName !== "BUTTON") {
      e.preventDefault();
      form.requestSubmit(form.querySelector("button[name=choice][value='']"));
      return;
    }
    const button = form.querySelector(`button[data-key="${CSS.escape(key)}"]`);
    if (button) { e.preventDefault(); form.requestSubmit(button); }
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const root = document.getElementById("labeling");
  if (!root) return;
  feedbackWait(root);
  const form = root.querySelector("form.fb-answer");
  if (form) feedbackKeys(form);
});
