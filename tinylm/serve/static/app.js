// tinylm's chat page: keeps the conversation, sends it to /v1/chat/completions with
// stream: true, and shows the reply as its server-sent events arrive (fetch + ReadableStream).
// Model text is only ever set as textContent, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const conversation = $("conversation");
const promptBox = $("prompt");
const sendButton = $("send");
const stopButton = $("stop");
const statusLine = $("status");
let history = []; // [{role, content}], the turns sent with the next request
let controller = null; // the AbortController of the reply being streamed

const stored = (id, fallback) => localStorage.getItem("tinylm." + id) ?? fallback;
for (const id of ["system", "temperature", "top-p", "max-tokens", "seed", "api-key"]) {
  const input = $(id);
  input.value = stored(id, input.value);
  input.addEventListener("change", () => localStorage.setItem("tinylm." + id, input.value));
}
for (const id of ["temperature", "top-p"]) {
  const show = () => { $(id + "-value").textContent = $(id).value; };
  $(id).addEventListener("input", show);
  show();
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function addMessage(kind, text) {
  const box = document.createElement("div");
  box.className = "msg " + kind;
  const role = document.createElement("span");
  role.className = "role";
  role.textContent = kind === "error" ? "error" : kind;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  box.append(role, body);
  conversation.append(box);
  conversation.scrollTop = conversation.scrollHeight;
  return box;
}

function setMeta(box, text) {
  const meta = document.createElement("span");
  meta.className = "meta";
  meta.textContent = text;
  box.append(meta);
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    const data = await response.json();
    if (!response.ok) throw new Error(data.error ? data.error.message : response.statusText);
    const card = data.data[0];
    $("model").textContent = card.id + " · context " + card.max_model_len + " tokens";
  } catch (err) {
    $("model").textContent = "model unknown (" + err.message + ")";
  }
}

function requestBody() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  const body = {
    messages: messages.concat(history),
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value),
    max_tokens: Number($("max-tokens").value),
  };
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  return body;
}

// Reads the server-sent events of `response`, calling onData with each parsed `data:` object.
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onData(JSON.parse(data));
      }
    }
  }
}

async function send(text) {
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const box = addMessage("assistant", "");
  box.classList.add("streaming");
  const textNode = box.querySelector(".text");
  controller = new AbortController();
  sendButton.disabled = true;
  stopButton.disabled = false;
  statusLine.textContent = "generating…";
  const started = performance.now();
  let firstToken = null, usage = null, finish = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody()),
      signal: controller.signal,
    });
    if (!response.ok) {
      const data = await response.json().catch(() => ({}));
      throw new Error(data.error ? data.error.message : response.status + " " + response.statusText);
    }
    await readEvents(response, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        if (choice.delta && choice.delta.content) {
          if (firstToken === null) firstToken = performance.now();
          textNode.textContent += choice.delta.content;
          conversation.scrollTop = conversation.scrollHeight;
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    });
    history.push({ role: "assistant", content: textNode.textContent });
    const seconds = (performance.now() - started) / 1000;
    const tokens = usage ? usage.completion_tokens : 0;
    setMeta(box, tokens + " tokens in " + seconds.toFixed(2) + " s" +
      (firstToken ? ", first after " + ((firstToken - started) / 1000).toFixed(2) + " s" : "") +
      (finish === "length" ? " (max tokens reached)" : ""));
    statusLine.textContent = "";
  } catch (err) {
    if (err.name === "AbortError") {
      history.push({ role: "assistant", content: textNode.textContent });
      setMeta(box, "stopped");
      statusLine.textContent = "";
    } else {
      controller.abort(); // stop reading a stream that went wrong
      history.pop(); // the message did not get an answer: let the user change and resend it
      if (!textNode.textContent) box.remove();
      addMessage("error", err.message);
      statusLine.textContent = "the conversation is kept; New chat starts over";
    }
  } finally {
    box.classList.remove("streaming");
    controller = null;
    sendButton.disabled = false;
    stopButton.disabled = true;
    promptBox.focus();
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = promptBox.value;
  if (!text.trim() || controller) return;
  promptBox.value = "";
  send(text);
});
promptBox.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
stopButton.addEventListener("click", () => { if (controller) controller.abort(); });
$("new-chat").addEventListener("click", () => {
  if (controller) controller.abort();
  history = [];
  conversation.replaceChildren();
  statusLine.textContent = "";
  promptBox.focus();
});
$("api-key").addEventListener("change", loadModel);
loadModel();
