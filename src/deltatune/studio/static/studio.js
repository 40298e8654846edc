// deltatune studio: the little the pages need beyond HTML. Live views listen to server-sent events and
// re-fetch the server-rendered parts that changed; nothing here draws or fetches from anywhere else.
"use strict";

function csrfToken() {
  const meta = document.querySelector("meta[name=csrf-token]");
  return meta ? meta.content : "";
}

async function refreshPart(base, name) {
  const target = document.querySelector(`[data-part="${name}"]`);
  if (!target) return;
  const response = await fetch(`${base}/part/${name}`, {headers: {"Accept": "text/html"}});
  if (response.ok) target.innerHTML = await response.text();
}

function watchRunsTable() {
  const form = document.getElementById("runs-form");
  if (!form) return;
  const ids = [...document.querySelectorAll("[data-live]")].map((el) => el.dataset.run);
  const params = new URLSearchParams({ids: ids.join(","), newest: form.dataset.newest || ""});
  const source = new EventSource(`/events/runs?${params}`);
  source.addEventListener("status", (e) => {
    const data = JSON.parse(e.data);
    const cell = document.querySelector(`[data-run="${data.id}"]`);
    if (cell) { cell.innerHTML = data.html; cell.removeAttribute("data-live"); }
  });
  source.addEventListener("newer", (e) => {
    const note = form.querySelector(".live-note");
    const count = JSON.parse(e.data).count;
    note.innerHTML = `${count} new run${count === 1 ? "" : "s"} recorded since this page was loaded: ` +
      `<a href="${location.pathname}${location.search}">reload the list</a>`;
    note.hidden = false;
  });
}

function watchRun() {
  const live = document.getElementById("run-live");
  if (!live) return;
  const base = `/runs/${live.dataset.run}`;
  let pending = null;
  const curvesSoon = () => {
    if (pending) return;
    pending = setTimeout(() => { pending = null; refreshPart(base, "curves"); }, 1000);
  };
  const source = new EventSource(`${base}/events?offset=${live.dataset.offset}&shown=${live.dataset.status}`);
  source.addEventListener("log", (e) => {
    live.dataset.offset = JSON.parse(e.data).offset;
    curvesSoon();
  });
  source.addEventListener("status", (e) => {
    const status = JSON.parse(e.data).status;
    if (live.dataset.status === "running" && status === "completed") { location.reload(); return; }
    live.dataset.status = status;
    refreshPart(base, "status");
    refreshPart(base, "actions");
  });
  source.addEventListener("jobs", () => { refreshPart(base, "actions"); refreshPart(base, "samples"); });
  source.addEventListener("end", () => { source.close(); refreshPart(base, "curves"); });
}

function uploads() {
  const form = document.getElementById("upload");
  if (!form) return;
  const note = form.querySelector("[data-upload-note]");
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const file = form.querySelector("input[type=file]").files[0];
    if (!file) { note.textContent = "Choose a file first."; return; }
    if (file.size > Number(form.dataset.limit)) { note.textContent = "The file is larger than the upload limit."; return; }
    note.textContent = "Uploading...";
    const response = await fetch("/data/upload", {method: "POST", body: file, headers: {
      "X-CSRF-Token": csrfToken(), "X-Filename": file.name, "Content-Type": "application/octet-stream"}});
    const data = await response.json().catch(() => ({error: `the upload failed (HTTP ${response.status})`}));
    if (response.ok) location.href = data.url; else note.textContent = data.error;
  });
}

function submitOnChange() {
  for (const el of document.querySelectorAll("[data-submit-on-change]")) {
    el.addEventListener("change", () => {
      const report = el.form.querySelector("input[name=report]");
      if (report) report.remove();
      el.form.submit();
    });
  }
}

document.addEventListener("DOMContentLoaded", () => {
  watchRunsTable();
  watchRun();
  uploads();
  submitOnChange();
});

// New run: the parts of the form that belong to one method or task (data-when: the select that chooses it)
// follow that select; a run this studio started gets a Cancel button on its page while it trains.
function switchParts() {
  const parts = [...document.querySelectorAll("[data-when]")];
  const selectFor = (part) => document.querySelector(`select[name="${part.dataset.when}"]`);
  const update = () => {
    for (const part of parts) {
      const select = selectFor(part);
      if (select) part.hidden = select.value !== part.dataset.whenValue;
    }
  };
  for (const select of new Set(parts.map(selectFor))) {
    if (select) select.addEventListener("change", update);
  }
}

function cancelButton() {
  const live = document.getElementById("run-live");
  const status = document.querySelector("[data-part=status]");
  if (!live || !status) return;
  const box = document.createElement("div");
  box.className = "nr-cancel";
  status.after(box);
  const update = async () => {
    if (live.dataset.status !== "running") { box.innerHTML = ""; return; }
    const response = await fetch(`/runs/${live.dataset.run}/cancel-form`);
    if (response.ok && live.dataset.status === "running") box.innerHTML = await response.text();
  };
  new MutationObserver(update).observe(live, {attributes: true, attributeFilter: ["data-status"]});
  update();
}

document.addEventListener("DOMContentLoaded", () => {
  switchParts();
  cancelButton();
});
