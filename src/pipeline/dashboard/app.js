/* analysis-pipeline dashboard: plain JavaScript, no build step, no dependencies.
 *
 * Data flow: GET /runs fills the list; then one stream, GET /events
 * (events.js), brings every run created or changed, whichever run it is: the
 * list, the details and the schedules' last runs follow it. The list is read
 * again each time the stream (re)opens, since what happened while it was
 * down was never sent, and slowly besides as a safety net. Everything the
 * server says is put on the page with textContent, never as HTML. The
 * schedules panel (schedules.js) is started from init() with the helpers here.
 */
"use strict";

(function () {
  const TOKEN_KEY = "pipeline.apiToken";
  const LIST_LIMIT = 50;
  const REFRESH_MS = 30000;         // the list, a safety net while the stream is open
  const DOWN_REFRESH_MS = 5000;     // the list, while the stream is not open
  const CONFIRM_MS = 3000;          // the list, when the stream did not confirm a run come to life
  const ACTIVE = new Set(["queued", "running"]);
  const TERMINAL = new Set(["completed", "failed", "cancelled"]);

  const state = {
    runs: new Map(),        // id -> Run JSON
    rows: new Map(),        // id -> row elements
    heard: new Map(),       // id -> when (performance.now()) the stream last sent it
    unconfirmed: new Map(), // id -> since when: made active by an answer, not yet by the stream
    selected: null,         // id of the run shown in details
    detailsKey: "",         // what the details panel last rendered
    pending: new Set(),     // "cancel-3", "resume-3": actions in flight
    loaded: false,
    artifacts: new Map(),   // "runId/key" -> artifact with data, or {failed: true}
    sorts: new Map(),       // "runId/key" -> a table's sort, kept across redraws
  };

  // -- small DOM helpers -----------------------------------------------------

  const $ = (selector, root) => (root || document).querySelector(selector);

  /** An element with attributes and children; strings become text nodes. */
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "className") el.className = value;
      else if (key === "text") el.textContent = value;
      else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
      else el.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      el.append(typeof child === "string" ? document.createTextNode(child) : child);
    }
    return el;
  }

  function setText(el, text) {
    const value = text === null || text === undefined ? "" : String(text);
    if (el.textContent !== value) el.textContent = value;
  }

  // -- formatting ------------------------------------------------------------

  function parseTime(value) {
    if (!value) return null;
    const t = Date.parse(value);
    return Number.isNaN(t) ? null : t;
  }

  function formatDuration(ms) {
    if (ms === null || ms === undefined || ms < 0) return "";
    if (ms < 1000) return `${Math.round(ms)} ms`;
    const s = ms / 1000;
    if (s < 10) return `${s.toFixed(1)} s`;
    if (s < 60) return `${Math.round(s)} s`;
    const total = Math.round(s);
    const hours = Math.floor(total / 3600);
    const minutes = Math.floor((total % 3600) / 60);
    const seconds = total % 60;
    if (hours) return `${hours} h ${String(minutes).padStart(2, "0")} min`;
    return `${minutes} min ${String(seconds).padStart(2, "0")} s`;
  }

  function formatTime(value) {
    const t = parseTime(value);
    if (t === null) return "—";
    const d = new Date(t);
    const sameDay = d.toDateString() === new Date().toDateString();
    return sameDay
      ? d.toLocaleTimeString()
      : d.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "medium" });
  }

  function formatPercent(p) {
    const value = Number(p) || 0;
    return `${Number.isInteger(value) ? value : value.toFixed(1)}%`;
  }

  function runDuration(run) {
    const start = parseTime(run.started_at);
    if (start === null) return null;
    const end = parseTime(run.completed_at);
    return (end === null ? Date.now() : end) - start;
  }

  function phaseLine(run) {
    const total = run.progress_total;
    const num = run.current_phase;
    const label = run.phase_label || "";
    const where = num && total ? `phase ${num}/${total}` : num ? `phase ${num}` : "";
    const named = [where, label].filter(Boolean).join(" · ");
    switch (run.status) {
      case "queued":
        return named && run.progress_current > 0 ? `waiting to resume at ${named}` : "waiting to start";
      case "completed":
        return total ? `all ${total} phase${total === 1 ? "" : "s"} done` : "done";
      case "failed":
        return named ? `failed at ${named}` : "failed";
      case "cancelled":
        return named ? `stopped at ${named}` : "cancelled";
      default:
        return named || "starting";
    }
  }

  function plural(n, word) {
    return `${n} ${word}${n === 1 ? "" : "s"}`;
  }

  /** FastAPI's `detail`: a string, or a list of validation errors. */
  function readableDetail(body, fallback) {
    const detail = body && typeof body === "object" ? body.detail : null;
    if (typeof detail === "string" && detail) return detail;
    if (Array.isArray(detail)) {
      const parts = detail.map((item) => {
        if (item && typeof item === "object") {
          const where = Array.isArray(item.loc) ? item.loc.filter((x) => x !== "body").join(".") : "";
          return where ? `${where}: ${item.msg}` : String(item.msg || JSON.stringify(item));
        }
        return String(item);
      });
      if (parts.length) return parts.join("; ");
    }
    if (detail && typeof detail === "object") return JSON.stringify(detail);
    return fallback;
  }

  // -- token and API calls ---------------------------------------------------

  function getToken() {
    try {
      return sessionStorage.getItem(TOKEN_KEY);
    } catch (_) {
      return null;
    }
  }

  function setToken(token) {
    try {
      if (token) sessionStorage.setItem(TOKEN_KEY, token);
      else sessionStorage.removeItem(TOKEN_KEY);
    } catch (_) {
      /* storage disabled: the token lives as long as the page */
    }
    memoryToken = token || null;
  }

  let memoryToken = null;
  let tokenWait = null;   // one shared promise while the token form is shown

  function currentToken() {
    return getToken() || memoryToken;
  }

  /** Show the token form (once, however many calls are waiting) and wait for it. */
  function askForToken(rejected) {
    if (!tokenWait) {
      const form = $('[data-testid="token-form"]');
      const error = $('[data-testid="token-error"]');
      const input = $('[data-testid="token-input"]');
      error.hidden = !rejected;
      setText(error, rejected ? "That token was not accepted. Please check it and try again." : "");
      form.hidden = false;
      setConnection("auth", "Waiting for the access token");
      input.value = "";
      input.focus();
      tokenWait = new Promise((resolve) => {
        form.addEventListener(
          "submit",
          function onSubmit(event) {
            event.preventDefault();
            const token = input.value.trim();
            if (!token) {
              error.hidden = false;
              setText(error, "Please enter the token.");
              form.addEventListener("submit", onSubmit, { once: true });
              return;
            }
            setToken(token);
            form.hidden = true;
            input.value = "";
            tokenWait = null;
            resolve(token);
          },
          { once: true },
        );
      });
    }
    return tokenWait;
  }

  /** fetch() with the bearer token; a 401 asks for the token and tries again. */
  async function api(path, options) {
    const opts = Object.assign({}, options || {});
    for (;;) {
      if (tokenWait) await tokenWait;
      const token = currentToken();
      const headers = new Headers(opts.headers || {});
      if (token) headers.set("Authorization", `Bearer ${token}`);
      if (!headers.has("Accept")) headers.set("Accept", "application/json");
      const response = await fetch(path, Object.assign({}, opts, { headers }));
      if (response.status !== 401) return response;
      const sent = token;
      // Another call may already have asked and got a new token: just retry.
      if (currentToken() && currentToken() !== sent) continue;
      if (sent) setToken(null);
      await askForToken(Boolean(sent));
    }
  }

  async function readJson(response) {
    try {
      return await response.json();
    } catch (_) {
      return null;
    }
  }

  // -- banner and connection status -------------------------------------------

  function showError(message) {
    const banner = $('[data-testid="error-banner"]');
    setText($(".banner-text", banner), message);
    banner.hidden = false;
  }

  function hideError() {
    $('[data-testid="error-banner"]').hidden = true;
  }

  function setConnection(kind, text) {
    const el = $('[data-testid="connection"]');
    el.dataset.state = kind;
    setText($(".connection-text", el), text);
  }

  // -- the run list ----------------------------------------------------------

  function isActive(run) {
    return ACTIVE.has(run.status);
  }

  /**
   * Record a run from any source and redraw what shows it. `sentAt` is when
   * the request that answered with it was sent (performance.now()); the
   * stream's runs need none.
   */
  function applyRun(run, source, sentAt) {
    if (!run || typeof run.id !== "number") return;
    const known = state.runs.get(run.id);
    if (source === "stream") {
      state.heard.set(run.id, performance.now());
      if (state.unconfirmed.delete(run.id)) scheduleRefresh();
    } else {
      // The stream spoke of this run after the request was sent: its copy is
      // the fresher, and a list or an answer read a moment earlier must not
      // move the progress back, nor bring a run that ended back to life.
      if (state.heard.has(run.id) && state.heard.get(run.id) >= sentAt) return;
      if (!isActive(run)) {
        state.unconfirmed.delete(run.id);
      } else if (!known || !isActive(known)) {
        // Come to life (created, resumed): the stream says so within a look
        // of the server's, unless it ended between two looks. Then only a
        // list read says how it ended.
        state.unconfirmed.set(run.id, performance.now());
        scheduleRefresh();
      }
    }
    state.runs.set(run.id, run);
    renderRow(run);
    renderSummary();
    if (state.selected === run.id) renderDetails();
    if (schedulesPanel && run.schedule_id !== null && run.schedule_id !== undefined) schedulesPanel.runSeen(run);
  }

  function renderList() {
    const list = $('[data-testid="run-list"]');
    const ids = [...state.runs.keys()].sort((a, b) => b - a);
    // Keep the existing row elements (no flicker, focus stays), only reorder.
    let previous = null;
    for (const id of ids) {
      const row = state.rows.get(id) || renderRow(state.runs.get(id));
      const expected = previous ? previous.nextSibling : list.firstChild;
      if (expected !== row.root) list.insertBefore(row.root, expected);
      previous = row.root;
    }
    for (const [id, row] of state.rows) {
      if (!state.runs.has(id)) {
        row.root.remove();
        state.rows.delete(id);
      }
    }
    $('[data-testid="runs-empty"]').hidden = !state.loaded || ids.length > 0;
    $('[data-testid="runs-loading"]').hidden = state.loaded || ids.length > 0;
    renderSummary();
  }

  function renderSummary() {
    const all = [...state.runs.values()];
    const active = all.filter(isActive).length;
    setText(
      $('[data-testid="runs-summary"]'),
      all.length ? `${plural(all.length, "run")}${active ? ` · ${active} active` : ""}` : "",
    );
  }

  function buildRow(id) {
    const r = {};
    r.title = h("button", { type: "button", className: "run-title", "data-testid": `run-open-${id}` }, `Run #${id}`);
    r.status = h("span", { className: "badge", "data-testid": `run-status-${id}` });
    r.pipeline = h("span", { className: "run-pipeline muted small", "data-testid": `run-pipeline-${id}` });
    r.schedule = h("span", { className: "pill pill-schedule", "data-testid": `run-schedule-${id}` });
    r.duration = h("span", { className: "run-duration muted", "data-testid": `run-duration-${id}`, title: "Duration" });
    r.cancel = h("button", {
      type: "button",
      className: "button small",
      "data-testid": `cancel-${id}`,
      onclick: (e) => { e.stopPropagation(); act(id, "cancel"); },
    }, "Cancel");
    r.resume = h("button", {
      type: "button",
      className: "button small",
      "data-testid": `resume-${id}`,
      onclick: (e) => { e.stopPropagation(); act(id, "resume"); },
    }, "Resume");
    r.phase = h("span", { className: "run-phase", "data-testid": `run-phase-${id}` });
    r.sub = h("span", { className: "run-sub muted", "data-testid": `run-subtext-${id}` });
    r.fill = h("span", { className: "bar-fill" });
    r.bar = h("div", {
      className: "bar",
      role: "progressbar",
      "aria-label": `Run ${id} overall progress`,
      "aria-valuemin": "0",
      "aria-valuemax": "100",
      "data-testid": `run-progress-${id}`,
    }, r.fill);
    r.percent = h("span", { className: "bar-label", "data-testid": `run-percent-${id}` });
    r.subFill = h("span", { className: "bar-fill" });
    r.subBar = h("div", {
      className: "bar bar-sub",
      role: "progressbar",
      "aria-label": `Run ${id} progress in the current phase`,
      "aria-valuemin": "0",
      "data-testid": `run-subprogress-${id}`,
    }, r.subFill);
    r.warnings = h("span", { className: "pill pill-warn", "data-testid": `run-warnings-${id}` });
    r.error = h("span", { className: "run-error", "data-testid": `run-error-${id}` });
    r.meta = h("div", { className: "run-meta" }, r.warnings, r.error);
    r.root = h(
      "li",
      { className: "run-row", "data-testid": `run-row-${id}`, "data-run-id": id },
      h("div", { className: "run-head" },
        h("div", { className: "run-name" }, r.title, r.pipeline, r.status, r.schedule),
        h("div", { className: "run-side" }, r.duration, r.cancel, r.resume)),
      h("div", { className: "run-line" }, r.phase, r.sub),
      h("div", { className: "bar-row" }, r.bar, r.percent),
      r.subBar,
      r.meta,
    );
    r.root.addEventListener("click", () => select(id));
    state.rows.set(id, r);
    return r;
  }

  function renderRow(run) {
    const id = run.id;
    const isNew = !state.rows.has(id);
    const r = state.rows.get(id) || buildRow(id);
    const percent = Math.max(0, Math.min(100, Number(run.percent) || 0));

    r.root.dataset.status = run.status;
    r.root.classList.toggle("selected", state.selected === id);
    r.title.setAttribute("aria-pressed", String(state.selected === id));

    setText(r.status, run.status);
    setText(r.pipeline, run.pipeline || "");
    const startedBy = scheduleLabel(run.schedule_id);
    r.schedule.hidden = !startedBy;
    setText(r.schedule, startedBy);
    if (startedBy) r.schedule.title = `Started by ${startedBy}`;
    else r.schedule.removeAttribute("title");
    r.status.className = `badge badge-${run.status}`;
    r.status.dataset.status = run.status;

    const cancelling = run.status === "running" && Boolean(run.cancel_requested_at);
    setText(r.phase, cancelling ? `${phaseLine(run)} · cancelling…` : phaseLine(run));

    const showSub = run.status === "running" && run.phase_progress_total;
    if (run.status === "running" && run.phase_progress_current !== null && run.phase_progress_current !== undefined) {
      setText(r.sub, run.phase_progress_total
        ? `${run.phase_progress_current} of ${run.phase_progress_total}`
        : `step ${run.phase_progress_current}`);
    } else {
      setText(r.sub, "");
    }
    r.subBar.hidden = !showSub;
    if (showSub) {
      const cur = Math.max(0, Math.min(run.phase_progress_total, run.phase_progress_current || 0));
      r.subFill.style.width = `${(100 * cur) / run.phase_progress_total}%`;
      r.subBar.setAttribute("aria-valuemax", String(run.phase_progress_total));
      r.subBar.setAttribute("aria-valuenow", String(cur));
      r.subBar.dataset.current = String(cur);
      r.subBar.dataset.total = String(run.phase_progress_total);
    }

    r.fill.style.width = `${percent}%`;
    r.bar.setAttribute("aria-valuenow", String(percent));
    r.bar.setAttribute("aria-valuetext", formatPercent(percent));
    r.bar.dataset.percent = String(percent);
    r.bar.dataset.status = run.status;
    setText(r.percent, formatPercent(percent));

    const warnCount = (run.warnings || []).length;
    r.warnings.hidden = warnCount === 0;
    setText(r.warnings, warnCount ? plural(warnCount, "warning") : "");
    r.error.hidden = !run.error_message;
    setText(r.error, run.error_message || "");
    r.meta.hidden = warnCount === 0 && !run.error_message;

    r.cancel.hidden = !isActive(run);
    r.cancel.disabled = cancelling || state.pending.has(`cancel-${id}`);
    setText(r.cancel, cancelling ? "Cancelling…" : "Cancel");
    r.resume.hidden = !(run.status === "failed" || run.status === "cancelled");
    r.resume.disabled = state.pending.has(`resume-${id}`);

    updateDuration(run, r);
    if (isNew) renderList();
    return r;
  }

  function updateDuration(run, r) {
    const ms = runDuration(run);
    const text = ms === null ? "" : formatDuration(ms);
    setText(r.duration, text);
    r.duration.hidden = ms === null;
  }

  function tick() {
    for (const [id, run] of state.runs) {
      if (run.status === "running") {
        const r = state.rows.get(id);
        if (r) updateDuration(run, r);
      }
    }
    const run = state.runs.get(state.selected);
    if (run && run.status === "running") {
      const el = $('[data-testid="details-duration"]');
      if (el) setText(el, formatDuration(runDuration(run)));
    }
  }

  // -- details -----------------------------------------------------------------

  /** Show a run's details; clicking the selected run again closes them. */
  function select(id, only) {
    state.selected = state.selected === id && !only ? null : id;
    for (const [rid, row] of state.rows) {
      row.root.classList.toggle("selected", rid === state.selected);
      row.title.setAttribute("aria-pressed", String(rid === state.selected));
    }
    state.detailsKey = "";
    renderDetails();
  }

  function fact(label, value, testid) {
    return h("div", { className: "fact" },
      h("dt", {}, label),
      h("dd", { "data-testid": testid || null }, value));
  }

  function renderDetails() {
    const panel = $('[data-testid="run-details"]');
    const run = state.selected === null ? null : state.runs.get(state.selected);
    const key = run ? JSON.stringify(run) + [...state.pending].join(",") + scheduleLabel(run.schedule_id) : "";
    if (key === state.detailsKey && panel.firstChild) return;
    state.detailsKey = key;
    panel.classList.toggle("is-empty", !run);
    if (!run) {
      panel.replaceChildren(
        h("p", { className: "empty details-empty" }, "Select a run to see its phases, warnings and parameters."),
      );
      return;
    }
    const id = run.id;
    const ms = runDuration(run);
    const actions = detailsActions(run);
    const children = [
      h("div", { className: "details-head" },
        h("div", { className: "run-name" },
          h("h2", { className: "card-title", "data-testid": "details-title" }, `Run #${id}`),
          h("span", { className: `badge badge-${run.status}`, "data-testid": "details-status" }, run.status)),
        actions),
      h("p", { className: "muted details-phase" }, phaseLine(run)),
      h("dl", { className: "facts" },
        fact("Created", formatTime(run.created_at)),
        fact("Started", formatTime(run.started_at)),
        fact("Finished", formatTime(run.completed_at)),
        fact("Duration", ms === null ? "—" : formatDuration(ms), "details-duration"),
        fact("Progress", formatPercent(run.percent), "details-percent"),
        run.schedule_id === null || run.schedule_id === undefined
          ? null
          : fact("Started by", scheduleLabel(run.schedule_id), "details-schedule")),
    ];
    if (run.error_message) {
      children.push(h("div", { className: "callout callout-error", "data-testid": "details-error" },
        h("strong", {}, "Error"), h("p", {}, run.error_message)));
    }

    children.push(h("h3", { className: "section-title" }, "Phases"));
    const phases = run.phases || [];
    if (!phases.length) {
      children.push(h("p", { className: "muted" }, "No phases recorded."));
    } else {
      children.push(h("ol", { className: "phases", "data-testid": "details-phases" },
        phases.map((p) => {
          const current = run.status === "running" && p.num === run.current_phase;
          const sub = current && run.phase_progress_current !== null && run.phase_progress_current !== undefined
            ? ` · ${run.phase_progress_current}${run.phase_progress_total ? ` of ${run.phase_progress_total}` : ""}`
            : "";
          return h("li", {
            className: `phase phase-${p.status}${current ? " phase-current" : ""}`,
            "data-testid": `phase-${p.num}`,
            "data-status": p.status,
          },
          h("span", { className: "phase-num", "aria-hidden": "true" }, String(p.num)),
          h("div", { className: "phase-main" },
            h("div", { className: "phase-top" },
              h("span", { className: "phase-label" }, p.label),
              h("span", { className: `badge badge-${p.status} badge-small` }, p.status),
              p.attempts > 1
                ? h("span", { className: "pill", title: `${p.attempts} attempts`, "data-testid": `phase-attempts-${p.num}` }, `×${p.attempts}`)
                : null),
            h("div", { className: "phase-times muted small" },
              p.started_at ? `started ${formatTime(p.started_at)}` : "not started",
              p.finished_at ? ` · finished ${formatTime(p.finished_at)}` : "",
              p.duration_ms !== null && p.duration_ms !== undefined ? ` · ${formatDuration(p.duration_ms)}` : "",
              sub)));
        })));
    }

    if (phases.length) {
      children.push(h("h3", { className: "section-title" }, "Timeline"));
      children.push(window.PipelineRender.timeline(phases, formatDuration, Date.now()));
    }

    const published = run.artifacts || [];
    if (published.length) {
      children.push(h("h3", { className: "section-title" }, "Report"));
      children.push(h("div", { className: "artifacts", "data-testid": "details-artifacts" },
        published.map((a) => renderArtifact(run.id, a))));
    }

    const warnings = run.warnings || [];
    children.push(h("h3", { className: "section-title" }, `Warnings${warnings.length ? ` (${warnings.length})` : ""}`));
    if (!warnings.length) {
      children.push(h("p", { className: "muted" }, "None."));
    } else {
      children.push(h("ul", { className: "warnings", "data-testid": "details-warnings" },
        warnings.map((w) => h("li", { className: "warning" },
          h("span", { className: "pill pill-warn" }, w.phase === null || w.phase === undefined ? "run" : `phase ${w.phase}`),
          h("span", {}, w.message)))));
    }

    children.push(h("h3", { className: "section-title" }, "Parameters"));
    children.push(h("pre", { className: "code", "data-testid": "details-params" },
      JSON.stringify(run.params || {}, null, 2)));
    children.push(h("button", {
      type: "button",
      className: "button small",
      "data-testid": "run-again",
      onclick: () => runAgain(run),
    }, "Run again"));
    panel.replaceChildren(...children);
  }

  /** One artifact: its title and its renderer's output, once its data has arrived. */
  function renderArtifact(runId, summary) {
    const id = `${runId}/${summary.key}`;
    const section = h("section", {
      className: `artifact artifact-${summary.kind}`, "data-testid": `artifact-${summary.key}`, "data-kind": summary.kind,
    }, h("h4", { className: "artifact-title" }, summary.title || summary.key));
    const loaded = state.artifacts.get(id);
    if (!loaded) {
      section.append(h("p", { className: "muted small" }, "Loading…"));
      loadArtifact(runId, summary.key);
    } else if (loaded.failed) {
      section.append(h("p", { className: "muted small" }, "This artifact could not be loaded."));
    } else if (loaded.kind === "markdown") {
      section.append(window.PipelineRender.markdown(loaded.data));
    } else if (loaded.kind === "table") {
      if (!state.sorts.has(id)) state.sorts.set(id, { column: null, descending: false });
      section.append(window.PipelineRender.table(loaded.data, state.sorts.get(id)));
    } else {
      section.append(window.PipelineRender.chart(loaded.data));
    }
    return section;
  }

  const loadingArtifacts = new Set();

  async function loadArtifact(runId, key) {
    const id = `${runId}/${key}`;
    if (loadingArtifacts.has(id)) return;
    loadingArtifacts.add(id);
    try {
      const response = await api(`runs/${runId}/artifacts/${encodeURIComponent(key)}`);
      state.artifacts.set(id, response.ok ? await readJson(response) : { failed: true });
    } catch (err) {
      state.artifacts.set(id, { failed: true });
    } finally {
      loadingArtifacts.delete(id);
    }
    if (state.selected === runId) {
      state.detailsKey = "";
      renderDetails();
    }
  }

  /** The details' buttons: kept (same elements) while they would not change, so a
   *  click is never lost to a redraw caused by progress. */
  let actionsCache = { key: "", el: null };

  function detailsActions(run) {
    const id = run.id;
    const key = [id, run.status, run.cancel_requested_at, state.pending.has(`cancel-${id}`), state.pending.has(`resume-${id}`)].join("|");
    if (actionsCache.key === key && actionsCache.el) return actionsCache.el;
    const actions = h("div", { className: "details-actions" });
    if (isActive(run)) {
      const cancelling = Boolean(run.cancel_requested_at);
      actions.append(h("button", {
        type: "button", className: "button small", "data-testid": `details-cancel-${id}`,
        disabled: cancelling || state.pending.has(`cancel-${id}`), onclick: () => act(id, "cancel"),
      }, cancelling ? "Cancelling…" : "Cancel"));
    }
    if (run.status === "failed" || run.status === "cancelled") {
      actions.append(h("button", {
        type: "button", className: "button small", "data-testid": `details-resume-${id}`,
        disabled: state.pending.has(`resume-${id}`), onclick: () => act(id, "resume"),
      }, "Resume"));
    }
    actions.append(h("button", {
      type: "button", className: "button small quiet", "aria-label": "Close details",
      onclick: () => select(id),
    }, "Close"));
    actionsCache = { key, el: actions };
    return actions;
  }

  // -- actions -----------------------------------------------------------------

  async function act(id, action) {
    const key = `${action}-${id}`;
    if (state.pending.has(key)) return;
    state.pending.add(key);
    refreshRun(id);
    try {
      const sentAt = performance.now();
      const response = await api(`runs/${id}/${action}`, { method: "POST" });
      const body = await readJson(response);
      if (response.ok) {
        hideError();
        applyRun(body, "action", sentAt);
      } else {
        const what = action === "cancel" ? "cancel" : "resume";
        showError(`Could not ${what} run #${id}: ${readableDetail(body, `the server answered ${response.status}`)}`);
        if (response.status === 404) forget(id);
        else refreshOne(id);
      }
    } catch (err) {
      showError(`Could not reach the server to ${action} run #${id}. Is it still running?`);
    } finally {
      state.pending.delete(key);
      refreshRun(id);
    }
  }

  function refreshRun(id) {
    const run = state.runs.get(id);
    if (run) renderRow(run);
    if (state.selected === id) renderDetails();
  }

  function forget(id) {
    state.runs.delete(id);
    state.heard.delete(id);
    state.unconfirmed.delete(id);
    if (state.selected === id) state.selected = null;
    renderList();
    renderDetails();
  }

  async function refreshOne(id) {
    try {
      const sentAt = performance.now();
      const response = await api(`runs/${id}`);
      if (response.ok) applyRun(await readJson(response), "get", sentAt);
      else if (response.status === 404) forget(id);
    } catch (_) {
      /* the next list refresh will catch up */
    }
  }

  async function startRun(event) {
    event.preventDefault();
    const button = $('[data-testid="start-button"]');
    const read = startForm.read();
    if (!read.ok) {
      startForm.showError(read.message);
      return;
    }

    button.disabled = true;
    setText(button, "Starting…");
    try {
      const params = read.params;
      const sentAt = performance.now();
      const response = await api("runs", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(pipelines.selected ? { pipeline: pipelines.selected, params } : { params }),
      });
      const body = await readJson(response);
      if (response.ok) {
        hideError();
        applyRun(body, "create", sentAt);
        select(body.id, true);
      } else if (response.status === 422 && body && Array.isArray(body.detail)) {
        const rest = startForm.showFieldErrors(body.detail);
        if (rest.length) startForm.showError(`The server rejected the parameters: ${rest.join("; ")}`);
      } else if (response.status === 422) {
        startForm.showError(`The server rejected the parameters: ${readableDetail(body, "they are not valid")}`);
      } else {
        showError(`Could not start a run: ${readableDetail(body, `the server answered ${response.status}`)}`);
      }
    } catch (_) {
      showError("Could not reach the server to start a run. Is it still running?");
    } finally {
      button.disabled = false;
      setText(button, "Start run");
    }
  }

  // -- pipelines and the params form -------------------------------------------------

  const pipelines = { items: [], selected: null };

  /** The JSON Schema of one property without its "or null" (pydantic's Optional). */
  function baseSchema(prop) {
    if (prop && Array.isArray(prop.anyOf)) {
      const real = prop.anyOf.filter((p) => p && p.type !== "null");
      if (real.length === 1) return Object.assign({}, real[0], { default: prop.default, description: prop.description });
    }
    return prop || {};
  }

  /** One input for one property; ids and test ids start with `prefix` ("param-limit"). */
  function buildField(prefix, name, prop, required) {
    const schema = baseSchema(prop);
    const id = `${prefix}-${name}`;
    const help = schema.description || prop.description || "";
    let input;
    if (Array.isArray(schema.enum)) {
      input = h("select", { id, "data-testid": id },
        required ? null : h("option", { value: "" }, "(default)"),
        schema.enum.map((value, i) => h("option", { value: String(i) }, String(value))));
      if (schema.default !== undefined) {
        const index = schema.enum.indexOf(schema.default);
        if (index >= 0) input.value = String(index);
      }
    } else if (schema.type === "boolean") {
      input = h("input", { id, type: "checkbox", "data-testid": id });
      input.checked = schema.default === true;
    } else if (schema.type === "integer" || schema.type === "number") {
      input = h("input", {
        id,
        type: "number",
        "data-testid": id,
        min: schema.minimum ?? schema.exclusiveMinimum,
        max: schema.maximum ?? schema.exclusiveMaximum,
        step: schema.type === "integer" ? "1" : "any",
      });
      if (schema.default !== undefined && schema.default !== null) input.value = String(schema.default);
    } else {
      input = h("input", { id, type: "text", "data-testid": id, spellcheck: "false" });
      if (typeof schema.default === "string") input.value = schema.default;
    }
    const error = h("p", { className: "field-error", "data-testid": `${prefix}-error-${name}`, role: "alert", id: `${id}-error` });
    error.hidden = true;
    input.setAttribute("aria-describedby", `${id}-help ${id}-error`);
    const root = h("div", { className: "param-field" },
      h("label", { for: id }, schema.title || prop.title || name, required ? " *" : ""),
      input,
      help ? h("p", { className: "muted small", id: `${id}-help` }, help) : null,
      error);
    return { name, schema, input, error, root, required };
  }

  function fieldValue(field) {
    const { schema, input } = field;
    if (Array.isArray(schema.enum)) return input.value === "" ? undefined : schema.enum[Number(input.value)];
    if (schema.type === "boolean") return input.checked;
    const raw = input.value.trim();
    if (raw === "") return undefined;
    if (schema.type === "integer" || schema.type === "number") {
      const number = Number(raw);
      return Number.isFinite(number) ? number : raw;  // the server says what is wrong with it
    }
    return input.value;
  }

  /**
   * A params form built from a pipeline's JSON Schema, with its "advanced" JSON
   * box: used by the start form and by the new-schedule form. `holder` gets the
   * fields, `advanced` is the <details> around `textarea`, `error` shows what
   * no field shows; field ids and test ids start with `prefix`.
   */
  function paramsForm({ holder, advanced, textarea, error, prefix }) {
    let fields = [];

    function usingForm() {
      return fields.length > 0 && !advanced.open;
    }

    /** {ok: true, params} or {ok: false, message}, before anything is sent. */
    function read() {
      clearErrors();
      if (usingForm()) {
        const params = {};
        for (const field of fields) {
          const value = fieldValue(field);
          if (value !== undefined) params[field.name] = value;
        }
        return { ok: true, params };
      }
      let params;
      try {
        params = JSON.parse(textarea.value.trim() || "{}");
      } catch (err) {
        return { ok: false, message: `The parameters are not valid JSON (${err.message}). Use an object such as {"subreddit": "python"}.` };
      }
      if (params === null || typeof params !== "object" || Array.isArray(params)) {
        const kind = params === null ? "null" : Array.isArray(params) ? "a list" : `a ${typeof params}`;
        return { ok: false, message: `The parameters must be a JSON object like {"key": "value"}, not ${kind}.` };
      }
      return { ok: true, params };
    }

    function showError(message) {
      setText(error, message);
      error.hidden = false;
      textarea.setAttribute("aria-invalid", "true");
    }

    function clearErrors() {
      error.hidden = true;
      textarea.removeAttribute("aria-invalid");
      for (const field of fields) {
        field.error.hidden = true;
        field.input.removeAttribute("aria-invalid");
      }
    }

    /** Shows each error next to its field; returns the messages no field shows. */
    function showFieldErrors(detail) {
      const rest = [];
      for (const item of detail) {
        const loc = Array.isArray(item.loc) ? item.loc : [];
        const name = loc[0] === "body" && loc[1] === "params" ? loc[2] : undefined;
        const field = usingForm() ? fields.find((f) => f.name === name) : undefined;
        const message = String(item.msg || "invalid");
        if (field) {
          setText(field.error, message);
          field.error.hidden = false;
          field.input.setAttribute("aria-invalid", "true");
        } else {
          rest.push(name !== undefined ? `${loc.slice(2).join(".")}: ${message}` : message);
        }
      }
      return rest;
    }

    /** The fields of `pipeline` (an item of GET /pipelines), or none. */
    function render(pipeline) {
      holder.replaceChildren();
      fields = [];
      const schema = pipeline && pipeline.params_schema;
      const props = schema && schema.properties ? schema.properties : {};
      const required = new Set((schema && schema.required) || []);
      for (const [name, prop] of Object.entries(props)) {
        const field = buildField(prefix, name, prop || {}, required.has(name));
        fields.push(field);
        holder.append(field.root);
      }
      holder.hidden = fields.length === 0;
      advanced.querySelector("summary").hidden = fields.length === 0;
      advanced.open = fields.length === 0;
      clearErrors();
    }

    /** Puts `params` in the fields and the JSON box; what the fields cannot hold opens the box. */
    function fill(params) {
      const known = new Set(fields.map((f) => f.name));
      const fits = Object.keys(params).every((key) => known.has(key));
      for (const field of fields) {
        const value = params[field.name];
        if (Array.isArray(field.schema.enum)) field.input.value = value === undefined ? "" : String(field.schema.enum.indexOf(value));
        else if (field.schema.type === "boolean") field.input.checked = value === true;
        else field.input.value = value === undefined || value === null ? "" : String(value);
      }
      textarea.value = JSON.stringify(params);
      if (fields.length && !fits) advanced.open = true;
      return fits;
    }

    function firstInput() {
      return usingForm() ? fields[0].input : textarea;
    }

    return { read, showError, clearErrors, showFieldErrors, render, fill, firstInput, usingForm };
  }

  let startForm = null;  // the start form's params form, made in init()

  function renderPipeline(name) {
    const chosen = pipelines.items.find((p) => p.name === name);
    setText($('[data-testid="pipeline-description"]'), chosen ? chosen.description || "" : "");
    startForm.render(chosen);
  }

  /** Opens the start form on a run's pipeline, filled with its params. */
  function runAgain(run) {
    const params = run.params || {};
    if (pipelines.items.some((p) => p.name === run.pipeline)) {
      if (pipelines.items.length > 1) {
        $('[data-testid="pipeline-select"]').value = run.pipeline;
        pipelines.selected = run.pipeline;
      }
      renderPipeline(run.pipeline);
    }
    startForm.fill(params);
    const form = $('[data-testid="start-form"]');
    form.scrollIntoView({ block: "nearest" });
    startForm.firstInput().focus();
  }

  async function loadPipelines() {
    try {
      const response = await api("pipelines");
      if (!response.ok) return [];
      const body = await readJson(response);
      pipelines.items = (body && body.items) || [];
    } catch (_) {
      return [];
    }
    const picker = $('[data-testid="pipeline-select"]');
    picker.replaceChildren(...pipelines.items.map((p) => h("option", { value: p.name }, p.name)));
    const several = pipelines.items.length > 1;
    $('[data-testid="pipeline-picker"]').hidden = !several;
    // With one pipeline the request leaves it out (the server knows which).
    pipelines.selected = several ? pipelines.items[0].name : null;
    picker.addEventListener("change", () => {
      pipelines.selected = picker.value;
      renderPipeline(picker.value);
    });
    if (pipelines.items.length) renderPipeline(pipelines.items[0].name);
    return pipelines.items;
  }

  // -- schedules (the panel itself is schedules.js) -----------------------------------

  let schedulesPanel = null;  // what window.PipelineSchedules.start() returned

  /** "schedule nightly" for a run a schedule started, "" for the others. */
  function scheduleLabel(scheduleId) {
    if (scheduleId === null || scheduleId === undefined) return "";
    return schedulesPanel ? schedulesPanel.label(scheduleId) : `schedule #${scheduleId}`;
  }

  /** The schedules were (re)loaded: redraw what names them. */
  function schedulesChanged() {
    for (const run of state.runs.values()) {
      if (run.schedule_id !== null && run.schedule_id !== undefined) renderRow(run);
    }
    if (state.selected !== null) renderDetails();
  }

  async function openRun(id) {
    if (!state.runs.has(id)) await refreshOne(id);
    if (!state.runs.has(id)) return;
    if (state.selected !== id) select(id, true);
    const row = state.rows.get(id);
    if (row) row.root.scrollIntoView({ block: "nearest" });
  }

  function startSchedules(pipelinesLoaded) {
    if (!window.PipelineSchedules) return;
    schedulesPanel = window.PipelineSchedules.start({
      $, h, setText, api, readJson, readableDetail, parseTime, plural, showError, hideError,
      paramsForm,
      pipelines: () => pipelines.items,
      pipelinesLoaded,
      runStatus: (id) => (state.runs.has(id) ? state.runs.get(id).status : null),
      openRun,
      changed: schedulesChanged,
    });
  }

  // -- live updates --------------------------------------------------------------

  let events = null;  // what window.PipelineEvents.follow() returned

  function streamOpen() {
    return Boolean(events && events.isOpen());
  }

  function startEvents() {
    events = window.PipelineEvents.follow({
      api,
      onRun: (run) => {
        applyRun(run, "stream");
        setConnection("live", `Live · updated ${new Date().toLocaleTimeString()}`);
      },
      onOpen: () => {
        setConnection("live", `Live · updated ${new Date().toLocaleTimeString()}`);
        // The first time too: a run may have ended between the first list and
        // the stream's start, and the stream sends only the runs live now.
        refreshList();
      },
      onDown: () => {
        setConnection("offline", "Live updates interrupted · reconnecting…");
        scheduleRefresh();
      },
    });
  }

  let refreshTimer = null;
  let refreshing = null;    // the list request in flight
  let refreshAgain = false; // asked for while one was in flight: read it once more after
  let listReadAt = 0;       // when the last list read ended

  /** (Re)sets the timer of the next list read, from what the page knows now. */
  function scheduleRefresh() {
    if (refreshing) return;  // set again when the read in flight ends
    clearTimeout(refreshTimer);
    let due = listReadAt + (streamOpen() ? REFRESH_MS : DOWN_REFRESH_MS);
    // Not sooner than CONFIRM_MS after the last read either: a server that does
    // not answer is not asked again at once.
    for (const since of state.unconfirmed.values()) due = Math.min(due, Math.max(since, listReadAt) + CONFIRM_MS);
    refreshTimer = setTimeout(refreshList, Math.max(0, due - performance.now()));
  }

  /** Reads the list; asked while a read is in flight, reads it again once that one ends. */
  function refreshList() {
    if (refreshing) {
      refreshAgain = true;
      return refreshing;
    }
    clearTimeout(refreshTimer);
    refreshing = readList().finally(() => {
      refreshing = null;
      listReadAt = performance.now();
      if (refreshAgain) {
        refreshAgain = false;
        refreshList();
      } else {
        scheduleRefresh();
      }
    });
    return refreshing;
  }

  async function readList() {
    try {
      const sentAt = performance.now();
      const response = await api(`runs?limit=${LIST_LIMIT}`);
      if (!response.ok) {
        const body = await readJson(response);
        throw new Error(readableDetail(body, `the server answered ${response.status}`));
      }
      const page = await readJson(response);
      const seen = new Set();
      for (const run of page.items || []) {
        seen.add(run.id);
        applyRun(run, "list", sentAt);
      }
      // Read after they came to life: what this list says of them is what there is to know.
      for (const [id, since] of state.unconfirmed) {
        if (since <= sentAt) state.unconfirmed.delete(id);
      }
      // Runs that fell off the first page stay only while they are selected or active.
      for (const [id, run] of state.runs) {
        if (!seen.has(id) && id !== state.selected && !isActive(run) && state.runs.size > LIST_LIMIT) {
          state.runs.delete(id);
          state.heard.delete(id);
        }
      }
      state.loaded = true;
      renderList();
      if (streamOpen()) setConnection("live", `Live · updated ${new Date().toLocaleTimeString()}`);
    } catch (err) {
      setConnection("offline", "Cannot reach the server · retrying");
    }
  }

  // -- start -----------------------------------------------------------------------

  function init() {
    memoryToken = getToken();
    startForm = paramsForm({
      holder: $('[data-testid="params-form"]'),
      advanced: $('[data-testid="params-advanced"]'),
      textarea: $('[data-testid="params-input"]'),
      error: $('[data-testid="params-error"]'),
      prefix: "param",
    });
    $('[data-testid="start-form"]').addEventListener("submit", startRun);
    $(".banner-close").addEventListener("click", hideError);
    $('[data-testid="params-input"]').addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
        event.preventDefault();
        $('[data-testid="start-form"]').requestSubmit();
      }
    });
    document.addEventListener("keydown", (event) => {
      if (event.key === "Escape" && state.selected !== null && !event.target.closest("form")) select(state.selected);
    });
    setInterval(tick, 1000);
    refreshList();
    startEvents();
    startSchedules(loadPipelines());
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
