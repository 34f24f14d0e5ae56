// Migrations (GET /v1/events) and every event of the stream as it comes, newest first; the
// topics followed are chosen with the boxes (offers, the busiest, are off at first).
// `?node=NAME` or `?job=ID` follows one node's or one job's events only.
import { get } from "../api.js";
import { $, badge, duration, esc, rendered, when } from "../dom.js";
import { follow } from "../stream.js";

const TOPICS = ["jobs", "tasks", "nodes", "frameworks", "offers", "migrations", "services", "audit"];
const FEED = 300; // events kept on the page

const migration = (m) =>
  `<tr data-migration="${m.id}"><td class="n">${m.id}</td><td>${when(m.at)}</td>` +
  `<td><a href="#/job/${m.job_id}">${esc(m.task_id)}</a></td><td>${esc(m.source)} → ${esc(m.node ?? m.target) || "?"}</td>` +
  `<td>${esc(m.mode)}</td><td>${m.failed ? badge("failed") : m.running_at ? badge("running") : badge("moving", "pending")}</td>` +
  `<td>${m.running_at ? duration(m.running_at - m.at) : ""}</td><td class="why">${esc(m.failed || m.reason)}</td></tr>`;

function what({ topic, type, record: r }) {
  if (!r) return "";
  switch (topic) {
    case "jobs":
      return type === "removed" ? `job ${r.id} removed` : `job ${r.id} ${r.spec?.name ?? ""} by ${r.owner}${r.killed ? " (killed)" : ""}`;
    case "tasks":
      return `task ${r.id} ${r.state}${r.node ? ` on ${r.node}` : ""}${r.exit_code != null ? ` exit ${r.exit_code}` : ""}${r.message ? `: ${r.message}` : ""}`;
    case "nodes":
      return `${r.info?.name} ${r.status}${r.connected ? "" : ", disconnected"}${r.drained ? ", drained" : ""}`;
    case "migrations":
      return type === "removed" ? `migration ${r.id} removed` : `${r.task_id}: ${r.source} → ${r.node ?? r.target ?? "?"} (${r.reason})`;
    case "audit":
      return `${r.who} ${r.kind} ${r.status}${r.nodes ? ` on ${r.nodes}` : ""}`;
    case "services":
      return r.service ?? `${r.name ?? r.id ?? ""} ${type}`;
    case "frameworks":
      return `${r.name ?? r.id ?? ""} ${type}`;
    default:
      return JSON.stringify(r).slice(0, 200);
  }
}

const line = (e) =>
  `<tr><td>${when(e.at)}</td><td>${badge(e.topic, "topic")}</td><td>${esc(e.type)}</td>` +
  `<td>${e.job != null ? `<a href="#/job/${e.job}">${e.job}</a>` : ""}</td><td>${esc(e.node ?? "")}</td><td class="why">${esc(what(e))}</td></tr>`;

export async function mount(main, { me, query, signal }) {
  // The audit trail is an admin's to read: the stream refuses its topic to any other token.
  const offered = me.role === "admin" ? TOPICS : TOPICS.filter((t) => t !== "audit");
  const node = query.get("node");
  const job = query.get("job");
  main.innerHTML = `
    <h2>Migrations</h2>
    <table class="grid migrations">
      <thead><tr><th class="n">id</th><th>at</th><th>task</th><th>from → to</th><th>mode</th><th>state</th>
        <th>took</th><th>why</th></tr></thead><tbody id="moves"></tbody>
    </table>
    <p id="nomoves" class="muted" hidden>No migration yet.</p>
    <h2>Events${node ? ` on ${esc(node)}` : ""}${job ? ` of job ${esc(job)}` : ""} <small>as they come, from when this page opened</small></h2>
    <form class="toolbar" id="topics">${offered.map(
      (t) => `<label><input type="checkbox" name="${t}"${t === "offers" ? "" : " checked"}> ${t}</label>`,
    ).join("")}<span class="spacer"></span><label><input type="checkbox" id="paused"> paused</label></form>
    <table class="grid feed">
      <thead><tr><th>at</th><th>topic</th><th>change</th><th>job</th><th>node</th><th>what</th></tr></thead>
      <tbody id="feed"></tbody>
    </table>`;
  const moves = $("#moves");
  const feed = $("#feed");
  const listMoves = async () => {
    const list = await get("/v1/events?limit=100", { signal });
    moves.innerHTML = list.map(migration).join("");
    $("#nomoves").hidden = list.length > 0;
  };
  const onMove = (e) => {
    const row = moves.querySelector(`[data-migration="${e.record.id}"]`);
    if (e.type === "removed") row?.remove();
    else if (row) row.outerHTML = migration(e.record);
    else moves.insertAdjacentHTML("afterbegin", migration(e.record));
    $("#nomoves").hidden = true;
  };
  let following = null;
  const start = async () => {
    following?.abort();
    const mine = (following = new AbortController());
    signal.addEventListener("abort", () => mine.abort(), { once: true });
    const form = $("#topics");
    const topics = offered.filter((t) => form.elements[t].checked);
    if (!topics.length) return;
    await follow({
      topics: topics.includes("migrations") ? topics : [...topics, "migrations"],
      node,
      job: job === null ? null : Number(job),
      signal: mine.signal,
      onReset: listMoves,
      onEvents: (events) => {
        events.filter((e) => e.topic === "migrations").forEach(onMove);
        if ($("#paused").checked) return;
        const shown = events.filter((e) => topics.includes(e.topic)).slice(-FEED);
        feed.insertAdjacentHTML("afterbegin", shown.reverse().map(line).join(""));
        while (feed.rows.length > FEED) feed.deleteRow(-1);
      },
    });
  };
  $("#topics").addEventListener("change", (event) => event.target.id !== "paused" && start());
  await start();
  await listMoves();
  rendered("events");
}
