// The iot-ota web console: firmware, batches (live), devices. Plain
// JavaScript on the platform's JSON API; no framework, no build step, and
// nothing fetched from anywhere but the platform itself.
"use strict";

const view = document.getElementById("view");

// ---- helpers

/** An element with attributes (on* are listeners) and children (strings are text). */
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k === "text") e.textContent = v;
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

/** Replaces the page's content (arrays are flattened, null left out). */
function show(...nodes) {
  view.replaceChildren(...nodes.flat().filter((n) => n !== null && n !== undefined));
}

function token() {
  return sessionStorage.getItem("iot-ota-token");
}

function showError(message) {
  const box = document.getElementById("error");
  box.textContent = message;
  box.hidden = !message;
}

/** Calls the API; throws an Error carrying the platform's message. */
async function api(method, path, body) {
  const headers = {};
  if (token()) headers["Authorization"] = "Bearer " + token();
  let payload;
  if (body instanceof Blob) {
    payload = body;
    headers["Content-Type"] = "application/octet-stream";
  } else if (body !== undefined) {
    payload = JSON.stringify(body);
    headers["Content-Type"] = "application/json";
  }
  const resp = await fetch(path, { method, headers, body: payload });
  const text = await resp.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch (_) { /* not JSON */ }
  if (!resp.ok) {
    const why = json && json.error ? json.error : resp.status + " " + resp.statusText;
    if (resp.status === 401) sessionStorage.removeItem("iot-ota-token");
    throw new Error(why);
  }
  return json;
}

/** Runs an action; shows its error instead of throwing. */
async function act(fn) {
  showError("");
  try {
    await fn();
  } catch (e) {
    showError(e.message);
  }
  renderLogin();
}

function bytes(n) {
  if (n >= 1048576) return (n / 1048576).toFixed(1) + " MiB (" + n.toLocaleString("en") + " bytes)";
  if (n >= 1024) return (n / 1024).toFixed(1) + " KiB (" + n.toLocaleString("en") + " bytes)";
  return n + " bytes";
}

function ago(ms) {
  if (!ms) return "";
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return s + " s ago";
  if (s < 3600) return Math.round(s / 60) + " min ago";
  return new Date(ms).toLocaleString();
}

function percent(r) {
  return r.state === "success" ? 100 : Math.min(100, r.progress || 0);
}

function bar(pct) {
  return el("span", { class: "bar", title: pct + "%" }, el("span", { style: "width:" + pct + "%" }));
}

function loggedIn() {
  return !!token();
}

function needLogin() {
  return el("p", { class: "muted" }, "Log in with the platform's API token to change anything: ",
    el("a", { href: "#/login" }, "log in"), ".");
}

// ---- login

function renderLogin() {
  const s = document.getElementById("login-state");
  s.replaceChildren(loggedIn()
    ? el("span", {}, "logged in ", el("button", { id: "logout", onclick: () => {
        sessionStorage.removeItem("iot-ota-token"); route();
      } }, "log out"))
    : el("a", { href: "#/login", style: "color:#fff" }, "log in"));
}

function loginPage() {
  const input = el("input", { type: "password", id: "token", size: 70, autocomplete: "off" });
  const form = el("form", { class: "card", id: "login-form", onsubmit: (ev) => {
    ev.preventDefault();
    act(async () => {
      sessionStorage.setItem("iot-ota-token", input.value.trim());
      await api("POST", "/api/login");
      location.hash = "#/batches";
    });
  } },
    el("p", {}, "The platform's API token: printed at its first start, kept in DATA_DIR/api-token."),
    el("label", {}, "API token", input), " ", el("button", { type: "submit" }, "Log in"));
  show(el("h2", {}, "Log in"), form);
  input.focus();
}

// ---- firmware

async function firmwarePage() {
  const [list, batches] = await Promise.all([api("GET", "/api/firmware"), api("GET", "/api/batches")]);
  const inUse = new Map();
  for (const b of batches.filter((b) => b.state === "in_progress")) {
    inUse.set(b.product + "/" + b.firmware_version, b.id);
  }
  const products = [...new Set(list.map((f) => f.product))].sort();
  const sections = products.map((p) => el("div", {},
    el("h3", {}, p),
    el("table", { class: "firmware" },
      el("tr", {}, ["Version", "File", "Size", "MD5", "SHA-256", "Signed", "Added", ""].map((h) => el("th", {}, h))),
      list.filter((f) => f.product === p).map((f) => {
        const used = inUse.get(f.product + "/" + f.version);
        return el("tr", { "data-version": f.version },
          el("td", {}, f.version),
          el("td", {}, el("a", { href: f.url }, f.name)),
          el("td", {}, bytes(f.size)),
          el("td", { class: "mono" }, f.md5),
          el("td", { class: "mono" }, f.sha256),
          el("td", {}, f.key_ids.length ? "yes, counter " + (f.counter || 0) : "no"),
          el("td", {}, ago(f.created_ms)),
          el("td", {}, used
            ? el("a", { href: "#/batch/" + used }, "in use by batch " + used)
            : (loggedIn() ? el("button", { class: "delete", onclick: () => act(async () => {
                if (!confirm("Delete " + f.product + " " + f.version + "?")) return;
                await api("DELETE", "/api/firmware/" + encodeURIComponent(f.product) + "/" + encodeURIComponent(f.version));
                await firmwarePage();
              }) }, "delete") : "")));
      }))));
  const result = el("div", { id: "upload-result" });
  const form = el("form", { class: "card", id: "upload-form", onsubmit: (ev) => {
    ev.preventDefault();
    const fd = new FormData(form);
    const file = form.querySelector("input[type=file]").files[0];
    act(async () => {
      if (!file) throw new Error("choose a firmware file");
      let path = "/api/firmware?product=" + encodeURIComponent(fd.get("product")) +
        "&version=" + encodeURIComponent(fd.get("version")) + "&name=" + encodeURIComponent(file.name);
      if (fd.get("counter")) path += "&counter=" + encodeURIComponent(fd.get("counter"));
      result.textContent = "uploading " + bytes(file.size) + "...";
      const f = await api("POST", path, file);
      await firmwarePage();
      document.getElementById("upload-result").replaceChildren(
        el("p", {}, "Added " + f.product + " " + f.version + ": " + bytes(f.size) + ", MD5 ",
          el("span", { class: "mono" }, f.md5), ", SHA-256 ", el("span", { class: "mono" }, f.sha256),
          f.key_ids.length ? ", signed" : ", not signed"));
    });
  } },
    el("label", {}, "Product", el("input", { name: "product", required: true, size: 16 })),
    el("label", {}, "Version", el("input", { name: "version", required: true, size: 10 })),
    el("label", {}, "File", el("input", { type: "file", name: "file", required: true })),
    el("label", {}, "Security counter", el("input", { name: "counter", type: "number", min: 0, size: 6 })),
    el("button", { type: "submit" }, "Upload"));
  show(el("h2", {}, "Firmware"),
    loggedIn() ? form : needLogin(), result,
    sections.length ? sections : el("p", { class: "muted" }, "No firmware yet."));
}

// ---- batches

function batchState(b) {
  return b.paused ? "paused" : b.state.replace("_", " ");
}

async function batchesPage() {
  const [batches, firmware] = await Promise.all([api("GET", "/api/batches"), api("GET", "/api/firmware")]);
  const opt = (v, label) => el("option", { value: v }, label || v);
  const form = el("form", { class: "card", id: "batch-form", onsubmit: (ev) => {
    ev.preventDefault();
    const fd = new FormData(form);
    const num = (k) => (fd.get(k) === "" ? undefined : Number(fd.get(k)));
    const [product, version] = fd.get("firmware").split("\u0000");
    const list = String(fd.get("devices") || "").split(",").map((s) => s.trim()).filter(Boolean);
    const groups = String(fd.get("groups") || "").split(",").map((s) => s.trim()).filter(Boolean);
    const req = {
      product, firmware_version: version,
      devices: list.length ? list : undefined,
      policy: fd.get("policy"),
      sign_method: fd.get("sign_method"),
      validity_days: num("validity_days"),
      timeout_minutes: num("timeout_minutes"),
      retries: num("retries"),
      retry_interval_minutes: num("retry_interval_minutes"),
      groups: groups.length ? groups : undefined,
      success_threshold: num("success_threshold"),
      error_threshold: fd.get("error_threshold") || undefined,
      push_rate: num("push_rate"),
    };
    act(async () => {
      const created = await api("POST", "/api/batches", req);
      location.hash = "#/batch/" + created.batch.id;
    });
  } },
    el("div", {},
      el("label", {}, "Firmware", el("select", { name: "firmware", required: true },
        firmware.map((f) => opt(f.product + "\u0000" + f.version, f.product + " " + f.version)))),
      el("label", {}, "Devices", el("input", { name: "devices", size: 40, placeholder: "all eligible, or d1,d2,..." })),
      el("label", {}, "Policy", el("select", { name: "policy" }, opt("standard"), opt("silent"))),
      el("label", {}, "Digest", el("select", { name: "sign_method" }, opt("md5"), opt("sha256")))),
    el("div", {},
      el("label", {}, "Validity (days, 1-7)", el("input", { name: "validity_days", type: "number", min: 1, max: 7, value: 7 })),
      el("label", {}, "Timeout (min, 1-1440)", el("input", { name: "timeout_minutes", type: "number", min: 1, max: 1440, value: 60 })),
      el("label", {}, "Retries (0-5)", el("input", { name: "retries", type: "number", min: 0, max: 5, value: 0 })),
      el("label", {}, "Retry interval (min)", el("input", { name: "retry_interval_minutes", type: "number", min: 1, max: 4320, value: 10 }))),
    el("div", {},
      el("label", {}, "Groups", el("input", { name: "groups", size: 14, placeholder: "e.g. 10,25%" })),
      el("label", {}, "Next group at (% success)", el("input", { name: "success_threshold", type: "number", min: 1, max: 100 })),
      el("label", {}, "Pause at (failures)", el("input", { name: "error_threshold", size: 6, placeholder: "5 or 10%" })),
      el("label", {}, "Push rate (/min)", el("input", { name: "push_rate", type: "number", min: 1 }))),
    el("button", { type: "submit" }, "Start batch"));
  const table = el("table", { id: "batches" },
    el("tr", {}, ["Id", "Product", "Version", "State", "Records", "Success", "Failed", "Unfinished", "Created", ""].map((h) => el("th", {}, h))),
    batches.map((b) => el("tr", { "data-id": b.id },
      el("td", {}, el("a", { href: "#/batch/" + b.id }, String(b.id))),
      el("td", {}, b.product), el("td", {}, b.firmware_version),
      el("td", { class: "state" }, batchState(b)),
      el("td", {}, b.totals.total), el("td", {}, b.totals.success),
      el("td", {}, b.totals.failed), el("td", {}, b.totals.unfinished),
      el("td", {}, ago(b.created_ms)),
      el("td", {}, loggedIn() && b.state === "in_progress" ? batchButtons(b, batchesPage) : ""))));
  show(el("h2", {}, "New batch upgrade"),
    loggedIn() ? (firmware.length ? form : el("p", { class: "muted" }, "Add a firmware first.")) : needLogin(),
    el("h2", {}, "Batches"), batches.length ? table : el("p", { class: "muted" }, "No batch yet."));
}

function batchButtons(b, after) {
  const call = (what) => () => act(async () => {
    if (what === "terminate" && !confirm("Terminate batch " + b.id + "? Unfinished records fail.")) return;
    await api("POST", "/api/batches/" + b.id + "/" + what);
    await after(b.id);
  });
  return el("span", {},
    b.paused
      ? el("button", { class: "resume", onclick: call("resume") }, "resume")
      : el("button", { class: "pause", onclick: call("pause") }, "pause"),
    " ",
    el("button", { class: "terminate", onclick: call("terminate") }, "terminate"));
}

// ---- one batch, live

let events = null;

function closeEvents() {
  if (events) events.close();
  events = null;
}

const STATES = ["to_push", "pushed", "pending", "upgrading", "awaiting_retry", "success", "failed"];
const COLORS = { success: "#1a7f37", failed: "#c62828", running: "#1f6feb", waiting: "#9a6700" };

/** Counts of records by state. */
function countStates(b) {
  const c = Object.fromEntries(STATES.map((s) => [s, 0]));
  for (const r of b.records) c[r.state] = (c[r.state] || 0) + 1;
  return c;
}

/** A line chart of success / failed / running / waiting over time. */
function chart(samples) {
  const W = 640, H = 160, P = 24;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "chart");
  svg.setAttribute("id", "chart");
  svg.setAttribute("width", W);
  svg.setAttribute("height", H);
  if (samples.length < 1) return svg;
  const t0 = samples[0].t, t1 = Math.max(samples[samples.length - 1].t, t0 + 1000);
  const max = Math.max(1, ...samples.map((s) => s.total));
  const x = (t) => P + ((t - t0) / (t1 - t0)) * (W - 2 * P);
  const y = (n) => H - P - (n / max) * (H - 2 * P);
  for (const key of Object.keys(COLORS)) {
    const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    line.setAttribute("fill", "none");
    line.setAttribute("stroke", COLORS[key]);
    line.setAttribute("stroke-width", "2");
    line.setAttribute("points", samples.map((s) => x(s.t).toFixed(1) + "," + y(s[key]).toFixed(1)).join(" "));
    const title = document.createElementNS("http://www.w3.org/2000/svg", "title");
    title.textContent = key;
    line.append(title);
    svg.append(line);
  }
  let lx = P;
  for (const key of Object.keys(COLORS)) {
    const text = document.createElementNS("http://www.w3.org/2000/svg", "text");
    text.setAttribute("x", lx);
    text.setAttribute("y", 14);
    text.setAttribute("fill", COLORS[key]);
    text.setAttribute("font-size", "12");
    text.textContent = key;
    svg.append(text);
    lx += 70;
  }
  const secs = document.createElementNS("http://www.w3.org/2000/svg", "text");
  secs.setAttribute("x", W - P - 60);
  secs.setAttribute("y", H - 6);
  secs.setAttribute("font-size", "11");
  secs.textContent = ((t1 - t0) / 1000).toFixed(0) + " s";
  svg.append(secs);
  return svg;
}

/**
 * The states over time, rebuilt from the records' times (so a page opened
 * late still shows the batch from its start): at each of 80 instants from
 * the creation to now (or the end), a record is success or failed once
 * finished, running once pushed, waiting before.
 */
function history(b) {
  const end = b.finished_ms || Date.now();
  const start = b.created_ms;
  const out = [];
  for (let i = 0; i <= 80; i++) {
    const t = start + ((end - start) * i) / 80;
    const s = { t, total: b.records.length, success: 0, failed: 0, running: 0, waiting: 0 };
    for (const r of b.records) {
      if (r.finished_ms && r.finished_ms <= t) s[r.state === "success" ? "success" : "failed"]++;
      else if (r.pushed_ms && r.pushed_ms <= t) s.running++;
      else s.waiting++;
    }
    out.push(s);
  }
  return out;
}

function batchPage(id) {
  let failedOnly = false;
  let last = null;
  const draw = (b) => {
    last = b;
    const c = countStates(b);
    const samples = history(b);
    const rows = b.records.filter((r) => !failedOnly || r.state === "failed");
    const groups = b.groups.length > 1 ? el("p", { id: "groups" }, b.groups.map((g, i) =>
      el("span", {}, "group " + (i + 1) + (i + 1 === b.group ? " (pushing)" : "") + ": " +
        g.total + " devices, " + g.success + " success, " + g.failed + " failed; "))) : null;
    show(
      el("h2", {}, "Batch " + b.id + ": " + b.product + " to " + b.firmware_version),
      el("p", {}, el("span", { id: "batch-state", class: "state-" + b.state }, batchState(b)), " · ",
        b.policy + ", " + b.sign_method + ", " + b.retries + " retries, timeout " + (b.timeout_ms / 60000) + " min, created " + ago(b.created_ms),
        " ", loggedIn() && b.state === "in_progress" ? batchButtons(b, () => {}) : ""),
      b.paused ? el("div", { class: "paused", id: "paused" }, "Paused: " + b.paused) : null,
      el("p", { class: "counts", id: "counts" }, STATES.map((s) =>
        el("span", { "data-state": s }, s.replace("_", " ") + ": " + c[s]))),
      groups,
      chart(samples),
      el("p", {}, el("label", {}, el("input", { type: "checkbox", id: "failed-only", checked: failedOnly, onchange: (ev) => {
        failedOnly = ev.target.checked; draw(last);
      } }), " failed records only")),
      el("table", { id: "records" },
        el("tr", {}, ["Device", "Group", "State", "Progress", "Version", "Attempts", "Reason"].map((h) => el("th", {}, h))),
        rows.map((r) => el("tr", { class: r.state, "data-device": r.device },
          el("td", {}, r.device), el("td", {}, r.group || 1),
          el("td", { class: "state state-" + r.state }, r.state.replace("_", " ")),
          el("td", {}, bar(percent(r)), " " + percent(r) + "%"),
          el("td", {}, r.version || ""), el("td", {}, r.attempts),
          el("td", {}, [r.reason, r.desc].filter(Boolean).join(": "))))));
  };
  closeEvents();
  events = new EventSource("/api/batches/" + encodeURIComponent(id) + "/events");
  events.addEventListener("batch", (ev) => draw(JSON.parse(ev.data)));
  events.onerror = () => {
    // The stream ends once the batch has; a live batch reconnects by itself.
    if (last && last.state !== "in_progress") closeEvents();
  };
  show(el("p", { class: "muted" }, "loading batch " + id + "..."));
}

// ---- devices

async function devicesPage() {
  const list = await api("GET", "/api/devices");
  show(el("h2", {}, "Devices"), list.length ? el("table", { id: "devices" },
    el("tr", {}, ["Product", "Device", "Version", "Online", "Last seen", "Current record"].map((h) => el("th", {}, h))),
    list.map((d) => el("tr", { "data-device": d.device },
      el("td", {}, d.product), el("td", {}, d.device), el("td", {}, d.version),
      el("td", { class: d.online ? "online" : "muted" },
        d.online === undefined ? "(external broker)" : (d.online ? "online" : "offline")),
      el("td", {}, ago(d.last_seen_ms)),
      el("td", {}, d.record ? el("a", { href: "#/batch/" + d.record.batch },
        "batch " + d.record.batch + ": " + d.record.state.replace("_", " ") + " " + d.record.progress + "%") : ""))))
    : el("p", { class: "muted" }, "No device has reported its version yet."));
}

// ---- routing

async function route() {
  closeEvents();
  showError("");
  renderLogin();
  const [, page, arg] = (location.hash || "#/batches").split("/");
  for (const a of document.querySelectorAll("header nav a")) {
    a.classList.toggle("active", a.id === "nav-" + page);
  }
  try {
    if (page === "login") loginPage();
    else if (page === "firmware") await firmwarePage();
    else if (page === "devices") await devicesPage();
    else if (page === "batch" && arg) batchPage(arg);
    else await batchesPage();
  } catch (e) {
    showError(e.message);
  }
}

window.addEventListener("hashchange", route);
route();
