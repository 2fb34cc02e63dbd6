// The fileflow dashboard: jobs, live status and progress, submit, retry, cancel and links,
// through the same HTTP API as every other client. No build step, nothing from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { jobs: new Map(), order: [], before: null, next: null, live: null };

function apiKey() {
  return localStorage.getItem("fileflow.apiKey") || "";
}

function headers(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function api(method, path, body) {
  const init = { method, headers: headers(body ? { "Content-Type": "application/json" } : {}) };
  if (body) init.body = JSON.stringify(body);
  const response = await fetch(path, init);
  const answer = await response.json().catch(() => null);
  if (!response.ok) {
    const message = answer && answer.error ? answer.error.message : `HTTP ${response.status}`;
    throw new Error(message);
  }
  return answer;
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

function cell(text, className) {
  const td = document.createElement("td");
  if (className) td.className = className;
  td.textContent = text;
  return td;
}

function row(job) {
  const tr = document.createElement("tr");
  tr.dataset.id = job.id;
  tr.append(cell(job.id));
  const status = document.createElement("td");
  const badge = document.createElement("span");
  badge.className = `status ${job.status}`;
  badge.textContent = job.status;
  status.append(badge);
  tr.append(status, cell(`${job.bucket_name}/${job.object_name}`));
  const progress = document.createElement("td");
  if (job.status === "processing" || job.status === "completed") {
    const bar = document.createElement("progress");
    const total = job.bytes_total ?? job.size;
    if (total) { bar.max = total; bar.value = job.status === "completed" ? total : (job.bytes_done || 0); }
    bar.title = `${bytes(job.bytes_done)} of ${bytes(total)}`;
    progress.append(bar);
  }
  tr.append(progress, cell(bytes(job.size ?? job.bytes_total)), cell((job.updated_at || "").replace("T", " ").slice(0, 19)));
  const actions = document.createElement("td");
  if (job.status === "failed") actions.append(button("Retry", () => act(job.id, "retry")));
  if (job.status === "pending" || job.status === "processing") actions.append(button("Cancel", () => act(job.id, "cancel")));
  tr.append(actions);
  tr.addEventListener("click", () => showDetail(job.id));
  return tr;
}

function button(label, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.addEventListener("click", (event) => { event.stopPropagation(); onClick(); });
  return b;
}

function render() {
  const query = $("search").value.trim().toLowerCase();
  const body = $("jobs");
  body.replaceChildren(...state.order
    .map((id) => state.jobs.get(id))
    .filter((job) => !query || `${job.bucket_name}/${job.object_name}`.toLowerCase().includes(query))
    .map(row));
  $("older").disabled = !state.next;
}

async function load() {
  const params = new URLSearchParams({ limit: "50" });
  const status = $("status-filter").value;
  if (status) params.set("status", status);
  if (state.before) params.set("before", state.before);
  try {
    const page = await api("GET", `/api/v1/uploads?${params}`);
    state.jobs = new Map(page.uploads.map((job) => [job.id, job]));
    state.order = page.uploads.map((job) => job.id);
    state.next = page.next_before;
    $("list-error").textContent = "";
  } catch (error) {
    $("list-error").textContent = error.message;
  }
  render();
}

async function act(id, action) {
  try {
    const job = await api("POST", `/api/v1/uploads/${id}/${action}`);
    update(job);
  } catch (error) {
    $("list-error").textContent = `${action} ${id}: ${error.message}`;
  }
}

// A change from the event stream (or a fresh job): update its row, or show a new job on
// the first page.
function update(change) {
  const known = state.jobs.get(change.id);
  if (known) {
    state.jobs.set(change.id, { ...known, ...change });
    render();
    if ($("detail-id").textContent === change.id) showDetail(change.id);
  } else if (!state.before) {
    load();
  }
}

// Live changes: fetch() rather than EventSource, so the API key can go in a header.
async function follow() {
  if (state.live) state.live.abort();
  const controller = new AbortController();
  state.live = controller;
  try {
    const response = await fetch("/api/v1/events", { headers: headers(), signal: controller.signal });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    setLive(true);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let pending = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      pending += decoder.decode(value, { stream: true });
      let end;
      while ((end = pending.indexOf("\n\n")) >= 0) {
        const event = pending.slice(0, end);
        pending = pending.slice(end + 2);
        for (const line of event.split("\n")) {
          if (line.startsWith("data:")) update(JSON.parse(line.slice(5)));
        }
      }
    }
  } catch (error) {
    if (controller.signal.aborted) return;
  }
  setLive(false);
  setTimeout(follow, 2000);
}

function setLive(on) {
  $("live").textContent = on ? "live" : "offline";
  $("live").classList.toggle("off", !on);
}

async function showDetail(id) {
  try {
    const job = await api("GET", `/api/v1/uploads/${id}`);
    $("detail").hidden = false;
    $("detail-id").textContent = job.id;
    const fields = $("detail-fields");
    fields.replaceChildren();
    for (const [name, value] of Object.entries(job)) {
      if (value === null || name === "download_url") continue;
      const dt = document.createElement("dt");
      dt.textContent = name;
      const dd = document.createElement("dd");
      dd.textContent = typeof value === "object" ? JSON.stringify(value) : String(value);
      if (name === "last_error") dd.className = "error";
      fields.append(dt, dd);
    }
    $("link-box").hidden = job.status !== "completed";
    if (job.status === "completed") {
      const link = await api("GET", `/api/v1/uploads/${id}/url`);
      $("download-link").value = link.url;
      $("open-link").href = link.url;
    }
  } catch (error) {
    $("list-error").textContent = `job ${id}: ${error.message}`;
  }
}

// Batches: the newest 20, looked at every 2 s (one row each; their counts are kept by the
// server as their jobs change).
function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 60) return `${seconds}s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)}m${String(seconds % 60).padStart(2, "0")}s`;
  return `${Math.floor(seconds / 3600)}h${String(Math.floor(seconds / 60) % 60).padStart(2, "0")}m`;
}

function batchRow(batch) {
  const tr = document.createElement("tr");
  tr.dataset.batch = batch.id;
  const c = batch.counts;
  const ended = c.completed + c.failed + c.cancelled;
  const status = document.createElement("td");
  const badge = document.createElement("span");
  badge.className = `status ${batch.status}`;
  badge.textContent = batch.status;
  status.append(badge);
  const progress = document.createElement("td");
  const bar = document.createElement("progress");
  bar.max = Math.max(batch.total, 1);
  bar.value = ended;
  bar.title = `${ended} of ${batch.total} rows ended`;
  progress.append(bar);
  tr.append(cell(batch.id), status, progress, cell(String(c.completed)), cell(String(c.failed)),
    cell(String(c.invalid)), cell(bytes(batch.bytes_done)), cell(`${batch.rate}/s`), cell(duration(batch.eta_seconds)));
  const actions = document.createElement("td");
  const open = batch.status === "reading" || batch.status === "running" || batch.status === "paused";
  if (batch.status === "paused") actions.append(button("Resume", () => steer(batch.id, "resume")));
  else if (open) actions.append(button("Pause", () => steer(batch.id, "pause")));
  if (open) actions.append(button("Cancel", () => steer(batch.id, "cancel")));
  tr.append(actions);
  return tr;
}

async function loadBatches() {
  try {
    const page = await api("GET", "/api/v1/batches?limit=20");
    $("batches").replaceChildren(...page.batches.map(batchRow));
    $("batch-error").textContent = "";
  } catch (error) {
    $("batch-error").textContent = error.message;
  }
}

async function steer(id, action) {
  try {
    await api("POST", `/api/v1/batches/${id}/${action}`);
  } catch (error) {
    $("batch-error").textContent = `${action} batch ${id}: ${error.message}`;
  }
  loadBatches();
}

$("submit").addEventListener("submit", async (event) => {
  event.preventDefault();
  const body = { file_url: $("file-url").value, bucket_name: $("bucket").value, object_name: $("key").value };
  try {
    const answer = await api("POST", "/api/v1/upload", body);
    $("submit-result").textContent = `Job ${answer.id} accepted.`;
    $("submit-result").className = "message";
    state.before = null;
    await load();
  } catch (error) {
    $("submit-result").textContent = error.message;
    $("submit-result").className = "message error";
  }
});
$("api-key").value = apiKey();
$("api-key").addEventListener("change", () => {
  localStorage.setItem("fileflow.apiKey", $("api-key").value.trim());
  load();
  follow();
  loadBatches();
});
$("status-filter").addEventListener("change", () => { state.before = null; load(); });
$("search").addEventListener("input", render);
$("newest").addEventListener("click", () => { state.before = null; load(); });
$("older").addEventListener("click", () => { state.before = state.next; load(); });
$("close-detail").addEventListener("click", () => { $("detail").hidden = true; $("detail-id").textContent = ""; });
$("copy-link").addEventListener("click", () => navigator.clipboard.writeText($("download-link").value));

load();
follow();
loadBatches();
setInterval(loadBatches, 2000);
