/* analysis-pipeline dashboard: the one live stream, GET /events.
 *
 * The server sends a `run` event (the Run JSON, as GET /runs/{id} has it)
 * whenever any run is created or changes, starting with the runs queued or
 * running now; one stream serves the whole page, however many runs are live.
 * It is read with fetch() and a small server-sent-events parser, because
 * EventSource cannot send the Authorization header.
 *
 * A stream can end: the server stops, this page fell behind and was dropped,
 * or the server refuses it (503, too many streams open). It is opened again
 * after a backoff (with jitter, so that a restarted server is not hit by
 * every viewer at once; never sooner than the 503's Retry-After), and each
 * opening tells app.js, which re-reads the list: what changed in between was
 * never sent.
 */
"use strict";

(function () {
  const BACKOFF_MS = [500, 1000, 2000, 5000, 10000, 20000];
  const STEADY_MS = 10000;          // a stream open this long starts the backoff over
  const MAX_RETRY_AFTER_MS = 60000;

  /** A tiny server-sent-events parser: feed it text, it calls onEvent(type, data). */
  function sseParser(onEvent) {
    let buffer = "";
    let type = "";
    let data = [];
    const lineBreak = /\r\n|\r|\n/g;

    function line(text) {
      if (text === "") {
        if (data.length) onEvent(type || "message", data.join("\n"));
        type = "";
        data = [];
        return;
      }
      if (text.startsWith(":")) return;  // a comment (keep-alive ping)
      const colon = text.indexOf(":");
      const field = colon === -1 ? text : text.slice(0, colon);
      let value = colon === -1 ? "" : text.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") type = value;
      else if (field === "data") data.push(value);
    }

    return function feed(chunk, done) {
      buffer += chunk;
      let start = 0;
      let match;
      lineBreak.lastIndex = 0;
      while ((match = lineBreak.exec(buffer)) !== null) {
        // A trailing "\r" may be half of a "\r\n" that arrives with the next chunk.
        if (match[0] === "\r" && match.index === buffer.length - 1 && !done) break;
        line(buffer.slice(start, match.index));
        start = lineBreak.lastIndex;
      }
      buffer = buffer.slice(start);
      if (done && buffer) {
        line(buffer);
        buffer = "";
      }
    };
  }

  function sleep(ms, signal) {
    return new Promise((resolve) => {
      const timer = setTimeout(resolve, ms);
      signal.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, { once: true });
    });
  }

  /** A refusal's Retry-After (seconds) in ms, or 0. */
  function retryAfter(response) {
    const value = response.headers.get("Retry-After");
    const seconds = value === null ? NaN : Number(value);
    return Number.isFinite(seconds) && seconds > 0 ? Math.min(seconds * 1000, MAX_RETRY_AFTER_MS) : 0;
  }

  /**
   * Follows GET /events until stop(). kit.api is fetch with the token (it
   * waits for the token form on a 401); kit.onRun(run) gets every run the
   * stream sends; kit.onOpen(again) is called when the server accepted a
   * stream (`again`: not the page's first, events may have been missed);
   * kit.onDown(waitMs) when one ended or was refused and the next try waits.
   */
  function follow(kit) {
    const controller = new AbortController();
    const signal = controller.signal;
    const status = { open: false, opened: 0 };

    function deliver(type, data) {
      if (type !== "run") return;
      let run;
      try {
        run = JSON.parse(data);
      } catch (_) {
        return;  // a malformed event: ignore it, the next one will do
      }
      try {
        kit.onRun(run);
      } catch (err) {
        setTimeout(() => { throw err; });  // a bug of the page's: report it, keep the stream
      }
    }

    async function read(response) {
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      const feed = sseParser(deliver);
      for (;;) {
        const { value, done } = await reader.read();
        if (done) {
          feed(decoder.decode(), true);
          return;
        }
        feed(decoder.decode(value, { stream: true }), false);
      }
    }

    async function loop() {
      let attempt = 0;
      while (!signal.aborted) {
        let refusedFor = 0;
        let openedAt = null;
        try {
          const response = await kit.api("events", {
            headers: { Accept: "text/event-stream" },
            cache: "no-store",
            signal,
          });
          if (!response.ok || !response.body) {
            refusedFor = retryAfter(response);
            if (response.body) response.body.cancel().catch(() => {});
            throw new Error(`events answered ${response.status}`);
          }
          openedAt = Date.now();
          status.open = true;
          status.opened += 1;
          kit.onOpen(status.opened > 1);
          await read(response);
        } catch (_) {
          /* refused, or the connection broke: as for a stream that ended */
        }
        status.open = false;
        if (signal.aborted) return;
        if (openedAt !== null && Date.now() - openedAt >= STEADY_MS) attempt = 0;
        const base = BACKOFF_MS[Math.min(attempt, BACKOFF_MS.length - 1)];
        const wait = Math.max(refusedFor, Math.round(base / 2 + (Math.random() * base) / 2));
        attempt += 1;
        kit.onDown(wait);
        await sleep(wait, signal);
      }
    }

    loop();
    return {
      /** Whether a stream is open now. */
      isOpen: () => status.open,
      stop: () => controller.abort(),
    };
  }

  window.PipelineEvents = { follow, sseParser };
})();
