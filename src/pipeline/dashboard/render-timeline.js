/* A run's phases as a timeline (a Gantt strip): where each phase started, how
 * long it took and how it ended, so a person sees where the time went. A phase
 * attempted more than once carries its attempt count. Positions are set with
 * element.style (CSSOM), which the dashboard's CSP allows; never a style attribute.
 */
"use strict";

(function () {
  const R = (window.PipelineRender = window.PipelineRender || {});

  function time(value) {
    return value ? Date.parse(value) : null;
  }

  /** `formatDuration` is the dashboard's; `now` ends a phase still running. */
  function renderTimeline(phases, formatDuration, now) {
    const started = phases.map((p) => time(p.started_at)).filter((t) => t !== null);
    const root = document.createElement("div");
    root.className = "timeline";
    root.setAttribute("data-testid", "timeline");
    if (!started.length) {
      root.textContent = "No phase has started yet.";
      return root;
    }
    const begin = Math.min(...started);
    const end = Math.max(...phases.map((p) => (p.started_at ? time(p.finished_at) || now : begin)));
    const span = Math.max(end - begin, 1);
    for (const p of phases) {
      const row = document.createElement("div");
      row.className = "timeline-row";
      const label = document.createElement("span");
      label.className = "timeline-label";
      label.textContent = `${p.num}. ${p.label}`;
      const track = document.createElement("div");
      track.className = "timeline-track";
      if (p.started_at) {
        const from = time(p.started_at);
        const to = time(p.finished_at) || now;
        const bar = document.createElement("div");
        bar.className = `timeline-bar timeline-${p.status}`;
        bar.setAttribute("data-testid", `timeline-bar-${p.num}`);
        bar.setAttribute("data-status", p.status);
        bar.style.left = `${(100 * (from - begin)) / span}%`;
        bar.style.width = `${Math.max((100 * (to - from)) / span, 0.5)}%`;
        const took = formatDuration(to - from);
        const attempts = p.attempts > 1 ? `, ${p.attempts} attempts` : "";
        bar.title = `${p.label}: ${p.status}, started +${formatDuration(from - begin)}, took ${took}${attempts}`;
        track.append(bar);
        if (p.attempts > 1) {
          const retry = document.createElement("span");
          retry.className = "timeline-retries";
          retry.setAttribute("data-testid", `timeline-retries-${p.num}`);
          retry.textContent = `×${p.attempts}`;
          retry.style.left = `${Math.min((100 * (to - begin)) / span, 96)}%`;
          track.append(retry);
        }
      }
      const took = document.createElement("span");
      took.className = "timeline-duration muted small";
      took.textContent = p.duration_ms !== null && p.duration_ms !== undefined ? formatDuration(p.duration_ms) : p.status;
      row.append(label, track, took);
      root.append(row);
    }
    return root;
  }

  R.timeline = renderTimeline;
})();
