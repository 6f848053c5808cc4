"use strict";
// Model output is untrusted input: a web page or a document the model read can tell it
// what to write. So a reply may only become Markdown formatting: raw HTML is shown as
// text, images are never fetched (an image URL can carry the conversation away with
// no click), links show where they go, DOMPurify keeps only the tags Markdown makes, and
// characters that could make text read as something else are shown, never applied.
// Loaded before app.js, which uses window.ChatRender.createMarkdownView().

(() => {
  const ALLOWED_TAGS = ["p", "br", "hr", "h1", "h2", "h3", "h4", "h5", "h6", "strong", "em", "del",
    "code", "pre", "blockquote", "ul", "ol", "li", "a", "small", "table", "thead", "tbody", "tr", "th", "td"];
  const PURIFY_OPTIONS = {
    ALLOWED_TAGS,
    ALLOWED_ATTR: ["href", "title", "start", "align"],
    ALLOWED_URI_REGEXP: /^(?:https?:|mailto:)/i,
    // Checked against the pattern above unless marked safe: a list's "start" and a column's
    // "align" were removed, and "4821." showed as "1." (review 23).
    ADD_URI_SAFE_ATTR: ["start", "align"],
    ALLOW_DATA_ATTR: false,
    RETURN_DOM_FRAGMENT: true,
  };
  const SAFE_LINK = /^(?:https?:|mailto:)/i;

  // Unicode deception. Direction embeddings, overrides and isolates reorder what is shown:
  // "https://bank.example/<RLO>moc.live" reads as another address, and a code line can
  // show a command as commented out that runs when pasted ("Trojan source"). They are
  // never applied: each becomes a visible marker. ZWJ and ZWNJ stay in prose: Persian and
  // emoji sequences need them. A run of one character is one marker ("⟨RLO ×3⟩"), hence the \1*.
  // The direction marks LRM, RLM and ALM too: between digits they reorder a number
  // ("account 1<RLM>2<RLM>3" read "account 321", review 9). Hebrew and Arabic text needs
  // them, so in prose one is applied only where it cannot split a number and right-to-left
  // letters already set the direction (keptMark).
  // Combining marks stack on their base: "a" and 15,900 acute accents (one grapheme cluster,
  // within the reply cap) were laid out again every frame, 6.6 s of long tasks in a 10 s reply,
  // up to 513 ms each, a second on reload, and the stack painted over earlier messages (review 9).
  // Marks are not the only characters that stack: emoji skin tones and Thai and Lao SARA AM
  // extend a cluster too (7,000 skin tones on a thumb: 8.3 s in one task), and an invisible
  // character between marks (ZWNJ, a word joiner, a soft hyphen) kept the cost while it
  // restarted a count of marks alone (review 11). So all of these count as one stack.
  // Real text puts a few on a letter (Vietnamese 2, Hebrew points and cantillation, Tibetan
  // stacks up to 8, an emoji sequence 3): past MAX_STACKED in a row, in prose and code, the rest
  // are removed and one marker counts them. Both patterns below also match that excess (no group 1).
  const MAX_STACKED = 16;
  const STACKING = String.raw`[\p{M}\p{Emoji_Modifier}\u0E33\u0EB3\uFF9E\uFF9F\p{Cf}\p{Default_Ignorable_Code_Point}]`;
  const STACKING_CHAR = new RegExp(STACKING, "u");
  const EXCESS_STACKED = String.raw`(?<=${STACKING}{${MAX_STACKED}})${STACKING}+`;
  // ZWJ joins emoji into one cluster however many there are: a chain of 5,300 hearts (❤️ and
  // ZWJ) cost 1.8 s of long tasks while it streamed. Real sequences join 4 at most (a family);
  // past MAX_JOINED in one chain, a ZWJ is a marker, not applied. The lookbehind runs only at a ZWJ.
  const MAX_JOINED = 8;
  const JOINED = String.raw`\p{Extended_Pictographic}(?:(?!\u200D)${STACKING}){0,${MAX_STACKED}}\u200D`;
  const EXCESS_JOINER = String.raw`\u200D(?<=(?:${JOINED}){${MAX_JOINED + 1}})`;
  // Tag characters, and variation selectors past a character's one, hide text as protocol.py
  // says. It removes them from what the model sends, but a reply can write them as HTML
  // references ("&#xE0049;"), which the page decodes (review 23): in prose too they are markers.
  // A selector after an invisible character (another selector, a word joiner) is one too many.
  const HIDING = String.raw`[\u{E0000}-\u{E007F}]|(?<=\p{Default_Ignorable_Code_Point})[\uFE00-\uFE0F\u{E0100}-\u{E01EF}]`;
  const DIRECTION_RUNS = new RegExp(String.raw`([\u202A-\u202E\u2066-\u2069\u200E\u200F\u061C]|${HIDING}|${EXCESS_JOINER})\1*|${EXCESS_STACKED}`, "gu");
  const MARKS = /^[\u200E\u200F\u061C]/u;
  const MARK_RUNS = /([\u200E\u200F\u061C])\1*/gu;
  const RTL_LETTER = /[\p{Script=Hebrew}\p{Script=Arabic}\p{Script=Syriac}\p{Script=Thaana}\p{Script=Nko}\p{Script=Samaritan}\p{Script=Mandaic}\p{Script=Adlam}\p{Script=Hanifi_Rohingya}]/u;
  const MARK_CONTEXT = 32;  // UTF-16 units looked at on each side: a scan per mark, not of the whole text

  // Looking away from a mark over anything but letters and digits (spaces, punctuation, other
  // marks): is a digit met before any letter, and is the first letter (past digits) right-to-left?
  // `chars` end at the text's edge, or else at the edge of the window: then a digit may lie just
  // past it, and is assumed to (padding of spaces or invisible characters pushed the digits of
  // "12<padding><RLM>34" out of the window, and the number showed 3412: review 16).
  // A paragraph separator ends the search: the edge of a paragraph to the browser's bidi
  // algorithm (showControls puts one between blocks and for a <br>). U+2029 draws nothing, and
  // a Hebrew word before it vouched for a mark after it (review 18). Not a line break: inside a
  // <p> the browser lays it out as a space (review 19).
  const PARAGRAPH_END = /[\u001C-\u001E\u0085\u2029]/u;
  function side(chars, atTheEdge) {
    let digitFirst = null;
    for (const c of chars) {
      if (PARAGRAPH_END.test(c)) return { digitFirst: digitFirst ?? false, rtl: false };
      if (/\p{N}/u.test(c)) digitFirst ??= true;
      else if (/\p{L}/u.test(c)) return { digitFirst: digitFirst ?? false, rtl: RTL_LETTER.test(c) };
    }
    return { digitFirst: digitFirst ?? !atTheEdge, rtl: false };
  }

  // An LRM, RLM or ALM run at text[index:end] is applied only beside right-to-left letters, and
  // an RLM or ALM only where no number may follow it before a right-to-left letter does: before
  // a number it would set the direction the number's groups are laid out in. "המחיר הוא 100$<RLM>."
  // keeps its mark (after the number, it moves the full stop). Each narrower rule was got around,
  // because this code tells letters by their Unicode category and the browser by their bidi
  // class: a Hebrew word after the number, in another block, across a <br>, behind U+0589 or a
  // private-use character (left-to-right to the browser, punctuation here), or a modifier letter
  // such as U+02C8 between mark and number (a letter here, neutral to the browser) kept an RLM
  // that swapped "1234 5678" (reviews 17 to 20). So after the mark nothing but a right-to-left
  // letter or the reply's end vouches for it: not a paragraph's end either, as where the browser
  // ends one is its own call (raw HTML as bare text ran on past a block's end: review 21). An
  // LRM sets left to right: a number after it is laid out as written. A run past MAX_STACKED is
  // a marker: no text needs one.
  function keptMark(text, index, end) {
    if (!MARKS.test(text[index]) || end - index > MAX_STACKED) return false;
    const before = side([...text.slice(Math.max(0, index - MARK_CONTEXT), index)].reverse(), index < MARK_CONTEXT);
    const after = side(text.slice(end, end + MARK_CONTEXT), end + MARK_CONTEXT > text.length);
    if (!(before.rtl || after.rtl)) return false;
    return text[index] === "\u200E" || noNumberAhead(text.slice(end, end + MARK_CONTEXT), end + MARK_CONTEXT > text.length);
  }

  // Whether, looking on from a mark, a right-to-left letter comes before any digit: then no
  // number takes its direction from the mark. A window that ends first may have a digit just
  // past it, unless it ends with the reply.
  function noNumberAhead(chars, atTheEdge) {
    for (const c of chars) {
      if (RTL_LETTER.test(c) && /\p{L}/u.test(c)) return true;
      if (/\p{N}/u.test(c)) return false;
    }
    return atTheEdge;
  }
  // In code, and in a link's label or target, nothing may hide: every invisible character
  // (format characters and default-ignorables: LRM/RLM, zero-width ones, soft hyphen...).
  const INVISIBLE = /[\p{Cf}\p{Default_Ignorable_Code_Point}]/gu;
  const INVISIBLE_RUNS = new RegExp(String.raw`([\p{Cf}\p{Default_Ignorable_Code_Point}])\1*|${EXCESS_STACKED}`, "gu");
  const NAMES = {
    0x202a: "LRE", 0x202b: "RLE", 0x202c: "PDF", 0x202d: "LRO", 0x202e: "RLO",
    0x2066: "LRI", 0x2067: "RLI", 0x2068: "FSI", 0x2069: "PDI",
    0x200e: "LRM", 0x200f: "RLM", 0x061c: "ALM", 0x200b: "ZWSP", 0x200c: "ZWNJ", 0x200d: "ZWJ",
    0x2060: "WJ", 0x00ad: "SHY", 0xfeff: "BOM",
  };
  // Bounds the work of one frame: a block still being written that grows past this is
  // shown as plain text until the reply ends, then parsed once (see createMarkdownView).
  const LIVE_MARKDOWN_CHARS = 3000;
  // And its cost is in a table's cells, not its characters: a block still being written whose
  // tables hold more than this is shown as plain text too (up to some 20 ms a render at this
  // bound, 2 columns over 250 rows; app.js spaces renders by their cost).
  const LIVE_TABLE_CELLS = 500;
  // Bounds the work of one frame in the plain-text tail and a long code block (appendInBlocks).
  const TAIL_BLOCK_CHARS = 2000;
  // Bounds the work of one task when a long reply is rendered whole (finish()).
  const PIECE_CHARS = 2000;

  function hasAny(pattern, text, start = 0) {
    pattern.lastIndex = start;  // a /g pattern's test() starts where the last one stopped
    return pattern.test(text);
  }

  // The stacking characters that end `text` (at most MAX_STACKED): a run goes on in the next text node.
  function trailingStack(text) {
    const last = [...text.slice(-2 * MAX_STACKED)];
    let first = last.length;
    while (first > 0 && last.length - first < MAX_STACKED && STACKING_CHAR.test(last[first - 1])) first -= 1;
    return last.slice(first).join("");
  }

  // The marker is an <abbr>: a tag DOMPurify never lets through, so a reply cannot forge one.
  function marker(char, count) {
    const code = char.codePointAt(0);
    const hex = `U+${code.toString(16).toUpperCase().padStart(4, "0")}`;
    const times = count > 1 ? ` ×${count}` : "";
    const abbr = document.createElement("abbr");
    abbr.title = `${hex}${times}, ${count > 1 ? "invisible characters" : "an invisible character"} (shown, not applied)`;
    abbr.textContent = `⟨${NAMES[code] || hex}${times}⟩`;
    return abbr;
  }

  function removedStack(count) {
    const abbr = document.createElement("abbr");
    abbr.title = `Past ${MAX_STACKED} combining marks, skin tones or invisible characters in a row, the rest are removed, not stacked`;
    abbr.textContent = `⟨${count} stacked characters, removed⟩`;
    return abbr;
  }

  // Each marker is an element, built again every frame while its block streams: 15,000 zero-width
  // spaces in an unclosed code block (which stays rendered) blocked the page for a whole 10 s
  // reply (review 7). Runs are one marker, and one render builds at most MAX_MARKERS: past them
  // the characters are removed (none is applied, none hides in a copy), and one marker says how
  // many. A streaming code block of 15,000 ZWSP and RLO alternating renders in some 3 ms a
  // frame at this bound; with all 15,000 markers it took 100-150 ms (Chromium).
  const MAX_MARKERS = 200;
  function markerBudget() {
    return { left: MAX_MARKERS, removed: 0, summary: null };
  }

  // text[start:] as nodes, each run of `pattern`'s characters replaced by its marker, within
  // `budget`. What is before `start` is context: a run of combining marks, a mark's neighbours;
  // so is `context` past the end of `text` (text is its start): what follows a mark.
  function shownText(text, pattern = DIRECTION_RUNS, budget = markerBudget(), start = 0, context = text) {
    const fragment = document.createDocumentFragment();
    let from = start;
    pattern.lastIndex = start;  // matchAll starts there (not where the pattern's last test() stopped)
    for (const match of text.matchAll(pattern)) {
      if (pattern === DIRECTION_RUNS && keptMark(context, match.index, match.index + match[0].length)) continue;
      if (budget.left === 0) break;
      budget.left -= 1;
      const count = [...match[0]].length;  // in characters: a tag character is two UTF-16 units
      fragment.append(text.slice(from, match.index), match[1] ? marker(match[1], count) : removedStack(count));
      from = match.index + match[0].length;
    }
    let rest = text.slice(from);
    if (budget.left === 0 && hasAny(pattern, rest)) {  // one text node, not one per character removed
      const removed = budget.removed;
      rest = rest.replace(pattern, (run, char, at) => {
        if (pattern === DIRECTION_RUNS && keptMark(context, from + at, from + at + run.length)) return run;
        budget.removed += [...run].length;
        return "";
      });
      if (!budget.summary && budget.removed > removed) {  // where the first one was removed
        budget.summary = document.createElement("abbr");
        budget.summary.title = `Past ${MAX_MARKERS} markers, invisible characters are removed, not shown one by one`;
        fragment.append(budget.summary);
      }
      if (budget.summary) budget.summary.textContent = `⟨${budget.removed} more invisible characters, removed⟩`;
    }
    fragment.append(rest);
    return fragment;
  }

  // Each block is a paragraph of its own to the browser, and so is what follows a <br>: a
  // separator where one starts or ends ends a mark's search (a Hebrew letter in the list item
  // above vouched for a mark: review 17; across a <br>: review 18; in the paragraph before bare
  // text: review 21). Looked up by tag as the walk enters and leaves each element: closest()
  // for every text node made ten long replies replay 100s of ms slower.
  const BLOCKS = new Set(["P", "LI", "TD", "TH", "H1", "H2", "H3", "H4", "H5", "H6", "BLOCKQUOTE", "PRE", "DT", "DD", "DIV", "CAPTION", "SUMMARY"]);
  const PARAGRAPH_BREAK = "\u2029";

  // The text nodes under root in order, with PARAGRAPH_BREAK wherever a paragraph starts or ends.
  function* paragraphsText(root) {
    let node = root.firstChild;
    while (node) {
      if (node.tagName === "BR" || BLOCKS.has(node.tagName)) yield PARAGRAPH_BREAK;
      if (node.nodeType === Node.TEXT_NODE) yield node;
      if (node.firstChild) {
        node = node.firstChild;
        continue;
      }
      // Out of this node and of every element it ends, to whatever comes next.
      while (node !== root && !node.nextSibling) {
        if (BLOCKS.has(node.tagName)) yield PARAGRAPH_BREAK;
        node = node.parentNode;
      }
      if (node === root) return;
      if (BLOCKS.has(node.tagName)) yield PARAGRAPH_BREAK;
      node = node.nextSibling;
    }
  }

  // Every text node of the rendered reply: code shows every invisible character, prose
  // only the direction controls and the marks not kept (keptMark), judged by the text around
  // them across nodes: "**12**<RLM>34" puts the digits on each side in two nodes, and judged
  // within its own node the mark was applied, the number shown as 3412 (review 16). `open`:
  // text unseen here comes before or after the fragment (it is a piece of the reply), and a
  // mark beside it is judged as if a digit lay there.
  function showControls(root, open = { start: false, end: false }) {
    // Unseen text, as far as a mark looks: blank, so a mark beside it is judged as if a digit
    // might lie past it (side()).
    const unseen = " ".repeat(MARK_CONTEXT + 1);
    let all = open.start ? unseen : "";
    const found = [];
    let stack = "";  // ending the text before: "*a*" and marks is one stack, across two nodes
    for (const node of paragraphsText(root)) {
      if (node === PARAGRAPH_BREAK) {
        all += node;
        continue;
      }
      const pattern = node.parentElement?.closest("code") ? INVISIBLE_RUNS : DIRECTION_RUNS;
      if (hasAny(pattern, stack + node.data, stack.length)) found.push([node, pattern, all.length]);
      stack = trailingStack(stack + node.data);
      all += node.data;
    }
    if (open.end) all += unseen;
    const budget = markerBudget();  // one for the whole fragment
    const reach = MARK_CONTEXT + 2 * MAX_STACKED;  // a mark's window, a stack's (trailingStack)
    for (const [node, pattern, start] of found) {
      const before = all.slice(Math.max(0, start - reach), start);
      const end = start + node.data.length;
      const context = before + node.data + all.slice(end, end + MARK_CONTEXT + 1);
      node.replaceWith(shownText(before + node.data, pattern, budget, before.length, context));
    }
  }

  // The address a link really opens, or null when it must not be clickable: hidden
  // characters in its label or target (checked here, on the DOM, so that HTML entities
  // such as &#x202E; are decoded), a target the URL parser refuses, or a user name in it
  // ("https://bank.example@evil.example" opens evil.example).
  function linkTarget(link) {
    const href = link.getAttribute("href") || "";
    if (hasAny(INVISIBLE, href) || hasAny(INVISIBLE, link.textContent)) return null;
    let url;
    try {
      url = new URL(href);
    } catch {
      return null;
    }
    if (!["http:", "https:", "mailto:"].includes(url.protocol) || url.username || url.password) return null;
    return url.href;  // the parser's form: the host in punycode, the rest percent-encoded
  }

  // Where a link goes, after its label: the parsed target (so a Cyrillic "bаnk" shows as
  // xn--...), in a <bdi dir=ltr> so right-to-left text around it cannot reorder it.
  function showTarget(link) {
    const target = document.createElement("bdi");
    target.dir = "ltr";
    target.textContent = link.href;  // what a click opens, exactly
    const note = document.createElement("small");
    note.append("(", target, ")");
    link.after(" ", note);
  }

  function refuseLink(link) {
    const target = document.createElement("code");  // code: its hidden characters are shown
    target.textContent = link.getAttribute("href") || "";
    const note = document.createElement("small");
    note.append("(not linked: ", target, ")");
    link.replaceWith(...link.childNodes, " ", note);
  }

  // Whether a table's rows hold cells past the header's, split as marked splits them (a pipe
  // after an odd number of backslashes is text; an empty first or last cell is the row's edge).
  function hidesCells(table) {
    const width = table.header.length;
    return table.raw.split("\n").some((line, index) => {
      if (index === 1) return false;  // the delimiter row
      const cells = [""];
      let backslashes = 0;
      for (const c of line) {
        if (c === "|" && backslashes % 2 === 0) cells.push("");
        else cells[cells.length - 1] += c;
        backslashes = c === "\\" ? backslashes + 1 : 0;
      }
      if (!cells[0].trim()) cells.shift();
      if (cells.length && !cells.at(-1).trim()) cells.pop();
      return cells.slice(width).some((cell) => cell.trim());
    });
  }

  function escapeHtml(text) {
    return String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
  }

  // Where marked would emit HTML we don't want, it emits text instead. And no text of a reply
  // is left unshown: a link's title, a reference definition, words after a code fence's
  // language, a table row's cells past the header's... A reply could otherwise carry
  // instructions no person sees into the history, which goes back to the model every turn
  // (review 22; what protocol.py removes tag characters for).
  const plainRenderer = window.marked ? new window.marked.Renderer() : null;
  const note = (text) => `<small>${escapeHtml(text)}</small>`;
  const unlinked = (target) => `<small>(not linked: <code>${escapeHtml(target)}</code>)</small>`;
  const renderer = {
    // A block of raw HTML is a paragraph of text, like any other block: bare text between two
    // blocks is one paragraph to the browser with the bare text of the next, which the direction
    // marks' check, judging each block (a piece of a long reply) on its own, did not see (review 21).
    html({ text, block }) {
      return block ? `<p>${escapeHtml(text)}</p>` : escapeHtml(text);
    },
    image({ href, title, text }) {  // never loaded: what it is and where it is, as text
      const about = [text || "no description", href, title].filter(Boolean).join(" · ");
      return `<small>[image: ${escapeHtml(about)}]</small>`;
    },
    link({ href, title, tokens }) {
      const label = this.parser.parseInline(tokens);
      const titled = title ? ` ${note(`“${title}”`)}` : "";
      if (!SAFE_LINK.test(href)) return `${label} ${unlinked(href)}${titled}`;  // javascript:, data:, relative paths...
      return `<a href="${escapeHtml(href)}">${label}</a>${titled}`;  // checked and finished in toFragment
    },
    def({ raw }) {  // "[label]: target "title"": shown as written
      return `<p>${escapeHtml(raw)}</p>`;
    },
    code(token) {  // marked puts the info string's first word in a class, which DOMPurify removes
      const info = (token.lang || "").trim();
      return (info ? `<p>${note(info)}</p>` : "") + plainRenderer.code(token);
    },
    table(token) {  // marked drops a row's cells past the header's: then the table is shown as text
      if (hidesCells(token)) return `<p>${escapeHtml(token.raw)}</p>`;
      return plainRenderer.table.call(this, token);
    },
    checkbox({ checked }) {  // task lists: a symbol, not a form control
      return checked ? "☑ " : "☐ ";
    },
  };

  const markdown = window.marked ? new window.marked.Marked({ renderer }) : null;

  // marked's inline lexer is quadratic on some text. For each * _ or ~ that may open
  // emphasis it searches the rest of the paragraph for the closer, a step at a time; and at
  // each piece of text it looks along the characters an email address may hold, for an "@".
  // "**a_" * 4000 (16,000 characters, no closer) is 32 million steps, 2.9 s in one task at the
  // end of the reply and on every reload; "a__" * 10667 (32,000) is 0.9 s of looking for "@".
  // So that work is counted as it happens, in characters looked at (a step costs about 100),
  // and a text that needs more than MAX_LEXER_WORK is shown as plain text (visible, and safe).
  // Ordinary Markdown needs far less: 520,716 for 32,000 characters of dense inline Markdown
  // (bench/render.py's), 79,254 for as much prose with some Markdown.
  const MAX_LEXER_WORK = 15000000;  // about 15 ms of marked's time in Chromium
  const EMAIL_CHARACTERS = /[\w.!#$%&'*+/=?`{|}~-]*/y;
  function emailLookAhead(source) {
    EMAIL_CHARACTERS.lastIndex = 0;
    EMAIL_CHARACTERS.test(source);
    return EMAIL_CHARACTERS.lastIndex;
  }
  const WORK_OF = {  // marked's own names for the regular expressions that do that work
    emStrongRDelimAst: () => 100,  // a step towards a closer
    emStrongRDelimUnd: () => 100,
    delRDelim: () => 100,
    text: emailLookAhead,
    url: emailLookAhead,
  };

  // Block nesting is the other costly shape, and the budget above never sees it: "1. 1. 1. ..."
  // or "- > - > ..." in 3,000 characters (a block rendered whole, every frame) nests lists and
  // quotes a thousand deep. marked lexes each level's text again (10-20 ms), then DOMPurify and
  // layout take 50-100 ms more on elements nested hundreds deep: 100-160 ms a frame, and over
  // 1 s on a reload of ten such replies. Ordinary Markdown nests a few levels: a text nesting
  // lists and quotes more than MAX_NESTING deep is shown as plain text, as above. At the limit,
  // 16 deep line after line, 3,000 characters cost some 50 ms, as dense Markdown does. (The
  // limit also spares marked's stack, which "> " * 8000 overflowed.)
  const MAX_NESTING = 16;

  // Tables are the third: marked pads every row to the header's number of cells, so a header
  // of 1,000 columns over 1,000 one-character rows (6,000 characters) is a million cells, 22 s
  // in one task at the end of the reply and again on every reload (review 7). A table a person
  // reads has far fewer; a reply holding more than MAX_TABLE_CELLS in all its tables is shown
  // as plain text, as above: 26 tables just under a bound per table froze the page for 16 s
  // as they streamed (review 23). Counted from marked's own table match, before it builds a cell.
  // At this bound a reply's tables take some 100-250 ms to render, as rows cost more than
  // columns (ten replies of 9,999 cells took up to 610 ms each on a reload, review 25).
  const MAX_TABLE_CELLS = 5000;

  class TooCostlyToParse extends Error {}

  // marked's block rule for a table, which refuses a table when the cells of the reply's tables
  // would be too many; `tables.cells` counts them, from those rendered before this text. Every
  // match counts, a table marked then turns down too (cells that do not match, no pipe in the
  // delimiter row): the rule read its rows on to the next blank line, and from every line of
  // "|-\n-|-\n" repeated or of setext headings it reads them again, 1.1-1.6 s in one task for
  // 16,000 characters (review 24). Counted, that work is bounded with the cells.
  function bounded(tableRule, tables) {
    class BoundedTable extends RegExp {
      exec(source) {
        const match = super.exec(source);  // [whole, header, delimiter row, rows]
        if (match) {
          tables.cells += cellsOf(match[1], match[3]);
          if (tables.cells > MAX_TABLE_CELLS) throw new TooCostlyToParse("Markdown tables too large");
        }
        return match;
      }
    }
    return new BoundedTable(tableRule);
  }

  // A table's cells, as marked pads them: every row (each line after the delimiter row) as
  // wide as the header (counted by its pipes, edges included).
  function cellsOf(header, rows = "") {
    const lines = rows.replace(/\n+$/, "");
    return header.split("|").length * (1 + (lines ? lines.split("\n").length : 0));
  }

  // The cells of the tables among `tokens`, counted as bounded() counts them.
  function tableCells(tokens) {
    let cells = 0;
    for (const token of tokens) {
      if (token.type === "table") {
        const [header, , ...rows] = token.raw.replace(/\n+$/, "").split("\n");
        cells += cellsOf(header, rows.join("\n"));
      }
      cells += tableCells(token.tokens ?? []) + tableCells(token.items ?? []);
    }
    return cells;
  }

  // The tokens of `text`, as markdown.lexer would make them, with that work counted; `cells`:
  // the cells of tables already rendered from the same reply.
  function lex(text, cells = 0) {
    const lexer = new window.marked.Lexer({ ...markdown.defaults, tokenizer: null });  // its own tokenizer
    let work = 0;
    const counted = (pattern, workOf) => {
      class Counted extends RegExp {
        exec(source) {
          work += workOf(source);
          if (work > MAX_LEXER_WORK) throw new TooCostlyToParse("Markdown too costly to parse");
          return super.exec(source);
        }
      }
      return new Counted(pattern);
    };
    const { rules } = lexer.tokenizer;
    const inline = { ...rules.inline };
    for (const [name, workOf] of Object.entries(WORK_OF)) {
      if (inline[name]) inline[name] = counted(inline[name], workOf);
    }
    lexer.tokenizer.rules = { ...rules, inline, block: { ...rules.block, table: bounded(rules.block.table, { cells }) } };
    // marked's list and blockquote tokenizers lex their content with lexer.blockTokens: one
    // call deeper per level of nesting (the outermost call is the text itself).
    const blockTokens = lexer.blockTokens.bind(lexer);
    let depth = 0;
    lexer.blockTokens = (...args) => {
      if (depth > MAX_NESTING) throw new TooCostlyToParse("Markdown nested too deep");
      depth += 1;
      try {
        return blockTokens(...args);
      } finally {
        depth -= 1;
      }
    };
    return lexer.lex(text);
  }

  function toFragment(tokens, links, open = undefined) {
    tokens.links = links;  // reference-style links ([text][1]) are looked up here
    const fragment = window.DOMPurify.sanitize(markdown.parser(tokens), PURIFY_OPTIONS);
    for (const link of fragment.querySelectorAll("a")) {
      const target = linkTarget(link);
      if (target === null) {
        refuseLink(link);
        continue;
      }
      link.href = target;
      // Set after sanitizing, on every link: a new tab that cannot script this page
      // (noopener) and is not told which page linked to it (noreferrer).
      link.rel = "noopener noreferrer";
      link.target = "_blank";
      // The target is shown, so "[your bank](https://evil.example)" cannot hide where it
      // goes; not twice when the label is the address itself.
      const label = link.textContent;
      if (label !== link.href && `${label}/` !== link.href) showTarget(link);
    }
    // A list's numbers are drawn in its padding, left of its text, and the bubble cuts off what
    // does not fit: "98765." showed as "8765.". The padding fits the widest number (set through
    // the CSSOM, which the page's CSP allows; a style attribute it would not).
    for (const list of fragment.querySelectorAll("ol")) {
      const numbers = [list.start, list.start + list.children.length - 1];
      const digits = Math.max(...numbers.map((number) => String(number).length));
      if (digits > 3) list.style.paddingLeft = `calc(${digits + 1}ch + 1em)`;
    }
    showControls(fragment, open);
    return fragment;
  }

  // Text shown as it streams, only appended to, in blocks. The browser lays out again the whole
  // block text is appended to, at a cost that grows with the block: one line of 16,000
  // characters switching direction at each ("a" and a Hebrew letter) took 111 ms a frame by
  // its end, 13 s of long tasks in a reply at a model's pace (review 12), and as much in a code
  // block (review 13). So a block past TAIL_BLOCK_CHARS is closed, after the new text's last
  // line break if it has one (nothing moves on screen), else where it ends: a line that long
  // is cut in two until the reply ends and is rendered whole.
  // column: { newBlock() }, and what this keeps in it; text[from:] is what is new.
  function appendInBlocks(column, text, from, pattern) {
    const budget = markerBudget();
    const add = (end) => {  // text[from:end], the last block's next piece
      const nodes = [...shownText(text.slice(0, end), pattern, budget, from, text).childNodes];
      column.block.append(...nodes);
      column.pieces.push({ block: column.block, blockStart: column.blockStart, start: from, end, nodes });
      from = end;
    };
    column.pieces ??= [];
    const settled = pattern === DIRECTION_RUNS ? settledLength(text, from) : text.length;
    // Where the last line starts, before the line breaks that end the text: marked may still
    // change the last line, so it is a piece of its own (what rewind() takes back).
    let end = settled;
    while (end > from && text[end - 1] === "\n") end -= 1;
    const lastLine = text.lastIndexOf("\n", end - 1) + 1;
    if (!column.block || from - column.blockStart > TAIL_BLOCK_CHARS) {
      if (column.block && lastLine > from) add(lastLine);
      column.block = column.newBlock();
      column.blockStart = from;
    }
    if (lastLine > from) add(lastLine);
    add(settled);
    return settled;  // where the next frame goes on from
  }

  // How much of a streaming text can be shown for good: up to its first direction mark that
  // would be applied (keptMark) while what follows it may still change that: fewer than
  // MARK_CONTEXT characters after it yet. Such a mark waits for more; shown at once, an RLM after
  // a digit was applied until the reply ended, and an account number showed reversed (review 15).
  // (A mark shown as a marker may stay one until the end: a marker never deceives.)
  function settledLength(text, from) {
    const near = Math.max(from, text.length - MARK_CONTEXT - 1);
    for (const run of text.slice(near).matchAll(MARK_RUNS)) {
      const start = near + run.index;
      const end = start + run[0].length;
      const after = text.slice(end, end + MARK_CONTEXT);
      if (after.length < MARK_CONTEXT && keptMark(text, start, end)) return start;
    }
    return text.length;
  }

  // Takes back what a column shows from text[at] on, a piece (one frame's text) at a time,
  // and returns where it now ends: the caller appends from there again.
  function rewind(column, at) {
    let end = at;
    while (column.pieces.length && column.pieces.at(-1).end > at) {
      const piece = column.pieces.pop();
      for (const node of piece.nodes) node.remove();
      end = piece.start;
      column.block = piece.block;  // appended to again (an emptied block stays, of no height)
      column.blockStart = piece.blockStart;
    }
    return end;
  }

  // How many characters a and b have in common at their start.
  function sharedLength(a, b) {
    let length = 0;
    while (length < a.length && length < b.length && a[length] === b[length]) length += 1;
    return length;
  }

  // One message's Markdown, rendered as it streams. Finished blocks are rendered once
  // and kept; each render re-parses only the text after them (in practice the last
  // block), so the cost of a frame stays flat however long the reply grows. A block that
  // grows past LIVE_MARKDOWN_CHARS (a 32,000-character paragraph with no blank line)
  // would cost more every frame: from there the rest is plain text, only appended to,
  // until finish() parses the whole reply once (and renders it in pieces). Code blocks
  // are cheap to parse (no inline Markdown: ~6 ms a frame at 34,000 characters) and stay
  // rendered; past TAIL_BLOCK_CHARS their <code> is only appended to (codeInBlocks), and
  // what their markers cost is bounded by MAX_MARKERS.
  function createMarkdownView(body) {
    let text = "";
    let frozenChars = 0;  // text[0:frozenChars] is rendered in body's first frozenNodes children
    let frozenNodes = 0;
    let frozenCells = 0;  // the cells of the tables among them: MAX_TABLE_CELLS is for the whole reply
    let tail = null;  // <div>s showing text[frozenChars:tailChars] as plain text, once too long
    let tailChars = 0;
    let liveCode = null;  // a code block still being written, past TAIL_BLOCK_CHARS: only appended to
    let plain = !markdown || !window.DOMPurify;
    let complete = false;  // finish() was called: the whole reply is rendered
    let behind = false;  // finished blocks are left to render at the next frame
    let carriageReturn = "";  // a "\r" that ended the last chunk: the next may start with its "\n"

    // The fallback: never wrong, never stuck. While the reply streams it is only appended to, in
    // blocks, as the tail is: built again every frame, the whole reply was laid out again each
    // time, 5 s of long tasks in a 10 s reply of mixed-direction text (review 25). Once the reply
    // is complete (or shown from the start), it is built whole, once.
    function showPlainText() {
      if (!plain || !tail || complete) {
        plain = true;
        body.replaceChildren();
        tail = { newBlock: () => body.appendChild(document.createElement("div")) };
        tailChars = 0;
      }
      if (complete) tail.newBlock().append(shownText(text));
      else tailChars = appendInBlocks(tail, text, tailChars, DIRECTION_RUNS);
    }

    function dropLiveNodes() {
      while (body.childNodes.length > frozenNodes) body.lastChild.remove();
    }

    function render() {
      if (plain) return showPlainText();
      if (tail) {  // no parsing until the end
        tailChars = appendInBlocks(tail, text, tailChars, DIRECTION_RUNS);
        return;
      }
      try {
        const tokens = lex(text.slice(frozenChars), frozenCells);
        let last = tokens.length - 1;  // the block still being written
        while (last > 0 && tokens[last].type === "space") last -= 1;
        // Once the reply is complete every block is rendered for good, in one fragment.
        let finished = complete ? tokens : tokens.slice(0, Math.max(last, 0));
        // A page that joins a reply mid-stream (a reload, a second tab) is sent all of it so far
        // at once: its finished blocks were rendered in one task, as finish() does not (review
        // 26). They are rendered about PIECE_CHARS a frame, the rest shown once they are.
        behind = false;
        if (!complete) {
          let count = 1;
          for (let chars = finished[0]?.raw.length ?? 0; count < finished.length; count += 1) {
            chars += finished[count].raw.length;
            if (chars > PIECE_CHARS) break;
          }
          behind = count < finished.length;
          finished = finished.slice(0, count);
        }
        const live = tokens[last];
        if (liveCode && !finished.length && live?.type === "code") {
          // marked may change the end of the code as more of it comes (an indent cut in two
          // chunks is kept as a line of spaces, then stripped): the blocks from the change on
          // are written again, not the whole code, made again every frame before (review 14).
          let shown = liveCode.text.length;
          if (!live.text.startsWith(liveCode.text)) shown = rewind(liveCode, sharedLength(live.text, liveCode.text));
          appendInBlocks(liveCode, live.text, shown, INVISIBLE_RUNS);
          liveCode.text = live.text;
          return;
        }
        liveCode = null;
        dropLiveNodes();
        if (finished.length) {
          // More comes after blocks rendered for good mid-reply (open: a mark at their end
          // may come right before a number).
          body.append(toFragment(finished, tokens.links, { start: false, end: !complete }));
          frozenNodes = body.childNodes.length;
          frozenChars += finished.reduce((sum, token) => sum + token.raw.length, 0);
          frozenCells += tableCells(finished);
        }
        if (behind) return;  // app.js renders again at the next frame
        const tooCostlyToRenderEachFrame = text.length - frozenChars > LIVE_MARKDOWN_CHARS
          || tableCells(tokens.slice(finished.length)) > LIVE_TABLE_CELLS;
        if (tooCostlyToRenderEachFrame && tokens[last]?.type !== "code") {
          // <div>: a tag Markdown never makes, and style.css keeps its line breaks
          tail = { newBlock: () => body.appendChild(document.createElement("div")) };
          tailChars = frozenChars;
          return render();
        }
        const fragment = toFragment(tokens.slice(finished.length), tokens.links);
        if (!complete && live?.type === "code" && live.text.length > TAIL_BLOCK_CHARS) {
          liveCode = codeInBlocks(fragment, live.text);
        }
        body.append(fragment);
      } catch (error) {  // TooCostlyToParse, or marked failing on text no limit foresaw
        console.warn("Markdown rendering failed; showing plain text.", error);
        showPlainText();
      }
    }

    // The live code block's <code> made again in blocks (appendInBlocks), with the same text:
    // from now on only appended to, until the block or the reply ends. A copy made meanwhile
    // may have a blank line where two blocks meet; the finished reply is one block again.
    function codeInBlocks(fragment, code) {
      const element = fragment.querySelector("pre > code");
      if (!element) return null;
      element.replaceChildren();
      const newBlock = () => element.appendChild(Object.assign(document.createElement("span"), { className: "lines" }));
      const column = { text: code, newBlock };
      appendInBlocks(column, code, 0, INVISIBLE_RUNS);
      return column;
    }

    // The reply's tokens cut into pieces of about PIECE_CHARS: whole blocks, but a longer
    // paragraph is cut between its inline tokens, each slice rendered as a paragraph of
    // its own and then joined to the one before (`continues`).
    function pieces(tokens) {
      const list = [];
      let group = [];
      let groupChars = 0;
      const close = () => {
        if (group.length) list.push({ tokens: group });
        group = [];
        groupChars = 0;
      };
      for (const token of tokens) {
        if (token.type !== "paragraph" || token.raw.length <= PIECE_CHARS) {
          group.push(token);
          groupChars += token.raw.length;
          if (groupChars >= PIECE_CHARS) close();
          continue;
        }
        close();
        for (let i = 0; i < token.tokens.length; ) {
          const continues = i > 0;  // not the paragraph's first slice
          const slice = [];
          for (let chars = 0; i < token.tokens.length && chars < PIECE_CHARS; i += 1) {
            slice.push(token.tokens[i]);
            chars += token.tokens[i].raw.length;
          }
          list.push({ tokens: [{ ...token, tokens: slice }], continues });
        }
      }
      close();
      return list;
    }

    // A long reply, parsed once and rendered a piece at a time, each piece in a task of
    // its own: a 32,000-character paragraph of inline Markdown makes some 3,000 elements,
    // a few hundred ms in one go, and the page answers nobody meanwhile. The reply shows
    // as it was until the rendered one replaces it.
    async function renderInPieces() {
      const tokens = lex(text);
      const rendered = document.createDocumentFragment();
      const list = pieces(tokens);
      for (const [index, piece] of list.entries()) {
        await new Promise((resolve) => setTimeout(resolve));  // the next task
        const open = { start: piece.continues, end: index + 1 < list.length };
        const fragment = toFragment(piece.tokens, tokens.links, open);
        if (piece.continues) rendered.lastElementChild.append(...fragment.firstChild.childNodes);
        else rendered.append(fragment);
      }
      body.replaceChildren(rendered);
    }

    return {
      append(chunk) {
        // Line breaks as marked makes them, so token lengths match. A "\r\n" cut in two chunks is
        // one line break, as in the stored reply: its "\r" waits for the next chunk (review 23).
        const raw = carriageReturn + chunk;
        carriageReturn = raw.endsWith("\r") ? "\r" : "";
        text += raw.slice(0, raw.length - carriageReturn.length).replace(/\r\n?/g, "\n");
      },
      // A frame scheduled before the end may fire after it: the finished view stays as it is.
      render: () => complete || render(),
      // The whole reply once more, so references and blocks that spanned a freeze
      // point come out exactly as a one-shot render would make them. The promise says
      // when it is on the page (a long reply takes a few tasks).
      finish() {
        if (carriageReturn) text += "\n";
        carriageReturn = "";
        complete = true;
        liveCode = null;
        if (plain || text.length <= LIVE_MARKDOWN_CHARS) {
          frozenChars = frozenNodes = frozenCells = 0;
          tail = null;
          render();
          return Promise.resolve();
        }
        return renderInPieces().catch((error) => {
          console.warn("Markdown rendering failed; showing plain text.", error);
          showPlainText();
        });
      },
      // The text as it is (invisible characters shown, as in the fallback), until render()
      // or finish() replaces it: a stored reply waiting its turn to be rendered (app.js).
      showText() {
        body.replaceChildren(shownText(text));
      },
      get text() {
        return text;
      },
      get behind() {  // not once the reply is complete or shown as plain text (review 27)
        return behind && !complete && !plain;
      },
    };
  }

  // JSON text (the flow inspector's snapshots) with every invisible character written as
  // its JSON escape: still the same JSON, and nothing in it hidden or reordered.
  function escapeInvisible(json) {
    const escape = (chars) => chars.replace(/[^]/g, (unit) => `\\u${unit.charCodeAt(0).toString(16).padStart(4, "0")}`);
    // UTF-16 units, as JSON has it; characters stacked past MAX_STACKED in a row too.
    return json.replace(new RegExp(EXCESS_STACKED, "gu"), escape).replace(INVISIBLE, escape);
  }

  // Plain text (what the user sent) as nodes, without the stacks a reply may not have either:
  // a pasted message of 8,000 skin tones froze its tab on every reload.
  const EXCESS_RUNS = new RegExp(String.raw`(${EXCESS_JOINER})\1*|${EXCESS_STACKED}`, "gu");
  function plainText(text) {
    return shownText(text, EXCESS_RUNS);
  }

  window.ChatRender = { createMarkdownView, escapeInvisible, plainText, PURIFY_OPTIONS };
})();
