// Services in the registry and their endpoints' health. A service's endpoints are listed
// when it is opened (all of them opened when there are few); the stream says which service
// changed, and only that one is listed again.
import { get } from "../api.js";
import { $, badge, coalesce, esc, rendered, when } from "../dom.js";
import { follow } from "../stream.js";

const OPEN = 10; // services opened at first when there are at most this many

const health = (s) =>
  [["passing", s.passing], ["warning", s.warning], ["critical", s.critical]]
    .filter(([, n]) => n)
    .map(([state, n]) => `<span class="count ${state}">${n} ${state}</span>`)
    .join(" ") || '<span class="muted">no endpoint</span>';

const endpoint = (e) =>
  `<tr><td>${esc(e.id)}</td><td>${esc(e.kind)}</td><td>${esc(e.address)}:${e.port}</td><td>${esc(e.node ?? "")}</td>` +
  `<td>${badge(e.status)}</td><td>${when(e.since)}</td><td class="why"><code>${esc(e.output)}</code></td></tr>`;

export async function mount(main, { signal }) {
  main.innerHTML = `<div id="services"></div><p id="empty" class="muted" hidden>No service is registered.</p>`;
  const open = new Set();
  let first = true;
  const endpoints = async (name) => {
    const box = main.querySelector(`[data-endpoints="${CSS.escape(name)}"]`);
    if (!box) return;
    const list = await get(`/v1/services/${encodeURIComponent(name)}?all=1`, { signal });
    box.innerHTML =
      `<table class="grid"><thead><tr><th>endpoint</th><th>kind</th><th>address</th><th>node</th><th>health</th>` +
      `<th>since</th><th>check output</th></tr></thead><tbody>${list.map(endpoint).join("")}</tbody></table>`;
  };
  const list = async () => {
    const services = await get("/v1/services", { signal });
    if (first && services.length <= OPEN) services.forEach((s) => open.add(s.name));
    first = false;
    $("#services").innerHTML = services
      .map(
        (s) =>
          `<details data-service="${esc(s.name)}"${open.has(s.name) ? " open" : ""}><summary><b>${esc(s.name)}</b> ` +
          `${s.tags.map((t) => `<span class="chip">${esc(t)}</span>`).join("")} ${health(s)}</summary>` +
          `<div data-endpoints="${esc(s.name)}"></div></details>`,
      )
      .join("");
    $("#empty").hidden = services.length > 0;
    await Promise.all([...open].map(endpoints));
  };
  const relist = coalesce(list, 1000);
  signal.addEventListener("abort", relist.stop);
  main.addEventListener(
    "toggle",
    (event) => {
      const name = event.target.dataset?.service;
      if (!name) return;
      if (event.target.open && !open.has(name)) {
        open.add(name);
        endpoints(name);
      } else if (!event.target.open) open.delete(name);
    },
    { capture: true, signal }, // #main outlives the page
  );
  await follow({
    topics: ["services"],
    signal,
    onReset: relist,
    onEvents: relist,
  });
  await list();
  rendered("services");
}
