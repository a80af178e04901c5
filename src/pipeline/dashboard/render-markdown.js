/* A tiny markdown renderer of our own: headings, paragraphs, emphasis, lists, code.
 *
 * It builds DOM nodes and puts every piece of text in with text nodes, so the
 * source's HTML is never parsed: a <script> or <img onerror> in an artifact is
 * shown as the characters it is. Links are shown as text too (no URL from data
 * becomes something to click).
 */
"use strict";

(function () {
  const R = (window.PipelineRender = window.PipelineRender || {});

  /** Inline spans: `code`, **strong**, *em* / _em_; everything else is text. */
  function inline(text) {
    const out = [];
    const pattern = /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)|\*\*(?=\S)([\s\S]*?\S)\*\*|\*(?=\S)([\s\S]*?\S)\*|\b_(?=\S)([\s\S]*?\S)_\b/g;
    let last = 0;
    for (const m of text.matchAll(pattern)) {
      if (m.index > last) out.push(document.createTextNode(text.slice(last, m.index)));
      let el;
      if (m[2] !== undefined) {
        el = document.createElement("code");
        el.textContent = m[2];
      } else {
        el = document.createElement(m[3] !== undefined ? "strong" : "em");
        el.append(...inline(m[3] !== undefined ? m[3] : m[4] !== undefined ? m[4] : m[5]));
      }
      out.push(el);
      last = m.index + m[0].length;
    }
    if (last < text.length) out.push(document.createTextNode(text.slice(last)));
    return out;
  }

  const HEADING = /^(#{1,6})\s+(.*?)\s*#*\s*$/;
  const BULLET = /^\s*[-*+]\s+(.*)$/;
  const NUMBERED = /^\s*\d+[.)]\s+(.*)$/;
  const FENCE = /^\s*(```|~~~)/;

  /** The markdown source as a fragment of safe DOM. */
  function renderMarkdown(source) {
    const root = document.createElement("div");
    root.className = "markdown";
    const lines = String(source).replace(/\r\n?/g, "\n").split("\n");
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      if (!line.trim()) { i += 1; continue; }
      const fence = line.match(FENCE);
      if (fence) {
        const code = [];
        i += 1;
        while (i < lines.length && !lines[i].trim().startsWith(fence[1])) code.push(lines[i++]);
        i += 1;
        const pre = document.createElement("pre");
        const el = document.createElement("code");
        el.textContent = code.join("\n");
        pre.append(el);
        root.append(pre);
        continue;
      }
      const heading = line.match(HEADING);
      if (heading) {
        const el = document.createElement(`h${heading[1].length}`);
        el.append(...inline(heading[2]));
        root.append(el);
        i += 1;
        continue;
      }
      const listKind = BULLET.test(line) ? BULLET : NUMBERED.test(line) ? NUMBERED : null;
      if (listKind) {
        const list = document.createElement(listKind === BULLET ? "ul" : "ol");
        while (i < lines.length && listKind.test(lines[i])) {
          const item = document.createElement("li");
          item.append(...inline(lines[i].match(listKind)[1]));
          list.append(item);
          i += 1;
        }
        root.append(list);
        continue;
      }
      const para = [];
      while (i < lines.length && lines[i].trim() && !HEADING.test(lines[i]) && !FENCE.test(lines[i])
             && !BULLET.test(lines[i]) && !NUMBERED.test(lines[i])) {
        para.push(lines[i].trim());
        i += 1;
      }
      const p = document.createElement("p");
      p.append(...inline(para.join(" ")));
      root.append(p);
    }
    return root;
  }

  R.markdown = renderMarkdown;
})();
