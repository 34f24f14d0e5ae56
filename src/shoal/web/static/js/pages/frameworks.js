// Frameworks subscribed to the offer API: their shares against their fair shares, offers
// outstanding, tasks. Listed again when one changes (the stream), and every few seconds
// (shares move with every offer).
import { get } from "../api.js";
import { $, badge, coalesce, esc, every, pct, rendered, shareBar } from "../dom.js";
import { follow } from "../stream.js";

const cells = (f) =>
  `<tr><td class="name">${esc(f.name)}<small>${esc(f.id)}</small></td><td>${esc(f.principal)}</td><td>${esc(f.role)}</td>` +
  `<td>${badge(f.connected ? "connected" : "disconnected", f.connected ? "up" : "down")}${f.suppressed ? ` ${badge("suppressed")}` : ""}</td>` +
  `<td>${shareBar(f.share, f.fair_share, 1)}<small>${pct(f.share)} held · fair share ${pct(f.fair_share)}</small></td>` +
  `<td class="n">${f.offers}</td><td class="n">${f.tasks}</td><td class="n">${f.unacknowledged}</td></tr>`;

export async function mount(main, { signal }) {
  main.innerHTML = `
    <table class="grid frameworks">
      <thead><tr><th>framework</th><th>principal</th><th>role</th><th>state</th><th>share (mark: fair share)</th>
        <th class="n">offers</th><th class="n">tasks</th><th class="n">unacknowledged</th></tr></thead>
      <tbody id="rows"></tbody>
    </table>
    <p id="empty" class="muted" hidden>No framework is subscribed.</p>`;
  const list = async () => {
    const frameworks = await get("/v1/frameworks", { signal });
    $("#rows").innerHTML = frameworks.map(cells).join("");
    $("#empty").hidden = frameworks.length > 0;
  };
  const relist = coalesce(list, 1000);
  signal.addEventListener("abort", relist.stop);
  await follow({
    topics: ["frameworks"],
    signal,
    onReset: relist,
    onEvents: relist,
  });
  await list();
  rendered("frameworks");
  every(5000, relist, signal);
}
