/* A table artifact: columns and rows, sortable by clicking a column's header.
 *
 * Numbers sort as numbers, the rest as text, nulls last; a second click on the
 * same header reverses the order. Cells are text nodes, never HTML.
 */
"use strict";

(function () {
  const R = (window.PipelineRender = window.PipelineRender || {});

  function compare(a, b) {
    if (a === b) return 0;
    if (a === null || a === undefined) return 1;
    if (b === null || b === undefined) return -1;
    if (typeof a === "number" && typeof b === "number") return a - b;
    return String(a).localeCompare(String(b), undefined, { numeric: true });
  }

  /** `sort` is {column, descending} kept by the caller, so a redraw keeps the order. */
  function renderTable(data, sort) {
    const state = sort || { column: null, descending: false };
    const wrap = document.createElement("div");
    wrap.className = "artifact-table-wrap";
    const table = document.createElement("table");
    table.className = "artifact-table";
    const head = document.createElement("thead");
    const headRow = document.createElement("tr");
    const body = document.createElement("tbody");

    function fill() {
      const rows = data.rows.slice();
      if (state.column !== null) {
        const c = state.column;
        rows.sort((x, y) => (state.descending ? -1 : 1) * compare(x[c], y[c]));
      }
      body.replaceChildren(...rows.map((row) => {
        const tr = document.createElement("tr");
        for (const cell of row) {
          const td = document.createElement("td");
          td.textContent = cell === null || cell === undefined ? "" : String(cell);
          if (typeof cell === "number") td.className = "num";
          tr.append(td);
        }
        return tr;
      }));
      headRow.querySelectorAll("th").forEach((th, index) => {
        const sorted = state.column === index;
        th.setAttribute("aria-sort", sorted ? (state.descending ? "descending" : "ascending") : "none");
      });
    }

    data.columns.forEach((name, index) => {
      const th = document.createElement("th");
      th.scope = "col";
      const button = document.createElement("button");
      button.type = "button";
      button.className = "sort-button";
      button.textContent = name;
      button.setAttribute("data-testid", `sort-${index}`);
      button.addEventListener("click", () => {
        state.descending = state.column === index ? !state.descending : false;
        state.column = index;
        fill();
      });
      th.append(button);
      headRow.append(th);
    });
    head.append(headRow);
    table.append(head, body);
    wrap.append(table);
    fill();
    return wrap;
  }

  R.table = renderTable;
})();
