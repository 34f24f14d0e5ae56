// Nodes: capacity against allocation and live use, recent load, groups and labels; admins
// drain and undrain. Heartbeats are not events (the ledger keeps them in memory only), so
// live use comes from listing every few seconds; what is an event (up, down, drained, a new
// node) comes from the stream at once. Only the rows in view are in the table (rows.js), and
// only those whose text changed are written again: a thousand nodes cost what forty do.
import { get, post } from "../api.js";
import { $, armable, badge, coalesce, confirmed, esc, every, meter, mib, num, rendered, report, spark, toast } from "../dom.js";
import { Rows } from "../rows.js";
import { follow } from "../stream.js";

const POLL = 3000; // ms between listings (live CPU and memory)
const HOT = 80; // percent of CPU: @hot, as the parallel shell's groups
const IDLE = 10;
const byName = new Intl.Collator(undefined, { numeric: true }).compare; // node2 before node10

const facts = (n) => ({ ...n.info.attributes, ...n.info.labels });

function groupsOf(n) {
  const groups = ["all", n.status === "up" ? "up" : "down"];
  if (n.drained) groups.push("drained");
  if (n.status === "up" && n.load >= HOT) groups.push("hot");
  if (n.status === "up" && n.load < IDLE && n.allocated.cpus === 0) groups.push("idle");
  return groups;
}

// Every word must match: `k=v` a label or attribute, `@group` a live group or a label's
// name, anything else a part of the node's name.
function matcher(text) {
  const words = text.trim().split(/\s+/).filter(Boolean);
  return (n) =>
    words.every((w) => {
      if (w.startsWith("@")) return groupsOf(n).includes(w.slice(1)) || w.slice(1) in n.info.labels;
      const eq = w.indexOf("=");
      if (eq > 0) return facts(n)[w.slice(0, eq)] === w.slice(eq + 1);
      return n.info.name.includes(w);
    });
}

function cells(n, admin) {
  const cap = n.info.capacity;
  const status = [badge(n.status), n.connected ? "" : badge("disconnected", "down"), n.drained ? badge("drained") : ""];
  const labels = Object.entries(n.info.labels)
    .map(([k, v]) => `<button type="button" class="chip" data-filter="${esc(k)}=${esc(v)}">${esc(k)}=${esc(v)}</button>`)
    .join("");
  const action = n.drained ? "undrain" : "drain";
  return (
    `<td class="name"><a href="#/events?node=${encodeURIComponent(n.info.name)}">${esc(n.info.name)}</a></td>` +
    `<td>${status.join(" ")}</td>` +
    `<td>${meter((n.load / 100) * cap.cpus, n.allocated.cpus, cap.cpus)}` +
    `<small>${num(n.allocated.cpus)} / ${num(cap.cpus)} · ${Math.round(n.load)}%</small></td>` +
    `<td>${meter(n.usage.mem_used, n.allocated.mem, cap.mem)}` +
    `<small>${mib(n.allocated.mem)} / ${mib(cap.mem)} · ${mib(n.usage.mem_used)} used</small></td>` +
    `<td>${spark(n.history)}</td>` +
    `<td class="n">${n.tasks}</td>` +
    `<td class="labels">${labels}</td>` +
    (admin
      ? `<td><button type="button" class="small" data-${action}="${esc(n.info.name)}"${armable(`${action} ${n.info.name}`)}>` +
        `${action}</button></td>`
      : "")
  );
}

function summary(nodes) {
  const sum = (f) => nodes.reduce((total, n) => total + f(n), 0);
  const up = sum((n) => n.status === "up");
  const cpus = sum((n) => n.info.capacity.cpus);
  const mem = sum((n) => n.info.capacity.mem);
  const used = sum((n) => (n.load / 100) * n.info.capacity.cpus);
  const allocated = { cpus: sum((n) => n.allocated.cpus), mem: sum((n) => n.allocated.mem) };
  return `
    <div class="stat"><b>${nodes.length}</b> nodes<small>${up} up · ${nodes.length - up} down ·
      ${sum((n) => n.drained)} drained</small></div>
    <div class="stat wide">${meter(used, allocated.cpus, cpus)}<small>cpus: ${num(allocated.cpus)} of ${num(cpus)}
      allocated · ${num(used, 1)} busy</small></div>
    <div class="stat wide">${meter(sum((n) => n.usage.mem_used), allocated.mem, mem)}<small>memory: ${mib(allocated.mem)}
      of ${mib(mem)} allocated · ${mib(sum((n) => n.usage.mem_used))} used</small></div>
    <div class="stat"><b>${sum((n) => n.tasks)}</b> tasks placed</div>`;
}

// Live groups, then each label's values: how many nodes, and their cpus allocated.
function groups(nodes) {
  const found = new Map();
  const add = (key, n) => {
    const entry = found.get(key) ?? { nodes: 0, cpus: 0, allocated: 0 };
    entry.nodes += 1;
    entry.cpus += n.info.capacity.cpus;
    entry.allocated += n.allocated.cpus;
    found.set(key, entry);
  };
  for (const n of nodes) {
    for (const g of groupsOf(n)) if (g !== "all") add(`@${g}`, n);
    for (const [k, v] of Object.entries(n.info.labels)) add(`${k}=${v}`, n);
  }
  return [...found.entries()]
    .sort(([a], [b]) => (b[0] === "@") - (a[0] === "@") || a.localeCompare(b))
    .slice(0, 200)
    .map(
      ([key, e]) =>
        `<button type="button" class="chip" data-filter="${esc(key)}" title="${num(e.allocated)} of ${num(e.cpus)} cpus allocated">` +
        `${esc(key)} <b>${e.nodes}</b></button>`,
    )
    .join("");
}

export async function mount(main, { me, query, signal }) {
  const admin = me.role === "admin";
  main.innerHTML = `
    <section id="summary" class="summary"></section>
    <section class="groups"><h2>Groups and labels</h2><div id="groups"></div></section>
    <div class="toolbar">
      <input id="filter" type="search" placeholder="filter: name, label=value, @up, @drained, @hot" spellcheck="false">
      <span id="shown" class="muted"></span>
    </div>
    <table class="grid nodes">
      <thead><tr><th>node</th><th>status</th><th>cpus (allocated · used)</th><th>memory</th><th>load, last minutes</th>
        <th class="n">tasks</th><th>labels</th>${admin ? "<th></th>" : ""}</tr></thead>
      <tbody id="rows"></tbody>
    </table>`;
  const filter = $("#filter");
  filter.value = query.get("filter") ?? "";
  const nodes = new Map(); // name -> NodeView
  const rows = new Rows($("#rows"), {
    height: 46,
    columns: admin ? 8 : 7,
    name: "node",
    key: (n) => n.info.name,
    row: (n) => cells(n, admin),
  });
  signal.addEventListener("abort", () => rows.stop());

  const render = () => {
    const list = [...nodes.values()].sort((a, b) => byName(a.info.name, b.info.name));
    const visible = list.filter(matcher(filter.value));
    $("#summary").innerHTML = summary(list);
    $("#groups").innerHTML = groups(list);
    $("#shown").textContent = visible.length === list.length ? "" : `${visible.length} of ${list.length} shown`;
    rows.set(visible);
  };
  const list = async () => {
    const fresh = await get("/v1/nodes", { signal });
    nodes.clear();
    for (const n of fresh) nodes.set(n.info.name, n);
    render();
  };
  const relist = coalesce(list, 500);
  signal.addEventListener("abort", relist.stop);

  filter.addEventListener("input", render);
  main.addEventListener("click", async (event) => {
    const chip = event.target.closest("[data-filter]");
    if (chip) {
      filter.value = filter.value.split(/\s+/).includes(chip.dataset.filter) ? "" : chip.dataset.filter;
      render();
      return;
    }
    const button = event.target.closest("[data-drain], [data-undrain]");
    if (!button) return;
    const [action, name] = button.dataset.drain ? ["drain", button.dataset.drain] : ["undrain", button.dataset.undrain];
    if (action === "drain" && !confirmed(button)) return;
    button.disabled = true;
    try {
      const moved = await post(`/v1/nodes/${encodeURIComponent(name)}/${action}`, undefined, { signal });
      toast(`${name} ${action}ed${moved.length ? `: ${moved.length} tasks moving off` : ""}`, "info");
      relist();
    } catch (error) {
      button.disabled = false;
      report(error);
    }
  }, { signal }); // #main outlives the page

  // Not waited for: a change missed before it is open is in the next listing, seconds later.
  follow({
    topics: ["nodes"],
    signal,
    onReset: relist,
    onEvents: (events) => {
      for (const { type, record } of events) {
        const old = record?.info && nodes.get(record.info.name);
        if (type !== "changed" || !old || record.removed) relist();
        else nodes.set(record.info.name, { ...old, ...record });
      }
      render();
    },
  });
  await list();
  rendered("nodes");
  every(POLL, () => relist(), signal);
}
