// One job: its spec, its tasks and why each waits, and a live tail of a task's output. The
// stream of this job's events patches task rows as they come; the job's summary (state,
// counts, why it waits) is fetched again at most twice a second.
import { call, get, post } from "../api.js";
import { $, armable, badge, coalesce, confirmed, duration, esc, mib, num, rendered, report, toast, when } from "../dom.js";
import { follow } from "../stream.js";
import { counts, ended, mayKill } from "./jobs.js";

const TASKS = 500; // tasks shown per page
const KEEP = 256 * 1024; // characters of output kept in the tail

function taskCells(t) {
  const why = t.state === "pending" ? t.reason : t.message;
  const ran = t.started_at ? duration((t.finished_at || Date.now() / 1000) - t.started_at) : "";
  return (
    `<td class="n">${t.index}</td><td>${esc(t.id)}</td><td>${badge(t.state)}</td><td>${esc(t.node ?? "")}</td>` +
    `<td class="n">${t.attempt}</td><td class="n">${t.exit_code ?? ""}</td><td>${when(t.started_at)}</td>` +
    `<td>${ran}</td><td class="why">${esc(why)}</td>` +
    `<td><button type="button" class="small" data-log="${esc(t.id)}"${t.node ? "" : " disabled"}>log</button></td>`
  );
}

function facts(job) {
  const s = job.spec;
  const command = Array.isArray(s.command) ? s.command.join(" ") : s.command;
  const r = s.resources;
  const rows = [
    ["owner", job.owner],
    ["queue", `${s.queue} · priority ${s.priority}`],
    ["submitted", when(job.submitted_at)],
    ["command", command],
    ["tasks", `${s.count} × ${num(r.cpus)} cpus, ${mib(r.mem)}${r.gpus ? `, ${r.gpus} gpus` : ""}`],
    ["runs as", s.user ?? ""],
    ["nodes", [s.nodes, ...(s.constraints ?? [])].filter(Boolean).join(" · ")],
    ["time limit", s.time_limit ? duration(s.time_limit) : ""],
  ];
  return rows
    .filter(([, v]) => v !== "")
    .map(([k, v]) => `<dt>${k}</dt><dd>${esc(v)}</dd>`)
    .join("");
}

export async function mount(main, { args, query, me, signal }) {
  const id = Number(args[0]);
  const from = Math.max(0, Number(query.get("from")) || 0);
  main.innerHTML = `
    <h1>Job ${id} <span id="name"></span> <span id="state"></span>
      <button type="button" id="kill" class="small danger"${armable(`kill ${id}`)} hidden>kill</button></h1>
    <dl id="facts" class="facts"></dl>
    <p id="waiting" class="waiting" hidden></p>
    <p id="counts"></p>
    <table class="grid tasks">
      <thead><tr><th class="n">#</th><th>task</th><th>state</th><th>node</th><th class="n">attempt</th><th class="n">exit</th>
        <th>started</th><th>ran</th><th>why it waits, or what it said</th><th></th></tr></thead>
      <tbody id="rows"></tbody>
    </table>
    <p id="paging" class="muted"></p>
    <section class="log">
      <h2>Output of <span id="logof">…</span>
        <select id="stream"><option>stdout</option><option>stderr</option></select> <span id="logstate" class="muted"></span></h2>
      <pre id="log" tabindex="0"></pre>
    </section>`;
  const rows = new Map(); // task id -> row
  let job = null;

  const summary = (view) => {
    job = view;
    $("#name").textContent = view.name;
    $("#state").innerHTML = badge(view.state);
    $("#facts").innerHTML = facts(view);
    $("#waiting").hidden = !view.waiting;
    $("#waiting").textContent = view.waiting ? `Waiting: ${view.waiting}` : "";
    $("#counts").innerHTML = counts(view.counts);
    $("#kill").hidden = !mayKill(me, view) || ended(view.state);
    document.title = `job ${id} · shoal`;
  };
  const load = async () => {
    const view = await get(`/v1/jobs/${id}?offset=${from}&limit=${TASKS}`, { signal });
    summary(view);
    const body = $("#rows");
    body.innerHTML = view.tasks.map((t) => `<tr data-task="${esc(t.id)}">${taskCells(t)}</tr>`).join("");
    rows.clear();
    [...body.rows].forEach((row, i) => rows.set(view.tasks[i].id, row));
    const total = Object.values(view.counts).reduce((a, b) => a + b, 0);
    $("#paging").innerHTML =
      total > TASKS
        ? `tasks ${from + 1}–${from + view.tasks.length} of ${total} · ` +
          (from > 0 ? `<a href="#/job/${id}?from=${Math.max(0, from - TASKS)}">earlier</a> ` : "") +
          (from + TASKS < total ? `<a href="#/job/${id}?from=${from + TASKS}">later</a>` : "")
        : "";
    return view;
  };
  const refresh = coalesce(async () => {
    const view = await get(`/v1/jobs/${id}?limit=0`, { signal });
    summary(view);
    for (const row of rows.values()) {
      if (row.querySelector(".badge.pending")) row.querySelector(".why").textContent = view.waiting;
    }
  }, 500);
  const reload = coalesce(load, 1000);
  signal.addEventListener("abort", () => (refresh.stop(), reload.stop()));

  // The tail: GET /v1/tasks/{id}/logs?follow=true, read as it comes until the attempt ends.
  let tailing = null;
  const tail = async (taskId) => {
    tailing?.abort();
    const mine = (tailing = new AbortController());
    signal.addEventListener("abort", () => mine.abort(), { once: true });
    const pre = $("#log");
    const stream = $("#stream").value;
    $("#logof").textContent = taskId;
    $("#logstate").textContent = "following";
    pre.textContent = "";
    let text = "";
    let drawn = false;
    const draw = () => {
      const bottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
      pre.textContent = text;
      if (bottom) pre.scrollTop = pre.scrollHeight;
      drawn = false;
    };
    try {
      const path = `/v1/tasks/${encodeURIComponent(taskId)}/logs?stream=${stream}&follow=true`;
      const reader = (await call(path, { signal: mine.signal })).body.getReader();
      const decoder = new TextDecoder();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        text += decoder.decode(value, { stream: true });
        if (text.length > KEEP) text = text.slice(text.length - (KEEP * 3) / 4);
        if (!drawn) drawn = requestAnimationFrame(draw);
      }
      draw();
      $("#logstate").textContent = text ? "ended" : "ended, with no output";
    } catch (error) {
      if (mine.signal.aborted) return;
      $("#logstate").textContent = "";
      report(error);
    }
  };
  $("#rows").addEventListener("click", (event) => {
    const button = event.target.closest("[data-log]");
    if (button) tail(button.dataset.log);
  });
  $("#stream").addEventListener("change", () => tailing && tail($("#logof").textContent));
  $("#kill").addEventListener("click", async (event) => {
    if (!confirmed(event.target)) return;
    try {
      summary(await post(`/v1/jobs/${id}/kill`, undefined, { signal }));
      toast(`job ${id} killed`, "info");
    } catch (error) {
      report(error);
    }
  });

  await follow({
    topics: ["jobs", "tasks"],
    job: id,
    signal,
    onReset: reload,
    onEvents: (events) => {
      for (const { topic, type, record } of events) {
        if (topic === "jobs" && type === "removed") toast(`job ${id} is gone: it ended past the retention`, "info");
        const row = topic === "tasks" && rows.get(record.id);
        if (row) row.innerHTML = taskCells({ ...record, reason: job?.waiting ?? "" });
      }
      refresh();
    },
  });
  const view = await load();
  rendered("job");
  const started = view.tasks.find((t) => t.node);
  if (started) tail(started.id);
  else $("#logstate").textContent = "no task has started yet";
}
