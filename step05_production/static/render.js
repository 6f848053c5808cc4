"use strict";
// Model output is untrusted input: a web page or a document the model read can tell it
// what to write. So a reply may only become Markdown formatting: raw HTML is shown as
// text, images are never fetched (an image URL can carry the conversation away with
// no click), links show where they go, and DOMPurify keeps only the tags Markdown makes.
// Loaded before app.js, which uses window.ChatRender.createMarkdownView().

(() => {
  const ALLOWED_TAGS = ["p", "br", "hr", "h1", "h2", "h3", "h4", "h5", "h6", "strong", "em", "del",
    "code", "pre", "blockquote", "ul", "ol", "li", "a", "small", "table", "thead", "tbody", "tr", "th", "td"];
  const PURIFY_OPTIONS = {
    ALLOWED_TAGS,
    ALLOWED_ATTR: ["href", "title", "start", "align"],
    ALLOWED_URI_REGEXP: /^(?:https?:|mailto:)/i,
    ALLOW_DATA_ATTR: false,
    RETURN_DOM_FRAGMENT: true,
  };
  const SAFE_LINK = /^(?:https?:|mailto:)/i;

  function escapeHtml(text) {
    return String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
  }

  // Where marked would emit HTML we don't want, it emits text instead.
  const renderer = {
    html({ text }) {
      return escapeHtml(text);
    },
    image({ text }) {
      return `<small>[image: ${escapeHtml(text || "no description")}]</small>`;
    },
    link({ href, tokens, text }) {
      const label = this.parser.parseInline(tokens);
      if (!SAFE_LINK.test(href)) return label;  // javascript:, data:, relative paths...
      const anchor = `<a href="${escapeHtml(href)}">${label}</a>`;  // rel and target: toFragment
      // The target is shown, so "[your bank](https://evil.example)" cannot hide where it goes.
      return text === href ? anchor : `${anchor} <small>(${escapeHtml(href)})</small>`;
    },
    checkbox({ checked }) {  // task lists: a symbol, not a form control
      return checked ? "☑ " : "☐ ";
    },
  };

  const markdown = window.marked ? new window.marked.Marked({ renderer }) : null;

  function toFragment(tokens, links) {
    tokens.links = links;  // reference-style links ([text][1]) are looked up here
    const fragment = window.DOMPurify.sanitize(markdown.parser(tokens), PURIFY_OPTIONS);
    // Set after sanitizing, on every link: a new tab that cannot script this page
    // (noopener) and is not told which page linked to it (noreferrer).
    for (const link of fragment.querySelectorAll("a")) {
      link.rel = "noopener noreferrer";
      link.target = "_blank";
    }
    return fragment;
  }

  // One message's Markdown, rendered as it streams. Finished blocks are rendered once
  // and kept; each render re-parses only the text after them (in practice the last
  // block), so the cost of a frame stays flat however long the reply grows.
  function createMarkdownView(body) {
    let text = "";
    let frozenChars = 0;  // text[0:frozenChars] is rendered in body's first frozenNodes children
    let frozenNodes = 0;
    let plain = !markdown || !window.DOMPurify;

    function showPlainText() {  // the fallback: never wrong, never stuck
      plain = true;
      body.textContent = text;
    }

    function dropLiveNodes() {
      while (body.childNodes.length > frozenNodes) body.lastChild.remove();
    }

    function render() {
      if (plain) return showPlainText();
      try {
        const tokens = markdown.lexer(text.slice(frozenChars));
        let last = tokens.length - 1;  // the block still being written
        while (last > 0 && tokens[last].type === "space") last -= 1;
        const finished = tokens.slice(0, Math.max(last, 0));
        dropLiveNodes();
        if (finished.length) {
          body.append(toFragment(finished, tokens.links));
          frozenNodes = body.childNodes.length;
          frozenChars += finished.reduce((sum, token) => sum + token.raw.length, 0);
        }
        body.append(toFragment(tokens.slice(finished.length), tokens.links));
      } catch (error) {  // e.g. marked's stack overflow on deeply nested quotes
        console.warn("Markdown rendering failed; showing plain text.", error);
        showPlainText();
      }
    }

    return {
      append(chunk) {
        text += chunk.replace(/\r\n?/g, "\n");  // what marked does, so token lengths match
      },
      render,
      // The whole reply once more, so references and blocks that spanned a freeze
      // point come out exactly as a one-shot render would make them.
      finish() {
        frozenChars = frozenNodes = 0;
        render();
      },
      get text() {
        return text;
      },
    };
  }

  window.ChatRender = { createMarkdownView, PURIFY_OPTIONS };
})();
