// Click-to-sort for tables inside <div class="sortable"> (the experiments table). Self-contained so
// the site needs no CDN. A cell's data-sort attribute, if present, is its sort key; keys that parse
// as numbers sort numerically, empty keys sort last in both directions.
(function () {
  function key(cell) {
    var v = cell.hasAttribute("data-sort") ? cell.getAttribute("data-sort") : cell.textContent.trim();
    return v === "" || v === "\u2014" ? null : (isNaN(Number(v)) ? v.toLowerCase() : Number(v));
  }
  function compare(a, b) {
    if (a === null || b === null) return a === b ? 0 : (a === null ? 1 : -1);
    if (typeof a !== typeof b) return typeof a === "number" ? -1 : 1;
    return a < b ? -1 : a > b ? 1 : 0;
  }
  function sortBy(table, th, col) {
    var asc = th.getAttribute("aria-sort") !== "ascending";
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows).map(function (row, i) {
      return { row: row, key: key(row.cells[col]), i: i };
    });
    rows.sort(function (x, y) {
      var c = compare(x.key, y.key);
      if (x.key !== null && y.key !== null && !asc) c = -c;
      return c || x.i - y.i;  // stable
    });
    rows.forEach(function (r) { body.appendChild(r.row); });
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", asc ? "ascending" : "descending");
  }
  function init() {
    document.querySelectorAll(".sortable table").forEach(function (table) {
      if (!table.tHead || !table.tBodies.length || table.dataset.sortable) return;
      table.dataset.sortable = "1";
      Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
        th.title = "Click to sort";
        th.addEventListener("click", function () { sortBy(table, th, col); });
      });
    });
  }
  // Material re-renders pages with instant navigation; document$ (its page observable) covers both cases.
  if (typeof document$ !== "undefined") document$.subscribe(init); else init();
})();
