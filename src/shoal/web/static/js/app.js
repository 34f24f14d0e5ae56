// The shell: one HTML page whose fragment names the page shown (#/jobs, #/job/12). Each page
// is a module with `mount(main, context)`; leaving it aborts `context.signal`, which ends
// its stream, its timers and its calls in flight.
import { get, signOut, token } from "./api.js";
import { $, esc, report } from "./dom.js";

const PAGES = new Set(["login", "nodes", "jobs", "job", "queues", "frameworks", "services", "events"]);

let leaving = null; // aborts the page shown
let me = null; // whoami, for the token in use
let meOf = null;

function route() {
  const [path, query = ""] = location.hash.replace(/^#\/?/, "").split("?");
  const [name, ...args] = path.split("/");
  return { name: PAGES.has(name) ? name : "nodes", args: args.map(decodeURIComponent), query: new URLSearchParams(query) };
}

async function whoami(signal) {
  if (meOf !== token()) {
    me = await get("/v1/whoami", { signal });
    meOf = token();
  }
  return me;
}

function chrome(page, who) {
  document.body.dataset.page = page;
  document.body.dataset.role = who?.role ?? "";
  delete document.body.dataset.rendered;
  for (const link of document.querySelectorAll("#nav a")) {
    link.classList.toggle("current", link.dataset.page.split(" ").includes(page));
  }
  $("#who").innerHTML = who ? `${esc(who.name)} <span class="role">${esc(who.role)}</span>` : "";
}

async function show() {
  leaving?.abort();
  const controller = new AbortController();
  leaving = controller;
  const { signal } = controller;
  const where = route();
  if (where.name !== "login" && !token()) {
    signOut(location.hash);
    return;
  }
  try {
    const who = where.name === "login" ? null : await whoami(signal);
    const page = await import(`./pages/${where.name}.js`);
    if (signal.aborted) return;
    chrome(where.name, who);
    const main = $("#main");
    main.replaceChildren();
    await page.mount(main, { ...where, me: who, signal });
  } catch (error) {
    if (!signal.aborted) report(error);
  }
}

$("#logout").addEventListener("click", () => {
  me = meOf = null;
  signOut();
});
window.addEventListener("hashchange", show);
// Leaving: end the page's streams now. A stream left to the browser to close can hold one
// of the six connections it opens to a host for a minute after.
window.addEventListener("pagehide", () => leaving?.abort());
show();
