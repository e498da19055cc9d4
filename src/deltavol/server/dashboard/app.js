// The deltavol dashboard: the control API's JSON, followed live through /v1/events.
// Plain browser JavaScript, no build step. Over TCP the API wants a bearer token: the page
// asks for it once and keeps it in sessionStorage (this tab only).
"use strict";

const CELLS = 1024;          // heat map cells per bitmap (64 x 16)
const COLS = 64;
const BITMAP_EVERY = 2000;   // ms between two heat map refreshes (writes publish no events)
const state = { token: sessionStorage.getItem("deltavol.token"), sessions: {}, source: null, timer: null };

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (state.token) h.Authorization = "Bearer " + state.token;
  return h;
}

async function api(method, path, body) {
  const init = { method, headers: headers(body ? { "Content-Type": "application/json" } : {}) };
  if (body) init.body = JSON.stringify(body);
  const resp = await fetch(path, init);
  const data = await resp.json().catch(() => null);
  if (resp.status === 401) { askToken(); throw new Error("the API token is missing or wrong"); }
  if (!resp.ok) throw new Error((data && data.error && data.error.message) || ("HTTP " + resp.status));
  return data;
}

function say(text) { document.getElementById("message").textContent = text || ""; }

function size(n) {
  if (n === null || n === undefined) return "-";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : String(Math.round(n))) + " " + units[i];
}

function duration(s) {
  if (s === null || s === undefined) return "-";
  s = Math.max(0, Math.round(s));
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m " + (s % 60) + "s";
  return Math.floor(s / 3600) + "h " + Math.floor((s % 3600) / 60) + "m";
}

function when(iso) { return iso ? new Date(iso).toLocaleString() : "-"; }

function askToken() {
  document.getElementById("login").hidden = false;
  document.getElementById("main").hidden = true;
  if (state.source) { state.source.close(); state.source = null; }
}

// --- sessions ------------------------------------------------------------------------------
function card(name) {
  let el = document.querySelector(`article.session[data-name="${CSS.escape(name)}"]`);
  if (el) return el;
  el = document.getElementById("session-card").content.firstElementChild.cloneNode(true);
  el.dataset.name = name;
  el.querySelector(".name").textContent = name;
  for (const b of el.querySelectorAll("button[data-action]")) {
    const action = b.dataset.action;
    b.addEventListener("click", () => (CONFIRM[action] ? ask(el, name, action) : act(name, action)));
  }
  el.querySelector(".confirm .no").addEventListener("click", () => { el.querySelector(".confirm").hidden = true; });
  el.querySelector(".confirm .yes").addEventListener("click", () => {
    el.querySelector(".confirm").hidden = true;
    act(name, el.querySelector(".confirm").dataset.action);
  });
  const list = document.getElementById("sessions");
  list.querySelector(".empty")?.remove();
  list.appendChild(el);
  return el;
}

// Actions that overwrite a volume or change a session's direction are asked twice: the
// question says what will be overwritten, in the session's own names.
const CONFIRM = {
  restore: (s) => [`Restore overwrites ${s.source} with the copy's point in time (${when(s.point_in_time)}): ` +
                   `what changed on ${s.source} since is lost, and it refuses writes until the restore ends.` +
                   (s.state === "idle" ? "" : " An update under way is cancelled first if it has not written to the target yet."),
                   `Restore ${s.source}`],
  reverse: (s) => [`Reverse makes ${s.target} the writable source and ${s.source} its target: ` +
                   `${s.source} is overwritten by the next update.`, `Reverse ${s.name}`],
};

function ask(el, name, action) {
  const s = state.sessions[name];
  if (!s) return;
  const [question, yes] = CONFIRM[action](s);
  const box = el.querySelector(".confirm");
  box.dataset.action = action;
  box.querySelector(".question").textContent = question;
  box.querySelector(".yes").textContent = yes;
  box.hidden = false;
}

async function act(name, action) {
  try {
    const s = await api("POST", `/v1/sessions/${encodeURIComponent(name)}/${action}`, action === "update" ? {} : undefined);
    say(`${name}: ${action} done, ${s.state}` + (s.notice ? `: ${s.notice}` : ""));
    showSession(s);
  } catch (e) { say(`${name}: ${action} refused: ${e.message}`); }
}

function showSession(s) {
  state.sessions[s.name] = s;
  const el = card(s.name);
  const st = el.querySelector(".state");
  st.textContent = s.state;
  st.className = "state pill " + s.state;
  el.dataset.state = s.state;
  el.querySelector(".consistent").textContent = s.consistent ? "consistent" : "not consistent";
  el.querySelector(".route").textContent = `${s.source} \u2192 ${s.target}, chunks of ${size(s.granularity)}`;
  const u = s.update;
  const updating = s.state === "copying" || s.state === "paused" || s.state === "failed";
  const running = updating || s.state === "restoring";
  const moving = s.state === "copying" || s.state === "restoring";
  progress(el, running && u ? u.bytes_done : 0, running && u ? u.bytes_total : 0, running);
  el.querySelector(".rate").textContent = u && moving ? size(u.rate) + "/s" : "-";
  el.querySelector(".eta").textContent = u && moving ? duration(u.eta) : "-";
  el.querySelector(".pit").textContent = when(s.point_in_time);
  el.querySelector(".tracked").textContent = size(s.tracked_bytes);
  el.querySelector(".success").textContent = when(s.last_success_at);
  el.querySelector(".failure").textContent = when(s.last_failure_at);
  el.querySelector(".error").textContent = s.last_error ? "last error: " + s.last_error : "";
  s._rpo_base = s.rpo_seconds === null ? null : { rpo: s.rpo_seconds, at: Date.now() };
  tickRpo(el, s);
  // restore and reverse stay clickable where the server may refuse: it says why
  const can = { update: !moving, pause: s.state === "copying",
                resume: s.state === "paused" || s.state === "failed", cancel: updating,
                restore: s.point_in_time !== null && s.state !== "restoring" && s.state !== "new",
                reverse: s.state === "idle" };
  for (const b of el.querySelectorAll("button[data-action]")) b.disabled = !can[b.dataset.action];
}

function progress(el, done, total, running) {
  const pct = total > 0 ? 100 * done / total : (running ? 0 : 100);
  const restoring = el.dataset.state === "restoring";
  el.querySelector(".progress").classList.toggle("restoring", restoring);
  el.querySelector(".bar").style.width = pct.toFixed(1) + "%";
  el.dataset.done = String(done);
  const what = restoring ? "restoring: " : "";
  el.querySelector(".label").textContent = running ? `${what}${pct.toFixed(1)}%  ${size(done)} of ${size(total)}` : "no update running";
}

function tickRpo(el, s) {
  const base = s._rpo_base;
  el.querySelector(".rpo").textContent = base ? duration(base.rpo + (Date.now() - base.at) / 1000) : "-";
}

async function loadSessions() {
  const list = await api("GET", "/v1/sessions");
  const names = new Set(list.map((s) => s.name));
  for (const el of document.querySelectorAll("article.session")) {
    if (!names.has(el.dataset.name)) { el.remove(); delete state.sessions[el.dataset.name]; }
  }
  list.forEach(showSession);
  if (!list.length && !document.querySelector("#sessions .empty")) {
    document.getElementById("sessions").innerHTML = '<p class="empty">no sessions</p>';
  }
}

// --- heat maps -----------------------------------------------------------------------------
function draw(canvas, cells, hue) {
  const ctx = canvas.getContext("2d");
  const rows = Math.ceil(CELLS / COLS);
  const w = canvas.width / COLS, h = canvas.height / rows;
  ctx.fillStyle = "#ffffff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  let set = 0;
  for (let i = 0; i < CELLS; i++) {
    const f = cells && i < cells.length ? cells[i] : 0;
    const x = (i % COLS) * w, y = Math.floor(i / COLS) * h;
    if (cells && i >= cells.length) continue;  // past the end of the volume
    if (f > 0) set++;
    ctx.fillStyle = f > 0 ? `hsl(${hue}, 80%, ${Math.round(70 - 40 * f)}%)` : "#e9ecf1";
    ctx.fillRect(x + 0.5, y + 0.5, w - 1, h - 1);
  }
  canvas.dataset.cellsSet = String(set);
}

async function loadBitmaps(name) {
  const el = card(name);
  try {
    const b = await api("GET", `/v1/sessions/${encodeURIComponent(name)}/bitmaps?cells=${CELLS}`);
    draw(el.querySelector("canvas.tracking"), b.tracking, 28);
    draw(el.querySelector("canvas.transfer"), b.transfer, 215);
    el.dataset.chunksPerCell = String(b.chunks_per_cell);
  } catch (e) { /* removed meanwhile: the next session list drops it */ }
}

function loadAllBitmaps() { return Promise.all(Object.keys(state.sessions).map(loadBitmaps)); }

// --- volumes ------------------------------------------------------------------------------
async function loadVolumes() {
  const vols = await api("GET", "/v1/volumes");
  const body = document.querySelector("#volumes tbody");
  body.replaceChildren(...vols.map((v) => {
    const tr = document.createElement("tr");
    for (const text of [v.name, size(v.size), size(v.allocated), String(v.connections), size(v.written_bytes), v.read_only ? "yes" : "no"]) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.appendChild(td);
    }
    return tr;
  }));
}

// --- the event stream ---------------------------------------------------------------------
let pending = null;
function refreshSoon() {
  if (pending) return;
  pending = setTimeout(async () => {
    pending = null;
    try { await loadSessions(); await loadAllBitmaps(); await loadVolumes(); } catch (e) { say(e.message); }
  }, 150);
}

function follow() {
  const url = "/v1/events" + (state.token ? "?token=" + encodeURIComponent(state.token) : "");
  const source = new EventSource(url);
  state.source = source;
  const conn = document.getElementById("conn");
  source.onopen = () => { conn.textContent = "live"; conn.className = "pill on"; refreshSoon(); };
  source.onerror = () => { conn.textContent = "reconnecting"; conn.className = "pill off"; };
  for (const kind of ["session.created", "session.removed", "session.state", "update.marked",
                      "update.finished", "update.failed", "update.retry", "update.cancelled",
                      "restore.started", "restore.finished", "restore.failed", "session.reversed", "gap"]) {
    source.addEventListener(kind, refreshSoon);
  }
  for (const kind of ["volume.created", "volume.removed"]) {
    source.addEventListener(kind, () => loadVolumes().catch((e) => say(e.message)));
  }
  source.addEventListener("update.cancelled", (msg) => {
    const d = JSON.parse(msg.data);
    if (d.message) say(`${d.name}: ${d.message}`);
  });
  source.addEventListener("restore.failed", (msg) => {
    const d = JSON.parse(msg.data);
    say(`${d.name}: restore failed: ${d.error}`);
  });
  source.addEventListener("update.progress", (msg) => {
    const d = JSON.parse(msg.data);
    const el = document.querySelector(`article.session[data-name="${CSS.escape(d.name)}"]`);
    if (el) progress(el, d.bytes_done, d.bytes_total, true);
    refreshSoon();
  });
}

async function start() {
  try {
    const config = await (await fetch("/dashboard/config.json")).json();
    if (config.token_required && !state.token) { askToken(); return; }
    await loadVolumes();
  } catch (e) {
    say(e.message);
    return;
  }
  document.getElementById("login").hidden = true;
  document.getElementById("main").hidden = false;
  await loadSessions();
  await loadAllBitmaps();
  follow();
  state.timer = setInterval(() => {
    for (const el of document.querySelectorAll("article.session")) {
      const s = state.sessions[el.dataset.name];
      if (s) tickRpo(el, s);
    }
    loadAllBitmaps();
  }, BITMAP_EVERY);
  setInterval(() => loadVolumes().catch(() => {}), 5000);
}

document.getElementById("login").addEventListener("submit", (ev) => {
  ev.preventDefault();
  state.token = document.getElementById("token").value.trim();
  sessionStorage.setItem("deltavol.token", state.token);
  say("");
  start();
});

start();
