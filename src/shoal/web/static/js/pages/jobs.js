// Jobs, newest first, a page of 100 at a time (GET /v1/jobs?limit&offset). The stream says
// which jobs changed: a row shown is fetched again alone (its summary), a new job brings
// the first page again; never more than a few calls a second, however busy the cluster.
// The API filters by state, owner and queue; a name or id asked for is looked for here, in
// the jobs listed a thousand at a time, newest first, until the page is full.
import { get, post } from "../api.js";
import { $, armable, badge, coalesce, confirmed, esc, rendered, report, toast, when } from "../dom.js";
import { follow } from "../stream.js";

const PAGE = 100;
const SCAN = 1000; // jobs listed per call while filtering
const ALONE = 20; // rows fetched one by one at most; past that, the page again
const STATES = ["pending", "running", "complete", "failed", "killed"];
const TASK_STATES = ["pending", "assigned", "running", "finished", "failed", "killed", "lost", "preempted", "migrated"];
const FILTERS = ["q", "state", "owner", "queue"];
const ASKED = ["state", "owner", "queue"]; // of FILTERS, those GET /v1/jobs applies

export const ended = (state) => ["complete", "failed", "killed"].includes(state);

export function counts(c) {
  return TASK_STATES.filter((s) => c[s])
    .map((s) => `<span class="count ${s}" title="${s}">${c[s]} ${s}</span>`)
    .join(" ");
}

// Whether `me` may kill `job`, as POST /v1/jobs/{id}/kill decides (Caller.may_change): an
// admin any job, a user its own, a reader none.
export const mayKill = (me, job) => me.role === "admin" || (me.role === "user" && job.owner === me.name);
const killer = (me) => me.role === "admin" || me.role === "user"; // a column for the buttons

function cells(job, me) {
  const kill =
    mayKill(me, job) && !ended(job.state)
      ? `<button type="button" class="small danger" data-kill="${job.id}"${armable(`kill ${job.id}`)}>kill</button>`
      : "";
  return (
    `<td class="n"><a href="#/job/${job.id}">${job.id}</a></td><td>${esc(job.name)}</td><td>${esc(job.owner)}</td>` +
    `<td>${esc(job.spec.queue)}</td><td>${badge(job.state)}</td><td>${counts(job.counts)}</td>` +
    `<td>${when(job.submitted_at)}</td>${killer(me) ? `<td>${kill}</td>` : ""}`
  );
}

function matcher(q) {
  const lower = q.toLowerCase();
  return (job) => job.name.toLowerCase().includes(lower) || String(job.id) === q;
}

export async function mount(main, { me, query, signal }) {
  const filters = Object.fromEntries(FILTERS.map((f) => [f, query.get(f) ?? ""]));
  let page = Math.max(0, Number(query.get("page")) || 0);
  main.innerHTML = `
    <form class="toolbar" id="filters">
      <input name="q" type="search" placeholder="name or id" spellcheck="false">
      <select name="state"><option value="">any state</option>${STATES.map((s) => `<option>${s}</option>`).join("")}</select>
      <input name="owner" placeholder="owner" spellcheck="false">
      <input name="queue" placeholder="queue" spellcheck="false">
      <span class="spacer"></span>
      <span id="where" class="muted"></span>
      <button type="button" id="newer">‹ newer</button><button type="button" id="older">older ›</button>
    </form>
    <table class="grid jobs">
      <thead><tr><th class="n">id</th><th>name</th><th>owner</th><th>queue</th><th>state</th><th>tasks</th>
        <th>submitted</th>${killer(me) ? "<th></th>" : ""}</tr></thead>
      <tbody id="rows"></tbody>
    </table>
    <p id="empty" class="muted" hidden>No jobs.</p>`;
  const form = $("#filters");
  if (me.role === "user") {
    // The API lists a user's own jobs alone: no other owner to ask for.
    filters.owner = "";
    form.elements.owner.disabled = true;
    form.elements.owner.placeholder = me.name;
  }
  for (const f of FILTERS) form.elements[f].value = filters[f];
  const body = $("#rows");
  const rows = new Map(); // job id -> row
  let newest = 0; // the newest job id shown (page 0 only)
  let more = false;
  const dirty = new Set();
  let stale = false; // the page itself must be listed again

  const filtering = () => FILTERS.some((f) => filters[f]);
  const fetchPage = async () => {
    const asked = ASKED.filter((f) => filters[f]).map((f) => `&${f}=${encodeURIComponent(filters[f])}`).join("");
    if (!filters.q) {
      const jobs = await get(`/v1/jobs?limit=${PAGE + 1}&offset=${page * PAGE}${asked}`, { signal });
      return [jobs.slice(0, PAGE), jobs.length > PAGE, ""];
    }
    const match = matcher(filters.q);
    const found = [];
    let offset = 0;
    for (;;) {
      const jobs = await get(`/v1/jobs?limit=${SCAN}&offset=${offset}${asked}`, { signal });
      offset += jobs.length;
      found.push(...jobs.filter(match));
      if (jobs.length < SCAN || found.length > (page + 1) * PAGE) break;
    }
    return [found.slice(page * PAGE, (page + 1) * PAGE), found.length > (page + 1) * PAGE, ` of ${offset} jobs looked at`];
  };
  const draw = (jobs, scanned, why = "No jobs.") => {
    body.innerHTML = jobs.map((j) => `<tr data-job="${j.id}">${cells(j, me)}</tr>`).join("");
    rows.clear();
    [...body.rows].forEach((row, i) => rows.set(jobs[i].id, row));
    newest = page === 0 ? (jobs[0]?.id ?? 0) : Infinity; // new jobs show on the first page only
    $("#empty").hidden = jobs.length > 0;
    $("#empty").textContent = why;
    $("#where").textContent = jobs.length ? `${page * PAGE + 1}–${page * PAGE + jobs.length}${scanned}` : "";
    $("#newer").disabled = page === 0;
    $("#older").disabled = !more;
  };
  const list = async () => {
    stale = false;
    dirty.clear();
    let found;
    try {
      found = await fetchPage();
    } catch (error) {
      if (error.status !== 422) throw error;
      more = false; // a filter the API refuses (a queue no queue could be named): it says why
      return draw([], "", `No jobs: ${error.message}.`);
    }
    const [jobs, hasMore, scanned] = found;
    more = hasMore;
    draw(jobs, scanned);
  };
  const sync = coalesce(async () => {
    if (stale || dirty.size > ALONE || filtering()) return list();
    const ids = [...dirty];
    dirty.clear();
    const views = await Promise.all(ids.map((id) => get(`/v1/jobs/${id}?limit=0`, { signal }).catch(() => null)));
    views.forEach((view, i) => {
      const row = rows.get(ids[i]);
      if (!view) stale = true;
      else if (row) row.innerHTML = cells(view, me);
    });
    if (stale) sync();
  }, () => (filtering() ? 3000 : 300));
  signal.addEventListener("abort", sync.stop);

  const go = () => {
    const params = new URLSearchParams(Object.entries({ ...filters, page: page || "" }).filter(([, v]) => v));
    history.replaceState(null, "", `#/jobs${params.toString() ? `?${params}` : ""}`);
    stale = true;
    sync();
  };
  form.addEventListener("submit", (event) => event.preventDefault());
  form.addEventListener("change", () => {
    for (const f of FILTERS) filters[f] = form.elements[f].value.trim();
    page = 0;
    go();
  });
  $("#newer").addEventListener("click", () => ((page = Math.max(0, page - 1)), go()));
  $("#older").addEventListener("click", () => ((page += 1), go()));
  body.addEventListener("click", async (event) => {
    const button = event.target.closest("[data-kill]");
    if (!button || !confirmed(button)) return;
    button.disabled = true;
    try {
      await post(`/v1/jobs/${button.dataset.kill}/kill`, undefined, { signal });
      toast(`job ${button.dataset.kill} killed`, "info");
      dirty.add(Number(button.dataset.kill));
      sync();
    } catch (error) {
      button.disabled = false;
      report(error);
    }
  });

  await follow({
    topics: ["jobs", "tasks"],
    signal,
    onReset: () => ((stale = true), sync()),
    onEvents: (events) => {
      for (const { job, type } of events) {
        if (filtering()) stale = true; // a job may come to match, or no more
        else if (rows.has(job)) {
          if (type === "removed") stale = true;
          else dirty.add(job);
        } else if (job > newest) stale = true; // a new job, on the first page
      }
      if (stale || dirty.size) sync();
    },
  });
  await list();
  rendered("jobs");
}
