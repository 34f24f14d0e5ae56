// A table body holding only the rows in view, and a screenful either side: a thousand nodes
// cost what forty do. Every row has the same height (set in the CSS, given here); the rows
// above and below the window are two empty rows of their height, so the page scrolls as if
// all were there. Rows are drawn from HTML strings, and drawn again only when it changed.
const SPARE = 20; // rows drawn beyond each edge of the view

export class Rows {
  // `row(item)`: the cells' HTML; `key(item)`: a string naming the row, its `data-<name>`;
  // `height`: a row's in pixels, at first (it is measured once rows are drawn).
  constructor(body, { height, columns, row, key, name = "key" }) {
    Object.assign(this, { body, height, row, key, name });
    this.items = [];
    this.drawn = new Map(); // key -> [tr, html]
    this.first = 0;
    this.last = 0;
    this.top = this.pad(columns);
    this.bottom = this.pad(columns);
    body.replaceChildren(this.top, this.bottom);
    let pending = false;
    this.onScroll = () => {
      if (pending) return;
      pending = true;
      requestAnimationFrame(() => {
        pending = false;
        this.draw();
      });
    };
    addEventListener("scroll", this.onScroll, { passive: true });
    addEventListener("resize", this.onScroll, { passive: true });
  }

  pad(columns) {
    const tr = document.createElement("tr");
    tr.className = "pad";
    tr.innerHTML = `<td colspan="${columns}"></td>`;
    return tr;
  }

  stop() {
    removeEventListener("scroll", this.onScroll);
    removeEventListener("resize", this.onScroll);
  }

  // The whole list, in order: what is in view is drawn (again where it changed).
  set(items) {
    this.items = items;
    this.body.closest("table").dataset.rows = items.length;
    this.draw(true);
  }

  draw(changed = false) {
    const above = Math.max(0, -this.body.getBoundingClientRect().top);
    const first = Math.max(0, Math.floor(above / this.height) - SPARE);
    const last = Math.min(this.items.length, first + Math.ceil(innerHeight / this.height) + 2 * SPARE);
    if (!changed && first === this.first && last === this.last) return;
    [this.first, this.last] = [first, last];
    const keep = new Map();
    const rows = [];
    for (const item of this.items.slice(first, last)) {
      const key = this.key(item);
      const html = this.row(item);
      let [tr, before] = this.drawn.get(key) ?? [null, null];
      if (!tr) {
        tr = document.createElement("tr");
        tr.dataset[this.name] = key;
      }
      if (html !== before) tr.innerHTML = html;
      keep.set(key, [tr, html]);
      rows.push(tr);
    }
    this.drawn = keep;
    this.top.style.height = `${first * this.height}px`;
    this.bottom.style.height = `${(this.items.length - last) * this.height}px`;
    this.top.after(...rows);
    // What is left between the rows put in place and the bottom pad is no longer in view.
    while (this.bottom.previousSibling !== (rows.at(-1) ?? this.top)) this.bottom.previousSibling.remove();
    const height = rows[0]?.getBoundingClientRect().height;
    if (height && Math.abs(height - this.height) > 0.5) {
      this.height = height; // as the CSS and the fonts made it
      this.draw(true);
    }
  }
}
