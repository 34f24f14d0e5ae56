// Small helpers the pages share: escaping, formatting, SVG bars and sparklines, toasts.
// Bars are SVG (widths as attributes, no inline style), so the content security policy
// needs no 'unsafe-inline'.

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

export const esc = (value) => String(value ?? "").replace(/[&<>"']/g, (c) => ESCAPES[c]);

export const $ = (selector, root = document) => root.querySelector(selector);

export function mib(value) {
  if (value >= 1024 * 1024) return `${(value / 1048576).toFixed(1)} TiB`;
  if (value >= 1024) return `${(value / 1024).toFixed(1)} GiB`;
  return `${Math.round(value)} MiB`;
}

export const num = (value, digits = 2) => String(Math.round(value * 10 ** digits) / 10 ** digits);

export const pct = (fraction) => `${Math.round(fraction * 100)}%`;

export function when(seconds) {
  if (!seconds) return "";
  const date = new Date(seconds * 1000);
  const today = new Date().toDateString() === date.toDateString();
  return today ? date.toLocaleTimeString() : date.toLocaleString();
}

export function duration(seconds) {
  if (seconds == null) return "";
  if (seconds < 60) return `${num(seconds, 1)} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
  return `${Math.floor(seconds / 3600)} h ${Math.round((seconds % 3600) / 60)} min`;
}

const share = (part, whole) => (whole > 0 ? Math.max(0, Math.min(100, (100 * part) / whole)) : 0).toFixed(1);

// A bar of `capacity`: what is allocated (pale), and what is used (dark, thinner).
export function meter(used, allocated, capacity) {
  const use = used == null ? "" : `<rect class="m-use" y="3" height="4" width="${share(used, capacity)}"/>`;
  return (
    `<svg class="meter" viewBox="0 0 100 10" preserveAspectRatio="none" aria-hidden="true">` +
    `<rect class="m-cap" width="100" height="10"/>` +
    `<rect class="m-alloc" height="10" width="${share(allocated, capacity)}"/>${use}</svg>`
  );
}

// A bar of the whole cluster's share with marks at a queue's guarantee and limit.
export function shareBar(value, guarantee, limit) {
  const mark = (x, cls) => `<line class="${cls}" x1="${x}" x2="${x}" y1="0" y2="10"/>`;
  return (
    `<svg class="meter" viewBox="0 0 100 10" preserveAspectRatio="none" aria-hidden="true">` +
    `<rect class="m-cap" width="100" height="10"/><rect class="m-alloc" height="10" width="${share(value, 1)}"/>` +
    `${guarantee > 0 ? mark(share(guarantee, 1), "m-guarantee") : ""}${limit < 1 ? mark(share(limit, 1), "m-limit") : ""}</svg>`
  );
}

// The recent history of a percentage, oldest first.
export function spark(values, max = 100) {
  if (!values || values.length < 2) return "";
  const step = 100 / (values.length - 1);
  const points = values.map((v, i) => `${(i * step).toFixed(1)},${(20 - (20 * Math.min(v, max)) / max).toFixed(1)}`);
  return (
    `<svg class="spark" viewBox="0 0 100 20" preserveAspectRatio="none" aria-hidden="true">` +
    `<polyline points="${points.join(" ")}"/></svg>`
  );
}

export const badge = (text, cls = text) => `<span class="badge ${esc(cls)}">${esc(text)}</span>`;

let toastTimer = null;

export function toast(message, kind = "error") {
  const box = $("#toast");
  box.textContent = message;
  box.className = `shown ${kind}`;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => (box.className = ""), 6000);
}

// What a failed call says to the user; an aborted one (the page was left) says nothing.
export function report(error) {
  if (error?.name === "AbortError") return;
  toast(error?.message || String(error));
}

// `fn` run at most once every `ms` (a number, or a function giving it), after the first call that asks for it, and never twice
// at once: calls made while it runs ask for one more run after it. `.stop()` ends it.
export function coalesce(fn, ms) {
  let timer = null;
  let running = false;
  let again = false;
  let stopped = false;
  let last = -Infinity;
  const fire = async () => {
    timer = null;
    if (running) {
      again = true;
      return;
    }
    running = true;
    last = performance.now();
    try {
      await fn();
    } catch (error) {
      report(error);
    } finally {
      running = false;
    }
    if (again) {
      again = false;
      schedule();
    }
  };
  const schedule = () => {
    if (timer !== null || stopped) return;
    timer = setTimeout(fire, Math.max(0, last + (typeof ms === "function" ? ms() : ms) - performance.now()));
  };
  schedule.stop = () => {
    stopped = true;
    clearTimeout(timer);
  };
  return schedule;
}

// `fn` every `ms` while the tab is shown, until `signal` aborts.
export function every(ms, fn, signal) {
  const timer = setInterval(() => document.hidden || fn(), ms);
  signal.addEventListener("abort", () => clearInterval(timer), { once: true });
}

// Marks a page's first rendering of its data (the benchmark and the tests wait for it).
export function rendered(page) {
  performance.mark(`shoal-rendered-${page}`);
  document.body.dataset.rendered = page;
}

// Buttons that ask to be clicked again within 4 s before doing something irreversible. A
// button carries `armable(key)`; its state is kept by key, not in the element, so a row
// redrawn between the two clicks (a listing, an event) keeps it.
const arming = new Map(); // key -> the timer that disarms it

export const armable = (key) => ` data-arm="${esc(key)}"${arming.has(key) ? " data-armed" : ""}`;

// Whether this click is the second, confirming one; else the button is armed.
export function confirmed(button) {
  const key = button.dataset.arm;
  const armed = () => [...document.querySelectorAll("[data-arm]")].filter((b) => b.dataset.arm === key);
  if (arming.has(key)) {
    clearTimeout(arming.get(key));
    arming.delete(key);
    armed().forEach((b) => b.removeAttribute("data-armed"));
    return true;
  }
  const disarm = () => {
    arming.delete(key);
    armed().forEach((b) => b.removeAttribute("data-armed"));
  };
  arming.set(key, setTimeout(disarm, 4000));
  button.setAttribute("data-armed", "");
  return false;
}
