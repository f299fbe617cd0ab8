// The chat page: plain JavaScript, no build step. It talks to /conversations on this server
// (docs/server.md); replies are untrusted model output, rendered as Markdown only through
// DOMPurify, with the page's Content-Security-Policy behind it.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "gemma-chat-api-key";
const state = { list: [], current: null, id: null, controller: null, busy: false };
// A reply stream that broke, or ended without its last event: the server stopped mid-reply.
const CUT_OFF = "the reply was cut off: the server stopped before it ended";

// -- the API -----------------------------------------------------------------------------------

let keyWaiters = [];

function askForKey(refused) {
  // One form for every call waiting on the key: the page asks once and keeps it in the browser.
  // Asked again after a key was sent, it says so: the same form alone looked like nothing happened.
  $("key-refused").hidden = !refused;
  $("key-form").hidden = false;
  $("key").focus();
  return new Promise((resolve) => keyWaiters.push(resolve));
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  localStorage.setItem(KEY_STORE, $("key").value.trim());
  $("key-form").hidden = true;
  keyWaiters.splice(0).forEach((resolve) => resolve());
});

async function api(path, options = {}) {
  for (;;) {
    const key = localStorage.getItem(KEY_STORE);
    const headers = { "Content-Type": "application/json", ...(options.headers || {}) };
    if (key) headers.Authorization = `Bearer ${key}`;
    let response;
    try {
      response = await fetch(path, { ...options, headers });
    } catch (error) {
      if (error.name === "AbortError") throw error;
      // The browser's own words ("Failed to fetch") say nothing of what to do.
      throw Object.assign(new Error("the server does not answer: is gemma-chat still running?"), { unreachable: true });
    }
    if (response.status === 401) {
      await askForKey(Boolean(key));
      continue;
    }
    if (!response.ok) {
      let message = `${response.status} ${response.statusText}`;
      let code = null;
      try { ({ message, code } = (await response.json()).error); } catch (_) { /* not JSON */ }
      throw Object.assign(new Error(message), { status: response.status, code });
    }
    return response;
  }
}

const json = async (path, options) => (await api(path, options)).json();

function showError(error) {
  const box = $("error");
  box.textContent = error ? String(error.message || error) : "";
  box.hidden = !error;
}

// -- rendering untrusted Markdown -------------------------------------------------------------

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  // An image a reply points at would tell its server (or this one) that someone read the reply:
  // only images carried in the reply itself (data: URLs) are shown.
  if (node.tagName === "IMG") {
    node.removeAttribute("srcset");
    const src = node.getAttribute("src");
    if (src && !/^data:image\/(?:png|gif|jpeg|webp);/i.test(src)) {
      node.removeAttribute("src");
      node.setAttribute("title", `image not loaded: ${src}`);
    }
  }
  if (node.tagName === "A") {
    node.setAttribute("rel", "noopener noreferrer");
    node.setAttribute("target", "_blank");
  }
});

const PURIFY = {
  FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select", "iframe", "svg", "math"],
  FORBID_ATTR: ["style", "id", "name"],
  ALLOWED_URI_REGEXP: /^(?:https?:|mailto:|#|\/|data:image\/(?:png|gif|jpeg|webp);)/i,
};

function renderMarkdown(element, text) {
  element.innerHTML = DOMPurify.sanitize(marked.parse(text, { gfm: true, breaks: true }), PURIFY);
  for (const code of element.querySelectorAll("pre code")) {
    hljs.highlightElement(code);
    // Without the newline that ends every block: a command pasted into a terminal with it would
    // run before its reader could look at it.
    const copy = button("Copy", "copy-code", () => copyText(code.textContent.replace(/\n$/, ""), copy));
    copy.setAttribute("aria-label", "Copy this code");
    code.parentElement.prepend(copy);
  }
  // A wide table scrolls sideways, as code does, rather than breaking its words to fit.
  for (const table of element.querySelectorAll("table")) {
    const frame = document.createElement("div");
    frame.className = "table-frame";
    table.replaceWith(frame);
    frame.append(table);
  }
  for (const block of element.querySelectorAll("p, li, td, th, blockquote, h1, h2, h3, h4, h5, h6")) block.dir = "auto";
}

function button(label, className, onClick) {
  const element = document.createElement("button");
  element.type = "button";
  element.className = className;
  element.textContent = label;
  element.addEventListener("click", onClick);
  return element;
}

async function copyText(text, source) {
  try {
    await navigator.clipboard.writeText(text);
    source.textContent = "Copied";
  } catch (_) {
    source.textContent = "Copy failed";
  }
  setTimeout(() => { source.textContent = "Copy"; }, 1500);
}

const SPEAKERS = { user: "You", assistant: "The model", system: "System" };

function messageElement(message) {
  const element = document.createElement("article");
  element.className = `message ${message.role}`;
  element.setAttribute("aria-label", SPEAKERS[message.role] || message.role);
  const body = document.createElement("div");
  body.className = "body";
  body.dir = "auto";  // right-to-left text (Hebrew, Arabic) reads from the right
  element.append(body);
  if (message.role === "assistant") {
    const copy = button("Copy", "copy-reply", () => copyText(element.dataset.text, copy));
    copy.setAttribute("aria-label", "Copy this reply");
    element.append(copy);
  }
  const note = document.createElement("p");
  note.className = "note interrupted";
  note.textContent = "(interrupted)";
  element.append(note);
  updateMessage(element, message);
  return element;
}

function updateMessage(element, message) {
  element.dataset.text = message.content;
  const body = element.querySelector(".body");
  if (message.role === "assistant") renderMarkdown(body, message.content);
  else body.textContent = message.content;  // what the user typed is shown as typed
  element.querySelector(".interrupted").hidden = !message.interrupted;
}

function renderConversation(toEnd = true) {
  const conversation = state.current;
  const box = $("messages");
  const position = box.scrollTop;
  box.replaceChildren(...(conversation ? conversation.messages.map(messageElement) : []));
  $("title").textContent = conversation ? conversation.title || "(untitled)" : "New conversation";
  $("system").value = conversation ? conversation.system || "" : $("system").value;
  for (const id of ["rename", "export", "delete"]) $(id).disabled = !conversation;
  if (conversation) showContext(conversation.context);
  else $("context").textContent = "context: –";
  updateButtons();
  box.scrollTop = toEnd ? box.scrollHeight : position;
}

function atEnd(box) {
  return box.scrollHeight - box.scrollTop - box.clientHeight < 48;
}

function showContext(context) {
  $("context").textContent = `context: ${context.used}/${context.size} tokens`;
}

function renderList() {
  const list = $("list");
  list.replaceChildren(...state.list.map((summary) => {
    const item = document.createElement("li");
    const open = button(summary.title || "(untitled)", "open", () => openConversation(summary.id));
    open.dataset.id = summary.id;
    open.title = `${new Date(summary.updated * 1000).toLocaleString()} · ${summary.turns} turns · ${summary.model}`;
    if (summary.id === state.id) open.setAttribute("aria-current", "true");
    item.append(open);
    return item;
  }));
  const current = list.querySelector("[aria-current]");
  if (current) current.scrollIntoView({ block: "nearest" });
}

function updateButtons() {
  const messages = state.current ? state.current.messages : [];
  const focused = document.activeElement;  // before the browser moves it off a disabled button
  $("send").hidden = state.busy;
  $("stop").hidden = !state.busy;
  $("regenerate").disabled = state.busy || !messages.some((m) => m.role === "user");
  $("edit").disabled = state.busy || !messages.some((m) => m.role === "user");
  // A focused button that hides or disables itself drops the keyboard's focus to the top of the
  // page: it goes on to Stop while a reply is written, then back to the message box.
  if (focused && (focused.hidden || focused.disabled)) (state.busy ? $("stop") : $("input")).focus();
}

// -- conversations ----------------------------------------------------------------------------

async function refreshList() {
  const listing = await json("/conversations");
  state.list = listing.data;
  $("kept").textContent = `Conversations are ${listing.where}.`;
  renderList();
}

async function openConversation(id) {
  if (state.busy) return;
  showError(null);
  try {
    state.current = await json(`/conversations/${id}`);
    cancelEdit();
    state.id = id;
    location.hash = `#${id}`;
    renderConversation();
    renderList();
    closeSidebarOnPhone();
    $("input").focus();
  } catch (error) {
    showError(error);
  }
}

function newConversation() {
  if (state.busy) return;
  cancelEdit();
  state.current = null;
  state.id = null;
  history.replaceState(null, "", location.pathname);
  renderConversation();
  renderList();
  closeSidebarOnPhone();
  $("input").focus();
}

function generation() {
  const options = {};
  const temperature = parseFloat($("temperature").value);
  if (!Number.isNaN(temperature)) options.temperature = temperature;
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (maxTokens > 0) options.max_tokens = maxTokens;
  return options;
}

async function send(text, at) {
  if (state.busy || !text.trim()) return;
  showError(null);
  state.busy = true;  // from here: a second Enter while a new conversation is made made two
  updateButtons();
  const system = $("system").value;
  const shown = state.current && [...state.current.messages];
  try {
    if (state.id === null) {
      state.current = await json("/conversations", { method: "POST", body: JSON.stringify({ system }) })
        .catch((error) => { error.refused = true; throw error; });
      state.id = state.current.id;
      location.hash = `#${state.id}`;
    }
    const messages = state.current.messages;
    messages.splice(at === undefined ? messages.length : at);
    messages.push({ role: "user", content: text, interrupted: false });
    $("input").value = "";
    renderConversation();
    const body = { content: text, system, version: state.current.version, ...generation() };
    if (at !== undefined) body.at = at;
    await stream(`/conversations/${state.id}/messages`, body);
    // Stopped before the server took it: not stored, so back in the box rather than lost.
    const last = state.current.messages.filter((message) => message.role === "user").pop();
    if ((!last || last.content !== text) && !$("input").value) $("input").value = text;
  } catch (error) {
    failed(error, shown, "what you sent is back in the box.");
    // Refused before anything was stored (say, the conversation changed elsewhere): kept to send again.
    if (error.refused && !$("input").value) $("input").value = text;
    await reload();
  } finally {
    state.busy = false;  // as the reply left it, or as it was if none began
    updateButtons();
  }
}

async function regenerate() {
  if (state.busy || !state.current) return;
  const messages = state.current.messages;
  const shown = [...messages];
  let last = messages.length - 1;
  while (last >= 0 && messages[last].role !== "user") last -= 1;
  messages.splice(last + 1);
  renderConversation();
  try {
    await stream(`/conversations/${state.id}/reply`, { version: state.current.version, ...generation() });
  } catch (error) {
    failed(error, shown, "regenerate again to write its reply.");
    await reload();
  }
}

function failed(error, shown, again) {
  if (error.code === "conversation_changed") {
    showError("This conversation was changed elsewhere (the terminal, or another tab) since this page showed " +
              `it: here it is as stored now; ${again}`);
  } else {
    showError(error);
  }
  // Refused, nothing stored: until the conversation is read again (the server may be gone), what
  // the page showed before, not a message that was not sent. (Past that, what was stored stays
  // shown: a reply cut off mid-way, marked interrupted, or a whole one whose reading failed.)
  if (state.current && shown && error.refused) {
    state.current.messages = shown;
    renderConversation(false);
  }
}

async function reload() {
  // After a refused or failed reply, the conversation as stored, not as this page guessed it. The
  // server sends a reply's error event before it stores what was written: read too soon, the
  // page would send its next message against the version before it, and be told of a change.
  if (state.id === null) return;
  try {
    await showStored();
  } catch (error) {
    // The error shown already says what went wrong. A conversation deleted elsewhere (another tab)
    // is gone from this page too, the message that could not be sent to it included.
    if (error.status !== 404) return;
    state.id = null;
    state.current = null;
    history.replaceState(null, "", location.pathname);
    renderConversation();
    await refreshList().catch(() => {});
  }
}

function cancelEdit() {
  // An edit belongs to its conversation: the index it would resend at means nothing in another,
  // and the old message it put in the box is not something the user typed there.
  if (state.editing !== undefined) $("input").value = "";
  state.editing = undefined;
  $("send").textContent = "Send";
}

function editLast() {
  const messages = state.current ? state.current.messages : [];
  let last = messages.length - 1;
  while (last >= 0 && messages[last].role !== "user") last -= 1;
  if (last < 0 || state.busy) return;
  state.editing = last;
  $("input").value = messages[last].content;
  $("input").focus();
  $("send").textContent = "Resend";
}

async function stream(path, body) {
  const reply = { role: "assistant", content: "", interrupted: false };
  const element = messageElement(reply);
  element.classList.add("streaming");
  $("messages").append(element);
  state.controller = new AbortController();
  state.busy = true;
  // A screen reader waits for the reply to end rather than reading it again at every redraw.
  $("messages").setAttribute("aria-busy", "true");
  updateButtons();
  let pending = false;
  let finished = false;
  const draw = () => {
    pending = false;
    const box = $("messages");
    // Follows the reply only while the reader is at its end: one who scrolled up to read stays.
    const following = atEnd(box);
    updateMessage(element, reply);
    if (following) box.scrollTop = box.scrollHeight;
  };
  try {
    const response = await api(path, { method: "POST", body: JSON.stringify(body), signal: state.controller.signal })
      .catch((error) => { error.refused = true; throw error; });
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read().catch((error) => {
        if (error.name === "AbortError") throw error;
        throw new Error(CUT_OFF);  // "network error" says less
      });
      if (done) break;
      buffer += value;
      const lines = buffer.split("\n");
      buffer = lines.pop();
      for (const line of lines) {
        if (!line.startsWith("data: ")) continue;
        const event = JSON.parse(line.slice(6));
        if (event.type === "text") {
          reply.content += event.text;
          if (!pending) { pending = true; requestAnimationFrame(draw); }
        } else if (event.type === "done") {
          finished = true;
          if (event.conversation !== state.id) {
            // The terminal chat wrote to this conversation meanwhile: the reply went to a new one.
            showError(`conversation ${state.id} was changed elsewhere while this reply was written: ` +
                      `it goes on as conversation ${event.conversation}`);
            state.id = event.conversation;
            location.hash = `#${state.id}`;
          }
          showContext(event.context);
          $("speed").textContent = `last reply: ${event.tokens_per_second.toFixed(1)} tokens/s`;
        } else if (event.type === "error") {
          throw new Error(event.error.message);
        } else if (event.type === "start" && event.dropped) {
          showError(`the context is full: the ${event.dropped} oldest messages were left out of this reply`);
        }
      }
    }
    if (!finished) throw new Error(CUT_OFF);
  } catch (error) {
    reply.interrupted = true;  // the server keeps what was written, marked so, as the terminal does
    if (error.name !== "AbortError") {
      if (!reply.content) element.remove();  // no empty reply, with its Copy button, left behind
      done(element, reply);
      throw error;
    }
  }
  state.controller = null;  // Stop has nothing more to stop; the page stays busy until it is stored
  try {
    await showStored();
  } finally {
    done(element, reply);
  }
}

function done(element, reply) {
  // The reply is over: shown as it ended (unless the stored conversation already took its place),
  // and the page free for the next one.
  if (element.classList.contains("streaming")) {
    element.classList.remove("streaming");
    if (element.isConnected) {
      state.current.messages.push(reply);
      updateMessage(element, reply);
    }
  }
  state.busy = false;
  state.controller = null;
  $("messages").setAttribute("aria-busy", "false");
  updateButtons();
  refreshList().catch(() => {});
  followAddress();  // a Back pressed while the reply was written
}

async function showStored() {
  // The stored conversation, as a reload would show it: messages written elsewhere meanwhile, the
  // version the next message is sent against, and a meter that counts the next prompt. A reply
  // stopped here is stored once the server notices: until then it says it is writing.
  for (let tries = 0; tries < 50; tries += 1) {
    const stored = await json(`/conversations/${state.id}`);
    if (!stored.writing || tries === 49) {
      const system = $("system").value;  // what the user may have typed there meanwhile stays
      state.current = stored;
      renderConversation(atEnd($("messages")));
      $("system").value = system;
      return;
    }
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

function stop() {
  if (state.controller) state.controller.abort();
}

// -- the phone layout -------------------------------------------------------------------------

function closeSidebarOnPhone() {
  document.body.classList.remove("side-open");
  $("toggle-side").setAttribute("aria-expanded", "false");
}

$("toggle-side").addEventListener("click", () => {
  const open = document.body.classList.toggle("side-open");
  $("toggle-side").setAttribute("aria-expanded", String(open));
  // The list covers the button that opened it: the keyboard goes into the list, to the open conversation.
  if (open) (document.querySelector("#list .open[aria-current]") || $("new")).focus();
});

// Over the page on a phone, the list must let go without a choice made in it: Escape, or a tap
// on the dimmed page beside it.
function leaveSidebar() {
  if (!document.body.classList.contains("side-open")) return;
  closeSidebarOnPhone();
  $("toggle-side").focus();
}

document.addEventListener("click", (event) => {
  if (!$("sidebar").contains(event.target) && !$("toggle-side").contains(event.target)) leaveSidebar();
});

// -- wiring -----------------------------------------------------------------------------------

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const at = state.editing;
  const text = $("input").value;
  cancelEdit();
  send(text, at);
});

$("input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});

function openNeighbour(step) {
  // The list is newest first; a new, unsaved conversation stands before its first entry.
  const at = state.list.findIndex((summary) => summary.id === state.id);
  const next = state.list[at + step];
  if (next) openConversation(next.id);
  else if (at + step === -1) newConversation();
}

// Alt+ these keys, anywhere on the page (index.html names them in the sidebar).
const ALT_KEYS = { n: newConversation, arrowup: () => openNeighbour(-1), arrowdown: () => openNeighbour(1) };

document.addEventListener("keydown", (event) => {
  if (event.key === "Escape") {
    if (state.busy) stop();
    else if (state.editing !== undefined) cancelEdit();
    else leaveSidebar();
  }
  const action = event.altKey && !event.ctrlKey && !event.metaKey && ALT_KEYS[event.key.toLowerCase()];
  if (action) { event.preventDefault(); action(); }
});

$("stop").addEventListener("click", stop);
$("skip").addEventListener("click", () => $("input").focus());
$("regenerate").addEventListener("click", regenerate);
$("edit").addEventListener("click", editLast);
$("new").addEventListener("click", newConversation);

$("rename").addEventListener("click", async () => {
  const title = prompt("Title", state.current.title);
  if (title === null) return;
  try {
    state.current = await json(`/conversations/${state.id}`, { method: "PATCH", body: JSON.stringify({ title }) });
    renderConversation();
    await refreshList();
  } catch (error) {
    showError(error);
  }
});

$("delete").addEventListener("click", async () => {
  if (!confirm(`Delete "${state.current.title || "(untitled)"}"?`)) return;
  try {
    await api(`/conversations/${state.id}`, { method: "DELETE" });
    newConversation();
    await refreshList();
  } catch (error) {
    showError(error);
  }
});

$("export").addEventListener("click", async () => {
  try {
    const blob = await (await api(`/conversations/${state.id}/export`)).blob();
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = `conversation-${state.id}.json`;
    link.click();
    URL.revokeObjectURL(link.href);
  } catch (error) {
    showError(error);
  }
});

$("import").addEventListener("click", () => $("import-file").click());
$("import-file").addEventListener("change", async () => {
  const file = $("import-file").files[0];
  if (!file) return;
  try {
    const imported = await json("/conversations/import", { method: "POST", body: await file.text() });
    await refreshList();
    await openConversation(imported.id);
  } catch (error) {
    showError(error);
  } finally {
    $("import-file").value = "";
  }
});

// The address names the conversation (#ID): back, forward and a pasted link open it.
function followAddress() {
  const wanted = parseInt(location.hash.slice(1), 10) || null;
  if (wanted === state.id || state.busy) return;  // during a reply: followed once it ends (done())
  if (wanted) refreshList().then(() => openConversation(wanted), showError);
  else newConversation();
}

window.addEventListener("hashchange", followAddress);

async function start() {
  try {
    await refreshList();
    const wanted = parseInt(location.hash.slice(1), 10);
    if (wanted) await openConversation(wanted);
    else renderConversation();
  } catch (error) {
    showError(error);
  }
  $("input").focus();
}

start();
