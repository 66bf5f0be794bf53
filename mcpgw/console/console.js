// mcpgw web console: plain DOM and canvas, no libraries, no build step.
// Every admin call carries the admin token as a bearer header; the "try it" panel speaks
// Streamable HTTP to the gateway's own /servers/NAME/mcp endpoint.
"use strict";

// The gateway may be mounted under a prefix (/mcp-gw/console/ -> /mcp-gw/).
const BASE = location.pathname.replace(/console\/[^/]*$/, "");
const PROTOCOL_VERSION = "2025-06-18";
const POLL_MS = 3000;
const $ = (id) => document.getElementById(id);

const NOT_CONNECTED = "Not connected: pick a server and press Connect.";
let token = sessionStorage.getItem("mcpgw-admin-token") || "";
let timer = null;
let servers = [];
const tryit = { server: null, session: null, nextId: 1, tools: [] };

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c == null ? "" : String(c)));
  return node;
}

function showError(message) {
  const p = $("error");
  p.textContent = message || "";
  p.hidden = !message;
}

async function admin(path, options) {
  const r = await fetch(BASE + "admin/" + path, {
    ...(options || {}),
    headers: { authorization: "Bearer " + token, ...((options && options.headers) || {}) },
    cache: "no-store",
  });
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw Object.assign(new Error(body.error || ("HTTP " + r.status)), { status: r.status });
  return body;
}

function seconds(s) {
  if (s < 60) return s.toFixed(0) + " s";
  if (s < 3600) return (s / 60).toFixed(0) + " min";
  return (s / 3600).toFixed(1) + " h";
}

// -- sign in ------------------------------------------------------------------------------------

async function signIn(event) {
  if (event) event.preventDefault();
  token = $("token").value.trim() || token;
  try {
    const overview = await admin("");
    sessionStorage.setItem("mcpgw-admin-token", token);
    $("version").textContent = "v" + overview.version;
    $("main").hidden = false;
    $("login").hidden = true;
    showError("");
    await refresh();
    if (!timer) timer = setInterval(() => refresh().catch(() => {}), POLL_MS);
  } catch (e) {
    showError(e.status === 401 ? "That admin token was not accepted." : "Cannot reach the admin API: " + e.message);
  }
}

// -- polling ------------------------------------------------------------------------------------

let refreshes = 0;

async function refresh() {
  // Only the latest refresh renders: a poll answered late must not hide a session opened since.
  const mine = ++refreshes;
  try {
    const [overview, list, sessions, stats, failures] = await Promise.all([
      admin(""), admin("servers"), admin("sessions"), admin("stats"), admin("failures"),
    ]);
    if (mine !== refreshes) return;
    renderOverview(overview);
    renderServers(list.servers);
    renderSessions(sessions);
    renderStats(stats);
    renderFailures(failures.failures);
    showError("");
  } catch (e) {
    showError("Refresh failed: " + e.message);
  }
}

function renderOverview(o) {
  const state = o.draining ? "draining" : (o.accepting ? "accepting sessions" : "not accepting sessions");
  $("status").textContent = `${o.servers} servers · ${o.sessions.total} sessions · up ${seconds(o.uptime)} · ${state}`;
  $("drain-state").textContent = o.draining ? "Draining: no new sessions." : "Accepting new sessions.";
  $("drain").textContent = o.draining ? "Resume" : "Drain";
  $("drain").dataset.draining = o.draining ? "1" : "";
}

function renderServers(list) {
  servers = list;
  const body = $("servers").tBodies[0];
  const children = $("children").tBodies[0];
  body.replaceChildren();
  children.replaceChildren();
  for (const s of list) {
    const restart = el("button", { class: "small", type: "button", title: "end its sessions and stop its children" }, "restart");
    restart.addEventListener("click", () => admin("servers/" + encodeURIComponent(s.name) + "/restart", { method: "POST" }).then(refresh));
    body.append(el("tr", { "data-server": s.name },
      el("td", {}, s.name + (s.default ? " (default)" : "")),
      el("td", { class: s.health === "ok" ? "ok" : "bad", title: s.problems.join("; ") }, s.health),
      el("td", {}, s.sessions), el("td", {}, s.inFlight), el("td", {}, s.starts), el("td", {}, s.crashes),
      el("td", {}, restart)));
    for (const c of s.children) {
      children.append(el("tr", {}, el("td", {}, s.name), el("td", {}, c.pid), el("td", {}, seconds(c.uptime)),
        el("td", {}, c.transport), el("td", {}, c.inFlight)));
    }
  }
  fillSelect($("stderr-server"), list.map((s) => s.name));
  fillSelect($("tryit-server"), list.map((s) => s.name));
  renderStderr();
  showTryitUrl();
}

// The endpoint "try it" talks to: the connected server's, else the one selected (never empty).
function showTryitUrl() {
  const name = tryit.session ? tryit.server : $("tryit-server").value;
  $("tryit-url").textContent = name ? BASE + "servers/" + encodeURIComponent(name) + "/mcp" : BASE + "mcp";
}

function fillSelect(select, names) {
  const current = select.value;
  if ([...select.options].map((o) => o.value).join("\n") === names.join("\n")) return;
  select.replaceChildren(...names.map((n) => el("option", { value: n }, n)));
  if (names.includes(current)) select.value = current;
}

function renderStderr() {
  const s = servers.find((x) => x.name === $("stderr-server").value);
  const lines = s ? s.stderr.map((l) => `[pid ${l.pid}] ${l.line}`) : [];
  $("stderr").textContent = lines.length ? lines.join("\n") : "(nothing on stderr yet)";
}

function renderSessions(data) {
  const by = Object.entries(data.byTransport).map(([t, n]) => `${t}: ${n}`).join(" · ");
  $("by-transport").textContent = by ? "(" + by + ")" : "(none)";
  const body = $("sessions").tBodies[0];
  body.replaceChildren();
  for (const s of data.sessions) {
    const end = el("button", { class: "small", type: "button" }, "end");
    end.addEventListener("click", () => admin("sessions/" + encodeURIComponent(s.id), { method: "DELETE" }).then(refresh));
    body.append(el("tr", { "data-session": s.id },
      el("td", { class: "id", title: s.id }, s.id), el("td", {}, s.server), el("td", {}, s.transport),
      el("td", {}, seconds(s.age)), el("td", {}, s.inFlight), el("td", {}, end)));
  }
}

function renderFailures(list) {
  const body = $("failures").tBodies[0];
  body.replaceChildren();
  if (!list.length) {
    body.append(el("tr", {}, el("td", { colSpan: 7, class: "muted" }, "(none: or tracing and the audit log are off)")));
    return;
  }
  for (const f of list) {
    body.append(el("tr", { "data-trace": f.traceId || "" },
      el("td", {}, new Date(f.time * 1000).toLocaleTimeString()), el("td", {}, f.server || ""), el("td", {}, f.method),
      el("td", {}, f.target || ""), el("td", { class: "bad" }, f.outcome), el("td", {}, f.errorCode ?? ""),
      el("td", { class: "id", title: f.traceId || "" }, f.traceId || "(not traced)")));
  }
}

// -- charts (canvas) ----------------------------------------------------------------------------

let lastStats = null;

function renderStats(stats) {
  lastStats = stats;
  const end = stats.now;
  const start = end - Math.min(stats.window, Number($("chart-window").value));
  const samples = stats.samples;
  drawChart($("chart-rate"), start, end, [
    { color: "#2563eb", points: samples.map((s) => [s.time, s.requestRate]) },
    { color: "#dc2626", points: samples.map((s) => [s.time, s.errorRate]) },
  ], "/s");
  drawChart($("chart-latency"), start, end, [
    { color: "#059669", points: samples.filter((s) => s.p50 !== null).map((s) => [s.time, s.p50]) },
    { color: "#d97706", points: samples.filter((s) => s.p99 !== null).map((s) => [s.time, s.p99]) },
  ], " ms");
}

function niceMax(v) {
  if (v <= 0) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 5, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}

function drawChart(canvas, start, end, series, unit) {
  if (canvas.clientWidth && canvas.width !== canvas.clientWidth) canvas.width = canvas.clientWidth;
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height, L = 48, R = 8, T = 8, B = 22;
  ctx.clearRect(0, 0, W, H);
  const max = niceMax(Math.max(0, ...series.flatMap((s) => s.points.map((p) => p[1]))));
  const x = (t) => L + (W - L - R) * (t - start) / (end - start);
  const y = (v) => H - B - (H - T - B) * v / max;
  ctx.font = "11px system-ui, sans-serif";
  ctx.strokeStyle = "#e5e7eb";
  ctx.fillStyle = "#6b7280";
  ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const v = max * i / 4;
    ctx.beginPath(); ctx.moveTo(L, y(v)); ctx.lineTo(W - R, y(v)); ctx.stroke();
    ctx.fillText((v >= 10 ? v.toFixed(0) : v.toPrecision(2)) + unit, 2, y(v) + 4);
  }
  const span = end - start;
  for (let i = 0; i <= 3; i++) {
    const ago = span * (3 - i) / 3;
    const label = i === 3 ? "now" : "-" + (span >= 180 ? (ago / 60).toFixed(0) + " min" : ago.toFixed(0) + " s");
    ctx.fillText(label, Math.min(x(end - ago) - 14, W - 30), H - 6);
  }
  for (const s of series) {
    ctx.strokeStyle = s.color;
    ctx.lineWidth = 2;
    ctx.beginPath();
    const points = s.points.filter(([t]) => t >= start);
    points.forEach(([t, v], i) => (i ? ctx.lineTo(x(t), y(v)) : ctx.moveTo(x(t), y(v))));
    ctx.stroke();
    if (points.length === 1) { ctx.fillStyle = s.color; ctx.fillRect(x(points[0][0]) - 2, y(points[0][1]) - 2, 4, 4); }
  }
}

// -- try it: Streamable HTTP to the gateway's own endpoint --------------------------------------

function mcpUrl() {
  return BASE + "servers/" + encodeURIComponent(tryit.server) + "/mcp";
}

async function mcpPost(message) {
  const headers = { "content-type": "application/json", accept: "application/json, text/event-stream",
                    "mcp-protocol-version": PROTOCOL_VERSION };
  if (tryit.session) headers["mcp-session-id"] = tryit.session;
  const mcpToken = $("mcp-token").value.trim();
  if (mcpToken) headers.authorization = "Bearer " + mcpToken;
  const r = await fetch(mcpUrl(), { method: "POST", headers, body: JSON.stringify(message) });
  const sid = r.headers.get("mcp-session-id");
  if (sid) tryit.session = sid;
  if (r.status === 202) return null;
  const text = await r.text();
  if (!r.ok) throw new Error(`HTTP ${r.status}: ${text}`);
  if ((r.headers.get("content-type") || "").startsWith("text/event-stream")) {
    // The answer is the event whose data is the response to this id.
    const events = text.split(/\r?\n\r?\n/).map((e) => e.split(/\r?\n/).filter((l) => l.startsWith("data:"))
      .map((l) => l.slice(5).replace(/^ /, "")).join("\n")).filter((d) => d);
    for (const d of events) {
      const msg = JSON.parse(d);
      if (msg.id === message.id && ("result" in msg || "error" in msg)) return msg;
    }
    throw new Error("no response in the event stream");
  }
  return JSON.parse(text);
}

async function request(method, params) {
  const msg = await mcpPost({ jsonrpc: "2.0", id: tryit.nextId++, method, params: params || {} });
  if (msg.error) throw new Error(`${method}: ${msg.error.message} (${msg.error.code})`);
  return msg.result;
}

async function connect() {
  await disconnect();
  tryit.server = $("tryit-server").value;
  $("tryit-url").textContent = mcpUrl();
  $("result").textContent = "connecting...";
  try {
    const init = await request("initialize", { protocolVersion: PROTOCOL_VERSION, capabilities: {},
                                               clientInfo: { name: "mcpgw-console", version: "1" } });
    await mcpPost({ jsonrpc: "2.0", method: "notifications/initialized" });
    const info = init.serverInfo || {};
    $("tryit-session").textContent = `Connected to ${info.name || "?"} ${info.version || ""} (protocol ${init.protocolVersion})`;
    tryit.tools = (await request("tools/list")).tools || [];
    $("tool").replaceChildren(...tryit.tools.map((t) => el("option", { value: t.name }, t.name)));
    $("disconnect").disabled = false;
    $("call").disabled = tryit.tools.length === 0;
    $("result").textContent = `${tryit.tools.length} tools listed.`;
    renderForm();
  } catch (e) {
    $("result").textContent = "Error: " + e.message;
  }
  // The session just opened (or refused) shows in the Sessions panel now, not at the next poll.
  await refresh();
}

async function disconnect() {
  if (tryit.session) {
    const headers = { "mcp-session-id": tryit.session, "mcp-protocol-version": PROTOCOL_VERSION };
    const mcpToken = $("mcp-token").value.trim();
    if (mcpToken) headers.authorization = "Bearer " + mcpToken;
    await fetch(mcpUrl(), { method: "DELETE", headers }).catch(() => {});
  }
  tryit.session = null;
  tryit.tools = [];
  $("tool").replaceChildren();
  $("tool-form").replaceChildren();
  $("tool-description").textContent = "";
  $("tryit-session").textContent = NOT_CONNECTED;
  $("disconnect").disabled = true;
  $("call").disabled = true;
  showTryitUrl();
}

// A form from the tool's inputSchema: one field per property.
function renderForm() {
  const tool = tryit.tools.find((t) => t.name === $("tool").value);
  const form = $("tool-form");
  form.replaceChildren();
  if (!tool) return;
  $("tool-description").textContent = tool.description || "";
  const schema = tool.inputSchema || {};
  const required = new Set(schema.required || []);
  for (const [name, prop] of Object.entries(schema.properties || {})) {
    const id = "arg-" + name;
    let input;
    const type = Array.isArray(prop.type) ? prop.type.find((t) => t !== "null") : prop.type;
    if (Array.isArray(prop.enum)) {
      input = el("select", { id }, ...(required.has(name) ? [] : [el("option", { value: "" }, "")]),
        ...prop.enum.map((v) => el("option", { value: JSON.stringify(v) }, String(v))));
      input.dataset.kind = "enum";
    } else if (type === "boolean") {
      input = el("input", { id, type: "checkbox", checked: prop.default === true });
      input.dataset.kind = "boolean";
    } else if (type === "number" || type === "integer") {
      input = el("input", { id, type: "number", step: type === "integer" ? "1" : "any" });
      if (prop.default !== undefined) input.value = prop.default;
      input.dataset.kind = type;
    } else if (type === "object" || type === "array" || type === undefined) {
      input = el("textarea", { id, placeholder: "JSON" });
      if (prop.default !== undefined) input.value = JSON.stringify(prop.default);
      input.dataset.kind = "json";
    } else {
      input = el("input", { id, type: "text" });
      if (prop.default !== undefined) input.value = prop.default;
      input.dataset.kind = "string";
    }
    input.name = name;
    form.append(el("label", { htmlFor: id, title: prop.description || "" }, name + (required.has(name) ? " *" : "")), input);
  }
  if (!form.children.length) form.append(el("span", { class: "muted" }, "(no arguments)"));
}

function formArguments() {
  const args = {};
  for (const input of $("tool-form").querySelectorAll("input, select, textarea")) {
    const kind = input.dataset.kind;
    if (kind === "boolean") { args[input.name] = input.checked; continue; }
    if (input.value === "") continue;
    if (kind === "integer") args[input.name] = parseInt(input.value, 10);
    else if (kind === "number") args[input.name] = Number(input.value);
    else if (kind === "enum" || kind === "json") args[input.name] = JSON.parse(input.value);
    else args[input.name] = input.value;
  }
  return args;
}

async function callTool() {
  const name = $("tool").value;
  $("result").textContent = "calling " + name + "...";
  try {
    const result = await request("tools/call", { name, arguments: formArguments() });
    const texts = (result.content || []).filter((c) => c.type === "text").map((c) => c.text);
    $("result").textContent = (result.isError ? "Tool error:\n" : "") + (texts.length ? texts.join("\n") + "\n\n" : "")
      + JSON.stringify(result, null, 2);
    $("result").dataset.done = "1";
  } catch (e) {
    $("result").textContent = "Error: " + e.message;
  }
}

// -- wiring -------------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("login").addEventListener("submit", signIn);
  $("stderr-server").addEventListener("change", renderStderr);
  $("connect").addEventListener("click", connect);
  $("tryit-server").addEventListener("change", showTryitUrl);
  $("disconnect").addEventListener("click", () => disconnect().then(refresh));
  $("tool").addEventListener("change", renderForm);
  $("call").addEventListener("click", callTool);
  $("chart-window").addEventListener("change", () => lastStats && renderStats(lastStats));
  $("drain").addEventListener("click", () =>
    admin("drain", { method: $("drain").dataset.draining ? "DELETE" : "POST" }).then(refresh));
  if (token) signIn();
});
