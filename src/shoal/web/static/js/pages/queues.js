// Queues: each one's policy beside its share of the cluster (GET /v1/queues), and its users'
// shares. Listed again when tasks start or end (the stream), at most every two seconds.
import { get } from "../api.js";
import { $, coalesce, esc, every, mib, num, pct, rendered, shareBar } from "../dom.js";
import { follow } from "../stream.js";

function rows(q) {
  const users = q.users
    .map((u) => `<span class="chip" title="${u.running} running">${esc(u.user)} ${pct(u.share)}</span>`)
    .join("");
  return (
    `<tr data-queue="${esc(q.name)}"><td class="name">${esc(q.name)}${q.configured ? "" : ' <small class="muted">(defaults)</small>'}</td>` +
    `<td>${esc(q.order)}</td><td class="n">${num(q.weight)}</td>` +
    `<td>${shareBar(q.share, q.guarantee, q.limit)}<small>${pct(q.share)} held · guarantee ${pct(q.guarantee)} · limit ${pct(q.limit)}</small></td>` +
    `<td class="n">${num(q.weighted_share, 3)}</td>` +
    `<td>${num(q.allocated.cpus)} cpus · ${mib(q.allocated.mem)}${q.allocated.gpus ? ` · ${q.allocated.gpus} gpus` : ""}</td>` +
    `<td class="n">${q.running}</td><td class="n">${q.pending}<small> in ${q.jobs_pending} jobs</small></td>` +
    `<td>${esc(q.backfill)}</td><td class="labels">${users}</td></tr>`
  );
}

export async function mount(main, { signal }) {
  main.innerHTML = `
    <p class="muted">A queue's share is the largest fraction of any resource of the cluster its running tasks hold;
      weighted fair sharing serves the queue with the lowest share ÷ weight next. The marks on a bar are its
      guarantee and its limit.</p>
    <table class="grid queues">
      <thead><tr><th>queue</th><th>order</th><th class="n">weight</th><th>share of the cluster</th>
        <th class="n">share ÷ weight</th><th>holds</th><th class="n">running</th><th class="n">pending</th>
        <th>backfill</th><th>users' shares</th></tr></thead>
      <tbody id="rows"></tbody>
    </table>`;
  const list = async () => {
    const queues = await get("/v1/queues", { signal });
    $("#rows").innerHTML = queues.map(rows).join("");
  };
  const relist = coalesce(list, 2000);
  signal.addEventListener("abort", relist.stop);
  await follow({
    topics: ["tasks"],
    signal,
    onReset: relist,
    onEvents: relist,
  });
  await list();
  rendered("queues");
  every(10000, relist, signal);
}
