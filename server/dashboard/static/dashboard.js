// fedvox dashboard: draws the snapshot embedded in the page, then every update the server sends
// (server-sent events from /api/events). Charts are uPlot (vendored beside this file, MIT).
"use strict";

const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"];
const charts = {};
let current = JSON.parse(document.getElementById("snapshot").textContent);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(child ?? "-"));
  return node;
}

function fmt(value, digits = 3) {
  if (value === null || value === undefined) return "-";
  if (typeof value !== "number") return String(value);
  return Number.isInteger(value) ? String(value) : value.toFixed(digits);
}

function table(id, columns, rows, empty) {
  const target = document.getElementById(id);
  target.replaceChildren();
  if (!rows.length) {
    target.append(el("caption", { class: "empty" }, empty));
    return;
  }
  target.append(el("tr", {}, ...columns.map(c => el("th", { class: c.text ? "text" : "" }, c.label))));
  for (const row of rows) {
    target.append(el("tr", {}, ...columns.map(c => {
      const cell = c.cell ? c.cell(row) : fmt(row[c.key]);
      return el("td", { class: c.key === "fingerprint" ? "key" : c.text ? "text" : "" }, cell);
    })));
  }
}

// One uPlot chart per figure; x is the round. series: [{label, points: [[round, value]...], dash}]
function chart(id, series, yLabel) {
  const figure = document.getElementById(id);
  const rounds = [...new Set(series.flatMap(s => s.points.map(p => p[0])))].sort((a, b) => a - b);
  figure.dataset.series = JSON.stringify(Object.fromEntries(series.map(s => [s.label, s.points])));
  if (charts[id]) { charts[id].destroy(); delete charts[id]; }
  figure.querySelector(".empty")?.remove();
  if (!rounds.length) {
    figure.append(el("p", { class: "empty" }, "nothing yet"));
    return;
  }
  const data = [rounds, ...series.map(s => {
    const byRound = new Map(s.points);
    return rounds.map(r => (byRound.has(r) ? byRound.get(r) : null));
  })];
  const options = {
    width: 540, height: 240,
    scales: { x: { time: false } },
    axes: [{ label: "round", incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000] }, { label: yLabel, size: 60 }],
    series: [{ label: "round" }, ...series.map((s, i) => ({
      label: s.label, stroke: s.color || COLORS[i % COLORS.length], width: 2, dash: s.dash, spanGaps: true,
      points: { show: true, size: 5 },
    }))],
  };
  charts[id] = new uPlot(options, data, figure);
}

function draw(snap) {
  current = snap;
  const runChoice = document.getElementById("run-choice");
  const select = document.getElementById("run");
  runChoice.hidden = snap.runs.length < 2;
  select.replaceChildren(...snap.runs.map(r => el("option", r === snap.run ? { value: r, selected: "" } : { value: r }, r)));

  const exported = snap.export ? ` Export: round ${snap.export.round} (${snap.export.why}).` : "";
  document.getElementById("summary").textContent =
    `${snap.mode}: round ${snap.committed} of ${fmt(snap["target-rounds"])} committed.${exported}`;
  document.getElementById("updated").textContent = `${snap.folder}; updated ${snap.updated}`;

  const rounds = snap.rounds;
  const pick = key => rounds.map(r => [r.round, r[key]]);
  chart("participants-chart", [
    { label: "accepted", points: pick("accepted"), color: "#2ca02c" },
    { label: "refused", points: pick("refused"), color: "#ff7f0e" },
    { label: "late", points: pick("late"), color: "#9467bd" },
    { label: "rejected", points: pick("rejected"), color: "#d62728" },
  ], "updates");
  chart("time-chart", [{ label: "round time (s)", points: pick("round-time-s") }], "seconds");
  const most = Math.max(0, ...rounds.map(r => Math.max(r["bytes-down"], r["bytes-up"])));
  const [unit, size] = most >= 1e9 ? ["GB", 1e9] : most >= 1e6 ? ["MB", 1e6] : ["kB", 1e3];
  chart("bytes-chart", [
    { label: `down (${unit})`, points: rounds.map(r => [r.round, r["bytes-down"] / size]) },
    { label: `up (${unit})`, points: rounds.map(r => [r.round, r["bytes-up"] / size]) },
  ], unit);
  table("rounds", [
    { key: "round", label: "round" }, { key: "selected", label: "selected" }, { key: "accepted", label: "accepted" },
    { key: "refused", label: "refused" }, { key: "late", label: "late" }, { key: "rejected", label: "rejected" },
    { label: "aggregated", cell: r => (r.aggregated === false ? "no" : r.aggregated ? "yes" : "-") },
    { key: "round-time-s", label: "time (s)" },
    { label: "down (MB)", cell: r => fmt(r["bytes-down"] / 1e6, 2) }, { label: "up (MB)", cell: r => fmt(r["bytes-up"] / 1e6, 2) },
  ], rounds, "no round committed yet");

  chart("loss-chart", Object.entries(snap.losses).map(([label, points]) => ({ label, points })), "loss");
  const quality = document.getElementById("quality");
  quality.replaceChildren();
  if (snap.quality) {
    const rows = Object.entries(snap.quality).map(([key, value]) => ({ key, value: typeof value === "object" ? Object.entries(value).map(([k, v]) => `${k} ${fmt(v)}`).join(", ") : fmt(value) }));
    quality.append(el("h3", {}, "Speech quality"));
    const t = el("table", { id: "quality-table" });
    quality.append(t);
    table("quality-table", [{ key: "key", label: "figure", text: true }, { key: "value", label: "value", text: true }], rows, "");
  }
  const samples = document.getElementById("samples");
  samples.replaceChildren();
  if (snap.samples.length) samples.append(el("h3", {}, "Audio samples"));
  for (const s of snap.samples) {
    samples.append(el("p", {}, `round ${fmt(s.round)}${s.text ? `: “${s.text}”` : ""} `, el("audio", { controls: "", preload: "none", src: s.url })));
  }

  const budgets = snap.epsilon.budgets;
  const epsilon = [];
  Object.entries(snap.epsilon.series).forEach(([name, points], i) => {
    const color = COLORS[i % COLORS.length];
    epsilon.push({ label: name, points, color });
    if (budgets[name] !== undefined && points.length) {
      epsilon.push({ label: `${name} budget`, points: points.map(p => [p[0], budgets[name]]), color, dash: [6, 4] });
    }
  });
  chart("epsilon-chart", epsilon, "epsilon");
  chart("speaker-chart", snap.speakers ? [{ label: "speaker-level epsilon (max)", points: snap.speakers.series }] : [], "epsilon");

  table("devices", [
    { key: "name", label: "device", text: true }, { key: "status", label: "status", text: true },
    { key: "node-id", label: "node" }, { key: "rounds-joined", label: "rounds" },
    { key: "profile", label: "profile", text: true },
    { label: "epsilon spent", cell: d => el("span", d["epsilon-spent"] > d["epsilon-budget"] ? { class: "over" } : {}, fmt(d["epsilon-spent"])) },
    { key: "epsilon-budget", label: "budget" },
    { label: "rounds it can still afford", cell: d => (d["rounds-left"] === null || d["rounds-left"] === undefined ? "-" : `≥ ${d["rounds-left"]}`) },
    { key: "fingerprint", label: "key" },
  ], snap.devices, "no devices");
  table("waiting", [
    { key: "fingerprint", label: "key fingerprint" }, { key: "attempts", label: "attempts" },
    { key: "first-seen", label: "first", text: true }, { key: "last-seen", label: "last", text: true },
    { label: "", cell: w => registerButton(w, snap.mode === "live") },
  ], snap.waiting, "none");
  const profileColumns = [...new Set(snap.profiles.flatMap(p => Object.keys(p)))];
  table("profiles", profileColumns.map(k => ({ key: k, label: k, text: true })), snap.profiles, "none reported");
}

function registerButton(waiting, live) {
  const button = el("button", live ? {} : { disabled: "", title: "read-only: the server is not running" }, "register…");
  button.addEventListener("click", async () => {
    const name = prompt(`Name for the device with key\n${waiting.fingerprint}\n(letters, digits, . _ -)`);
    if (!name) return;
    if (!confirm(`Register ${waiting.fingerprint} as "${name}"?\nOnly if its owner confirmed this fingerprint.`)) return;
    const reply = await fetch("/api/register", {
      method: "POST", headers: { "content-type": "application/json", "x-fedvox-action": "register" },
      body: JSON.stringify({ fingerprint: waiting.fingerprint, name }),
    });
    const body = await reply.json();
    alert(reply.ok ? body.done.join("\n") : body.error);
  });
  return button;
}

function listen(run) {
  const source = new EventSource(`/api/events?run=${encodeURIComponent(run)}`);
  source.onmessage = event => draw(JSON.parse(event.data));
  return source;
}

draw(current);
let events = listen(current.run);
document.getElementById("run").addEventListener("change", event => {
  events.close();
  events = listen(event.target.value);
});
