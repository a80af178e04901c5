/* analysis-pipeline dashboard: the schedules panel.
 *
 * GET /schedules fills the list, again every few seconds (next fire time,
 * last run) and soon after the run list shows a run a schedule started that
 * this panel has not seen yet. Times are shown in the viewer's zone and in
 * the schedule's own (Intl.DateTimeFormat). app.js starts it with its helpers
 * (fetch with the token, the params form, opening a run); everything the
 * server says goes on the page with textContent, never as HTML.
 */
"use strict";

(function () {
  const REFRESH_MS = 5000;
  const SOON_MS = 250;
  const FIELDS = ["name", "pipeline", "cron", "timezone", "overlap", "catch_up"];
  const WHEN = { weekday: "short", year: "numeric", month: "short", day: "numeric", hour: "numeric", minute: "2-digit" };

  /** The viewer's IANA zone, or null where the browser does not say. */
  function viewerZone() {
    try {
      return Intl.DateTimeFormat().resolvedOptions().timeZone || null;
    } catch (_) {
      return null;
    }
  }

  const formatters = new Map();

  /** `t` (ms) as a wall time in `zone` (the viewer's when null), or null if the zone is unknown here. */
  function wallTime(t, zone, withZoneName) {
    const key = `${zone || ""}|${withZoneName ? 1 : 0}`;
    if (!formatters.has(key)) {
      const options = Object.assign({}, WHEN);
      if (zone) options.timeZone = zone;
      if (withZoneName) options.timeZoneName = "short";
      let format = null;
      try {
        format = new Intl.DateTimeFormat(undefined, options);
      } catch (_) {
        /* a zone this browser does not know */
      }
      formatters.set(key, format);
    }
    const format = formatters.get(key);
    return format ? format.format(new Date(t)) : null;
  }

  function start(kit) {
    const { $, h, setText, api, readJson, readableDetail, parseTime, plural } = kit;
    const state = {
      items: new Map(),     // id -> Schedule JSON
      rows: new Map(),      // id -> row elements
      loaded: false,
      pending: new Set(),   // "toggle-3", "delete-3": requests in flight
      confirming: null,     // the id whose delete waits for a second click
      timer: null,
      soon: null,
      timezonesFilled: false,
      askedFor: new Set(),  // runs that already asked for an early refresh
    };

    // -- what the run list shows ---------------------------------------------

    function label(id) {
      const schedule = state.items.get(id);
      if (schedule) return `schedule ${schedule.name}`;
      return state.loaded ? `deleted schedule #${id}` : `schedule #${id}`;
    }

    /** A run a schedule started arrived in the run list: its status, or a refresh. */
    function runSeen(run) {
      const schedule = state.items.get(run.schedule_id);
      const known = schedule && schedule.last_run && schedule.last_run.id >= run.id;
      if (known) {
        if (schedule.last_run.id === run.id) renderRow(schedule);
      } else if (!state.askedFor.has(run.id)) {
        state.askedFor.add(run.id);
        refreshSoon();
      }
    }

    // -- the list --------------------------------------------------------------

    function refreshSoon() {
      if (state.soon !== null) return;
      state.soon = setTimeout(() => {
        state.soon = null;
        refresh();
      }, SOON_MS);
    }

    async function refresh() {
      clearTimeout(state.timer);
      try {
        const response = await api("schedules");
        if (response.ok) {
          const body = await readJson(response);
          const items = (body && body.items) || [];
          state.items = new Map(items.map((s) => [s.id, s]));
          state.loaded = true;
          renderList();
          kit.changed();
        }
      } catch (_) {
        /* the run list's status line says the server is unreachable; try again later */
      }
      state.timer = setTimeout(refresh, REFRESH_MS);
    }

    function applySchedule(schedule) {
      state.items.set(schedule.id, schedule);
      renderList();
      kit.changed();
    }

    function renderList() {
      const list = $('[data-testid="schedule-list"]');
      const items = [...state.items.values()].sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
      let previous = null;
      for (const schedule of items) {
        const row = renderRow(schedule);
        const expected = previous ? previous.nextSibling : list.firstChild;
        if (expected !== row.root) list.insertBefore(row.root, expected);
        previous = row.root;
      }
      for (const [id, row] of state.rows) {
        if (!state.items.has(id)) {
          row.root.remove();
          state.rows.delete(id);
        }
      }
      $('[data-testid="schedules-loading"]').hidden = state.loaded || items.length > 0;
      $('[data-testid="schedules-empty"]').hidden = !state.loaded || items.length > 0;
      const paused = items.filter((s) => !s.enabled).length;
      setText($('[data-testid="schedules-summary"]'),
        items.length ? `${plural(items.length, "schedule")}${paused ? ` · ${paused} paused` : ""}` : "");
    }

    function buildRow(id) {
      const r = {};
      r.name = h("span", { className: "schedule-name", "data-testid": `schedule-name-${id}` });
      r.pipeline = h("span", { className: "run-pipeline muted small", "data-testid": `schedule-pipeline-${id}` });
      r.state = h("span", { className: "badge", "data-testid": `schedule-state-${id}` });
      r.toggle = h("button", {
        type: "button", className: "button small", "data-testid": `schedule-toggle-${id}`,
        onclick: () => toggle(id),
      });
      r.remove = h("button", {
        type: "button", className: "button small quiet", "data-testid": `schedule-delete-${id}`,
        onclick: () => { state.confirming = id; rerender(id); r.keep.focus(); },
      }, "Delete");
      r.actions = h("div", { className: "run-side" }, r.toggle, r.remove);
      r.confirm = h("button", {
        type: "button", className: "button small danger", "data-testid": `schedule-delete-confirm-${id}`,
        onclick: () => remove(id),
      }, "Delete");
      r.keep = h("button", {
        type: "button", className: "button small", "data-testid": `schedule-delete-keep-${id}`,
        onclick: () => { state.confirming = null; rerender(id); r.remove.focus(); },
      }, "Keep");
      r.confirmText = h("span", { className: "small" });
      r.confirmBox = h("div", { className: "run-side schedule-confirm", role: "group" }, r.confirmText, r.confirm, r.keep);

      r.cronText = h("span", { "data-testid": `schedule-cron-text-${id}` });
      r.cron = h("code", { className: "cron", "data-testid": `schedule-cron-${id}` });
      r.zone = h("span", { className: "muted", "data-testid": `schedule-timezone-${id}` });
      r.policy = h("span", { className: "muted small", "data-testid": `schedule-policy-${id}` });

      r.nextZone = h("time", { "data-testid": `schedule-next-zone-${id}` });
      r.nextLocal = h("time", { className: "muted", "data-testid": `schedule-next-local-${id}` });
      r.next = h("dd", { className: "schedule-next", "data-testid": `schedule-next-${id}` }, r.nextZone, r.nextLocal);

      r.lastOpen = h("button", {
        type: "button", className: "run-title", "data-testid": `schedule-last-run-open-${id}`,
        onclick: () => { const s = state.items.get(id); if (s && s.last_run) kit.openRun(s.last_run.id); },
      });
      r.lastStatus = h("span", { className: "badge badge-small" });
      r.lastFired = h("span", { className: "muted small" });
      r.lastNone = h("span", { className: "muted" }, "none yet");
      r.last = h("dd", { className: "schedule-last", "data-testid": `schedule-last-run-${id}` },
        r.lastNone, r.lastOpen, r.lastStatus, r.lastFired);

      r.params = h("code", { className: "schedule-params muted small", "data-testid": `schedule-params-${id}` });

      r.root = h("li", { className: "run-row schedule-row", "data-testid": `schedule-row-${id}`, "data-schedule-id": id },
        h("div", { className: "run-head" },
          h("div", { className: "run-name" }, r.name, r.pipeline, r.state),
          r.actions, r.confirmBox),
        h("div", { className: "schedule-when" }, r.cronText, r.cron, r.zone),
        h("dl", { className: "schedule-facts" },
          h("div", { className: "schedule-fact" }, h("dt", {}, "Next"), r.next),
          h("div", { className: "schedule-fact" }, h("dt", {}, "Last run"), r.last)),
        h("div", { className: "schedule-extra" }, r.policy, r.params));
      state.rows.set(id, r);
      return r;
    }

    function rerender(id) {
      const schedule = state.items.get(id);
      if (schedule) renderRow(schedule);
    }

    function renderRow(schedule) {
      const id = schedule.id;
      const r = state.rows.get(id) || buildRow(id);
      r.root.dataset.enabled = String(schedule.enabled);
      setText(r.name, schedule.name);
      setText(r.pipeline, schedule.pipeline);
      setText(r.state, schedule.enabled ? "enabled" : "paused");
      r.state.className = `badge ${schedule.enabled ? "badge-completed" : "badge-cancelled"}`;

      const toggling = state.pending.has(`toggle-${id}`);
      const deleting = state.pending.has(`delete-${id}`);
      setText(r.toggle, toggling ? (schedule.enabled ? "Pausing…" : "Resuming…") : schedule.enabled ? "Pause" : "Resume");
      r.toggle.disabled = toggling || deleting;
      r.toggle.setAttribute("aria-label", `${schedule.enabled ? "Pause" : "Resume"} the schedule ${schedule.name}`);
      r.remove.setAttribute("aria-label", `Delete the schedule ${schedule.name}`);
      const confirming = state.confirming === id;
      r.actions.hidden = confirming;
      r.confirmBox.hidden = !confirming;
      setText(r.confirmText, "Delete it? Its runs stay.");
      r.confirm.disabled = deleting;
      setText(r.confirm, deleting ? "Deleting…" : "Delete");

      // The cron in words where the server could say it, and always as written.
      setText(r.cronText, schedule.cron_text || "");
      r.cronText.hidden = !schedule.cron_text;
      setText(r.cron, schedule.cron);
      setText(r.zone, `in ${schedule.timezone}`);
      setText(r.policy, `overlap: ${schedule.overlap} · after downtime: ${schedule.catch_up === "none" ? "skip missed ticks" : "run the latest missed tick"}`);
      const params = schedule.params || {};
      r.params.hidden = Object.keys(params).length === 0;
      setText(r.params, `params ${JSON.stringify(params)}`);

      renderNext(r, schedule);
      renderLast(r, schedule);
      return r;
    }

    function renderNext(r, schedule) {
      const t = parseTime(schedule.next_fire_at);
      r.next.dataset.at = schedule.next_fire_at || "";
      if (t === null) {
        setText(r.nextZone, schedule.enabled ? "no next time" : "paused: no next run");
        r.nextZone.removeAttribute("datetime");
        r.nextLocal.hidden = true;
        return;
      }
      const inZone = wallTime(t, schedule.timezone, false);
      const local = wallTime(t, null, true);
      const sameWallTime = inZone !== null && inZone === wallTime(t, null, false);
      r.nextZone.setAttribute("datetime", schedule.next_fire_at);
      r.nextLocal.setAttribute("datetime", schedule.next_fire_at);
      if (inZone === null) {
        // The browser does not know the zone: the instant in UTC says it exactly.
        setText(r.nextZone, `${new Date(t).toISOString().replace(".000", "")} (${schedule.timezone})`);
      } else {
        setText(r.nextZone, `${inZone} in ${schedule.timezone}${sameWallTime ? " (your time too)" : ""}`);
      }
      setText(r.nextLocal, `${local}, your time`);
      r.nextLocal.hidden = sameWallTime;
    }

    function renderLast(r, schedule) {
      const last = schedule.last_run;
      r.lastNone.hidden = Boolean(last);
      r.lastOpen.hidden = !last;
      r.lastStatus.hidden = !last;
      if (last) {
        // The run list's copy may be fresher (it is streamed) than this panel's.
        const status = kit.runStatus(last.id) || last.status || "queued";
        setText(r.lastOpen, `Run #${last.id}`);
        r.lastOpen.setAttribute("aria-label", `Open run #${last.id}`);
        setText(r.lastStatus, status);
        r.lastStatus.className = `badge badge-small badge-${status}`;
        r.lastStatus.dataset.status = status;
      }
      const fired = parseTime(schedule.last_fired_at);
      r.lastFired.hidden = fired === null;
      const firedText = fired === null ? null : wallTime(fired, null, true);
      setText(r.lastFired, firedText ? `fired ${firedText}` : "");
    }

    // -- pause, resume, delete ------------------------------------------------------

    async function toggle(id) {
      const schedule = state.items.get(id);
      const key = `toggle-${id}`;
      if (!schedule || state.pending.has(key)) return;
      state.pending.add(key);
      renderRow(schedule);
      const what = schedule.enabled ? "pause" : "resume";
      try {
        const response = await api(`schedules/${id}`, {
          method: "PATCH",
          headers: { "Content-Type": "application/json" },
          body: JSON.stringify({ enabled: !schedule.enabled }),
        });
        const body = await readJson(response);
        if (response.ok) {
          kit.hideError();
          state.pending.delete(key);
          applySchedule(body);
          return;
        }
        kit.showError(`Could not ${what} the schedule ${schedule.name}: ${readableDetail(body, `the server answered ${response.status}`)}`);
        if (response.status === 404) forget(id);
      } catch (_) {
        kit.showError(`Could not reach the server to ${what} the schedule ${schedule.name}. Is it still running?`);
      } finally {
        state.pending.delete(key);
        rerender(id);
      }
    }

    async function remove(id) {
      const schedule = state.items.get(id);
      const key = `delete-${id}`;
      if (!schedule || state.pending.has(key)) return;
      state.pending.add(key);
      renderRow(schedule);
      try {
        const response = await api(`schedules/${id}`, { method: "DELETE" });
        if (response.ok || response.status === 404) {
          kit.hideError();
          forget(id);
          return;
        }
        const body = await readJson(response);
        kit.showError(`Could not delete the schedule ${schedule.name}: ${readableDetail(body, `the server answered ${response.status}`)}`);
      } catch (_) {
        kit.showError(`Could not reach the server to delete the schedule ${schedule.name}. Is it still running?`);
      } finally {
        state.pending.delete(key);
        rerender(id);
      }
    }

    function forget(id) {
      state.items.delete(id);
      if (state.confirming === id) state.confirming = null;
      renderList();
      kit.changed();
    }

    // -- the new-schedule form ----------------------------------------------------

    const form = $('[data-testid="schedule-form"]');
    const newButton = $('[data-testid="schedule-new"]');
    const submit = $('[data-testid="schedule-submit"]');
    const formError = $('[data-testid="schedule-form-error"]');
    const picker = $('[data-testid="schedule-pipeline"]');
    const params = kit.paramsForm({
      holder: $('[data-testid="schedule-params-form"]'),
      advanced: $('[data-testid="schedule-params-advanced"]'),
      textarea: $('[data-testid="schedule-params-input"]'),
      error: $('[data-testid="schedule-params-error"]'),
      prefix: "schedule-param",
    });
    const inputs = {
      name: $('[data-testid="schedule-name"]'),
      pipeline: picker,
      cron: $('[data-testid="schedule-cron"]'),
      timezone: $('[data-testid="schedule-timezone"]'),
      overlap: $('[data-testid="schedule-overlap"]'),
      catch_up: $('[data-testid="schedule-catch-up"]'),
    };
    const enabled = $('[data-testid="schedule-enabled"]');

    function fieldError(name) {
      return $(`[data-testid="schedule-error-${name}"]`);
    }

    function clearErrors() {
      formError.hidden = true;
      for (const name of FIELDS) {
        fieldError(name).hidden = true;
        inputs[name].removeAttribute("aria-invalid");
      }
      params.clearErrors();
    }

    function showFieldError(name, message) {
      const el = fieldError(name);
      setText(el, message);
      el.hidden = false;
      inputs[name].setAttribute("aria-invalid", "true");
      if (name === "pipeline") $('[data-testid="schedule-pipeline-field"]').hidden = false;
    }

    function showFormError(message) {
      setText(formError, message);
      formError.hidden = false;
    }

    /** The server's message ("'cron' needs 5 fields…") next to the field it names. */
    function showDetail(status, body) {
      if (status === 422 && body && Array.isArray(body.detail)) {
        const rest = params.showFieldErrors(body.detail);
        if (rest.length) params.showError(`The server rejected the parameters: ${rest.join("; ")}`);
        return;
      }
      const message = readableDetail(body, `the server answered ${status}`);
      const named = /^'([a-z_]+)'/.exec(message);
      if (status === 409) showFieldError("name", message);
      else if (named && FIELDS.includes(named[1])) showFieldError(named[1], message);
      else if (named && named[1] === "params") params.showError(message);
      else showFormError(`Could not add the schedule: ${message}`);
    }

    function renderPipelines() {
      const items = kit.pipelines();
      const current = picker.value;
      picker.replaceChildren(...items.map((p) => h("option", { value: p.name }, p.name)));
      if (items.some((p) => p.name === current)) picker.value = current;
      $('[data-testid="schedule-pipeline-field"]').hidden = items.length < 2;
      params.render(items.find((p) => p.name === picker.value) || items[0]);
    }

    function fillTimezones() {
      const list = $("#schedule-timezones");
      let zones = [];
      try {
        zones = Intl.supportedValuesOf("timeZone");
      } catch (_) {
        /* an older browser: the field still takes any name */
      }
      if (!zones.includes("UTC")) zones = ["UTC", ...zones];
      list.replaceChildren(...zones.map((zone) => h("option", { value: zone })));
    }

    function openForm(open) {
      form.hidden = !open;
      newButton.setAttribute("aria-expanded", String(open));
      setText(newButton, open ? "Close" : "New schedule");
      if (open) {
        if (!inputs.timezone.value) inputs.timezone.value = viewerZone() || "UTC";
        if (!state.timezonesFilled) {
          state.timezonesFilled = true;
          fillTimezones();
        }
        inputs.name.focus();
      }
    }

    async function create(event) {
      event.preventDefault();
      clearErrors();
      const name = inputs.name.value.trim();
      const cron = inputs.cron.value.trim();
      if (!name) showFieldError("name", "Please give the schedule a name.");
      if (!cron) showFieldError("cron", "Please give a cron expression, such as 0 9 * * MON-FRI.");
      const read = params.read();
      if (!read.ok) params.showError(read.message);
      if (!name || !cron || !read.ok) return;

      const body = {
        name,
        cron,
        params: read.params,
        enabled: enabled.checked,
        overlap: inputs.overlap.value,
        catch_up: inputs.catch_up.value,
      };
      const zone = inputs.timezone.value.trim();
      if (zone) body.timezone = zone;
      if (kit.pipelines().length > 1) body.pipeline = picker.value;

      submit.disabled = true;
      setText(submit, "Adding…");
      try {
        const response = await api("schedules", {
          method: "POST",
          headers: { "Content-Type": "application/json" },
          body: JSON.stringify(body),
        });
        const answer = await readJson(response);
        if (response.ok) {
          kit.hideError();
          applySchedule(answer);
          inputs.name.value = "";
          inputs.cron.value = "";
          openForm(false);
          const row = state.rows.get(answer.id);
          if (row) row.root.scrollIntoView({ block: "nearest" });
          newButton.focus();
        } else {
          showDetail(response.status, answer);
        }
      } catch (_) {
        showFormError("Could not reach the server to add the schedule. Is it still running?");
      } finally {
        submit.disabled = false;
        setText(submit, "Add schedule");
      }
    }

    newButton.addEventListener("click", () => openForm(form.hidden));
    $('[data-testid="schedule-cancel"]').addEventListener("click", () => {
      clearErrors();
      openForm(false);
      newButton.focus();
    });
    form.addEventListener("submit", create);
    picker.addEventListener("change", () => {
      params.render(kit.pipelines().find((p) => p.name === picker.value));
    });
    form.addEventListener("keydown", (event) => {
      if (event.key === "Escape") {
        event.preventDefault();
        openForm(false);
        newButton.focus();
      }
    });
    Promise.resolve(kit.pipelinesLoaded).then(renderPipelines, renderPipelines);
    refresh();

    return { label, runSeen };
  }

  window.PipelineSchedules = { start };
})();
