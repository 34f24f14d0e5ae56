// GET /v1/stream, read with fetch() and a ReadableStream: EventSource cannot send the
// Authorization header. Frames are `id: <index>\nevent: <topic>\ndata: {...}\n\n`.
import { check, headers } from "./api.js";

const BACKOFF = [250, 1000, 2000, 5000, 10000]; // ms before each try again in a row

const sleep = (ms, signal) =>
  new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => clearTimeout(timer), { once: true });
  });

// One frame's fields: {event, data, id}; comments (":...") are skipped.
export function parseFrame(block) {
  let event = "message";
  let id = null;
  const data = [];
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") event = value;
    else if (field === "data") data.push(value);
    else if (field === "id") id = value;
  }
  return { event, id, data: data.join("\n") };
}

// The header's dot: the stream live, or lost and why (the master's reason when it refused
// the stream, as past streams_per_caller), with when it is tried again.
function showState(state, why = "") {
  const dot = document.getElementById("live");
  const note = document.getElementById("live-why");
  if (dot) {
    dot.dataset.state = state;
    dot.title = `the event stream: ${why || state}`;
  }
  if (note) note.textContent = why;
}

const lostWhy = (error, wait) => {
  const again = `trying again in ${wait / 1000} s`;
  return error.status ? `${error.message}; ${again}` : `connection lost; ${again}`;
};

// Follow the stream until `signal` aborts. `onEvents(list)` gets each batch of events as it
// arrives; `onReset()` is called when events may have been missed (the master no longer holds
// the index asked for, or another master leads now): the page lists afresh. A lost connection
// is followed again after the last index had, so nothing is missed or seen twice.
// Returns a promise that settles once the first connection answered: a page that lists after
// it misses no change made in between.
export function follow({ topics = [], job = null, node = null, signal, onEvents, onReset = () => {} }) {
  let opened;
  const ready = new Promise((resolve) => (opened = resolve));
  let index = null; // the last index had (or the one the stream began after)
  const url = () => {
    const params = new URLSearchParams();
    for (const topic of topics) params.append("topic", topic);
    if (job !== null) params.set("job", job);
    if (node !== null) params.set("node", node);
    if (index !== null) params.set("index", index);
    return `/v1/stream?${params}`;
  };
  const read = async (response) => {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      const blocks = buffer.split("\n\n");
      buffer = blocks.pop();
      const batch = [];
      for (const block of blocks) {
        const frame = parseFrame(block);
        const began = /^: following from (\d+)/.exec(block);
        // The head, and each keep-alive, name the index the stream stands after: a stream
        // whose events all pass the page's filter by resumes from there, not from an index
        // the master may have let go.
        if (began) index = Number(began[1]);
        if (!frame.data) continue;
        if (frame.event === "gone") {
          index = null;
          onReset();
          continue;
        }
        const event = JSON.parse(frame.data);
        index = event.index;
        batch.push(event);
      }
      if (batch.length) onEvents(batch);
    }
  };
  (async () => {
    let lost = null; // what ended the last try, if it failed
    for (let failures = 0; !signal.aborted; ) {
      try {
        const response = await fetch(url(), { headers: headers(), signal, cache: "no-store" });
        if (response.status === 410) {
          index = null; // held no more: from now, after listing afresh
          onReset();
          continue;
        }
        await check(response);
        opened();
        showState("live");
        failures = 0;
        await read(response);
        lost = null;
      } catch (error) {
        if (signal.aborted) break;
        if (error.status === 401 || error.status === 403) {
          showState("lost", error.message); // not tried again: the token no longer may
          break;
        }
        failures += 1;
        lost = error;
      }
      opened();
      const wait = BACKOFF[Math.min(failures, BACKOFF.length - 1)];
      showState("lost", lostWhy(lost ?? {}, wait));
      await sleep(wait, signal);
    }
    opened();
  })();
  return ready;
}
