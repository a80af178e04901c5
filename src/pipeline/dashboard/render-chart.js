/* A chart artifact as inline SVG, drawn by our own small code: axes, labels,
 * bars (grouped by x) or one polyline per series (a null breaks the line).
 * Colours come from classes in style.css (series-0, series-1, ...).
 */
"use strict";

(function () {
  const R = (window.PipelineRender = window.PipelineRender || {});
  const NS = "http://www.w3.org/2000/svg";
  const W = 560, H = 240, M = { top: 12, right: 12, bottom: 40, left: 52 };
  const SERIES_CLASSES = 6;

  function el(tag, attrs, text) {
    const node = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  /** About four round steps from 0 (or the minimum, when below 0) to the maximum. */
  function ticks(low, high) {
    const span = high - low || 1;
    const raw = span / 4;
    const step = [1, 2, 2.5, 5, 10].map((f) => f * 10 ** Math.floor(Math.log10(raw))).find((s) => s >= raw);
    const out = [];
    for (let v = Math.floor(low / step) * step; v <= high + step / 2; v += step) out.push(Number(v.toPrecision(12)));
    return out;
  }

  function format(v) {
    return Math.abs(v) >= 10000 ? v.toExponential(1) : String(Number(v.toPrecision(4)));
  }

  function renderChart(data) {
    const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, class: `chart chart-${data.type}`, role: "img" });
    const xs = data.x;
    const values = data.series.flatMap((s) => s.values).filter((v) => v !== null);
    const grid = ticks(Math.min(0, ...values), Math.max(0, ...values));
    const low = grid[0], high = grid[grid.length - 1];
    const plotW = W - M.left - M.right, plotH = H - M.top - M.bottom;
    const y = (v) => M.top + plotH - ((v - low) / (high - low || 1)) * plotH;
    const slot = plotW / Math.max(xs.length, 1);
    const xc = (i) => M.left + slot * (i + 0.5);

    for (const t of grid) {
      svg.append(el("line", { x1: M.left, x2: W - M.right, y1: y(t), y2: y(t), class: "chart-grid" }));
      svg.append(el("text", { x: M.left - 6, y: y(t) + 4, class: "chart-label chart-y-label" }, format(t)));
    }
    svg.append(el("line", { x1: M.left, x2: M.left, y1: M.top, y2: M.top + plotH, class: "chart-axis" }));
    svg.append(el("line", { x1: M.left, x2: W - M.right, y1: y(Math.max(low, 0)), y2: y(Math.max(low, 0)), class: "chart-axis" }));
    const every = Math.ceil(xs.length / 12);   // at most about a dozen x labels
    xs.forEach((x, i) => {
      if (i % every === 0) {
        svg.append(el("text", { x: xc(i), y: M.top + plotH + 16, class: "chart-label chart-x-label" }, String(x)));
      }
    });

    const n = data.series.length;
    data.series.forEach((series, s) => {
      const cls = `series-${s % SERIES_CLASSES}`;
      if (data.type === "bar") {
        const width = (slot * 0.8) / n;
        series.values.forEach((v, i) => {
          if (v === null) return;
          const top = y(Math.max(v, 0)), bottom = y(Math.min(v, 0));
          const bar = el("rect", {
            x: xc(i) - slot * 0.4 + s * width, y: top, width: Math.max(width - 1, 1),
            height: Math.max(bottom - top, 0), class: `chart-bar ${cls}`, "data-testid": "chart-bar",
          });
          bar.append(el("title", {}, `${series.name} · ${xs[i]}: ${v}`));
          svg.append(bar);
        });
      } else {
        let points = [];
        const flush = () => {
          if (points.length) svg.append(el("polyline", { points: points.join(" "), class: `chart-line ${cls}`, "data-testid": "chart-line" }));
          points = [];
        };
        series.values.forEach((v, i) => {
          if (v === null) flush();
          else points.push(`${xc(i).toFixed(1)},${y(v).toFixed(1)}`);
        });
        flush();
      }
    });
    const figure = document.createElement("div");
    figure.className = "chart-wrap";
    figure.append(svg);
    if (n > 1) {
      const legend = document.createElement("ul");
      legend.className = "chart-legend";
      data.series.forEach((series, s) => {
        const item = document.createElement("li");
        const swatch = document.createElement("span");
        swatch.className = `swatch series-${s % SERIES_CLASSES}`;
        item.append(swatch, document.createTextNode(series.name));
        legend.append(item);
      });
      figure.append(legend);
    }
    return figure;
  }

  R.chart = renderChart;
})();
