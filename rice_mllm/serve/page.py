"""The web chat page served at `/`: one self-contained HTML file (no external assets, so it works offline).

It speaks the server's own OpenAI API: images (attached, pasted or dropped) travel as `data:` URLs in `image_url`
parts before the question, the reply streams in over SSE, "New chat" forgets the conversation. Text is inserted with
`textContent` only, never as HTML. Each reply's element counts its streamed pieces (`data-chunks`) and is marked
`data-done` when the stream ends, which the browser test reads.
"""

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>rice_mllm chat</title>
<style>
  :root { font-family: system-ui, sans-serif; color: #1d232b; background: #f4f5f7; }
  body { margin: 0; display: flex; flex-direction: column; height: 100vh; }
  header { display: flex; gap: .75rem; align-items: center; padding: .6rem 1rem; background: #fff;
           border-bottom: 1px solid #dde1e6; }
  header .model { color: #5b6673; font-size: .9rem; flex: 1; overflow: hidden; text-overflow: ellipsis; }
  header input { width: 14rem; }
  #messages { flex: 1; overflow-y: auto; padding: 1rem; display: flex; flex-direction: column; gap: .75rem; }
  .message { max-width: 46rem; padding: .6rem .8rem; border-radius: .6rem; white-space: pre-wrap;
             line-height: 1.4; box-shadow: 0 1px 2px #0001; }
  .message.user { align-self: flex-end; background: #dbeafe; }
  .message.assistant { align-self: flex-start; background: #fff; }
  .message.error { background: #fde2e1; color: #8a1c14; }
  .message img, #attachments img { max-height: 8rem; max-width: 12rem; border-radius: .4rem; margin: 0 .3rem .3rem 0;
                                   display: inline-block; vertical-align: top; }
  #attachments img { max-height: 4rem; cursor: pointer; }
  form { background: #fff; border-top: 1px solid #dde1e6; padding: .6rem 1rem; }
  .row { display: flex; gap: .5rem; align-items: flex-end; }
  textarea { flex: 1; resize: vertical; font: inherit; padding: .5rem; border-radius: .4rem;
             border: 1px solid #c4cad1; }
  button, .file { font: inherit; padding: .45rem .9rem; border-radius: .4rem; border: 1px solid #c4cad1;
                  background: #fff; cursor: pointer; }
  #send { background: #1f6feb; color: #fff; border-color: #1f6feb; }
  #send:disabled { opacity: .5; cursor: wait; }
  .file input { display: none; }
</style>
</head>
<body>
<header>
  <strong>rice_mllm</strong><span class="model" id="model">loading the model name...</span>
  <input id="api-key" type="password" placeholder="API key (if the server asks)" autocomplete="off">
  <button id="new-chat" type="button">New chat</button>
</header>
<main id="messages"></main>
<form id="composer">
  <div id="attachments" title="click an image to remove it"></div>
  <div class="row">
    <label class="file">Image<input id="file" type="file" accept="image/*" multiple></label>
    <textarea id="prompt" rows="2" placeholder="Ask about your pictures (attach, paste or drop images)"></textarea>
    <button id="send" type="submit">Send</button>
  </div>
</form>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const state = { messages: [], attachments: [], model: null, busy: false };

$("api-key").value = localStorage.getItem("rice_mllm_api_key") || "";
$("api-key").addEventListener("change", () => { localStorage.setItem("rice_mllm_api_key", $("api-key").value); });

function headers() {
  const result = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) result.Authorization = "Bearer " + key;
  return result;
}

async function errorOf(response) {
  const body = await response.json().catch(() => null);
  return new Error(body && body.error ? body.error.message : response.status + " " + response.statusText);
}

async function loadModel() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) throw await errorOf(response);
  state.model = (await response.json()).data[0].id;
  $("model").textContent = state.model;
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function attach(files) {
  for (const file of files) if (file.type.startsWith("image/")) state.attachments.push(await readFile(file));
  drawAttachments();
}

function drawAttachments() {
  const box = $("attachments");
  box.replaceChildren();
  state.attachments.forEach((url, index) => {
    const image = document.createElement("img");
    image.src = url;
    image.onclick = () => { state.attachments.splice(index, 1); drawAttachments(); };
    box.append(image);
  });
}

function bubble(role, images, text) {
  const element = document.createElement("div");
  element.className = "message " + role;
  for (const url of images) {
    const image = document.createElement("img");
    image.src = url;
    element.append(image);
  }
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  element.append(body);
  $("messages").append(element);
  element.scrollIntoView({ block: "end" });
  return element;
}

async function streamReply(reply) {
  const response = await fetch("/v1/chat/completions", {
    method: "POST", headers: headers(),
    body: JSON.stringify({ model: state.model, messages: state.messages, stream: true }),
  });
  if (!response.ok) throw await errorOf(response);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", answer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new Error("the stream ended before [DONE]");
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      if (!event.startsWith("data: ")) continue;
      if (event === "data: [DONE]") return answer;
      const chunk = JSON.parse(event.slice(6));
      if (chunk.error) throw new Error(chunk.error.message);
      const piece = chunk.choices.length ? chunk.choices[0].delta.content : "";
      if (piece) {
        answer += piece;
        reply.querySelector(".text").textContent = answer;
        reply.dataset.chunks = Number(reply.dataset.chunks) + 1;
        reply.scrollIntoView({ block: "end" });
      }
    }
  }
}

async function send(event) {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (state.busy || (!text && !state.attachments.length)) return;
  const images = state.attachments;
  const content = images.map((url) => ({ type: "image_url", image_url: { url } }));
  if (text) content.push({ type: "text", text });
  state.messages.push({ role: "user", content });
  bubble("user", images, text);
  $("prompt").value = "";
  state.attachments = [];
  drawAttachments();
  const reply = bubble("assistant", [], "");
  reply.dataset.chunks = 0;
  state.busy = true;
  $("send").disabled = true;
  try {
    if (!state.model) await loadModel();
    const answer = await streamReply(reply);
    state.messages.push({ role: "assistant", content: answer });
    reply.dataset.done = "true";
  } catch (error) {
    state.messages.pop();  // the failed turn is not part of the conversation
    reply.classList.add("error");
    reply.querySelector(".text").textContent = "Error: " + error.message;
    reply.dataset.done = "error";
  } finally {
    state.busy = false;
    $("send").disabled = false;
  }
}

$("composer").addEventListener("submit", send);
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); $("composer").requestSubmit(); }
});
$("file").addEventListener("change", async () => { await attach($("file").files); $("file").value = ""; });
document.addEventListener("paste", (event) => {
  const files = [...event.clipboardData.files].filter((file) => file.type.startsWith("image/"));
  if (files.length) { event.preventDefault(); attach(files); }
});
document.addEventListener("dragover", (event) => event.preventDefault());
document.addEventListener("drop", (event) => { event.preventDefault(); attach(event.dataTransfer.files); });
$("new-chat").addEventListener("click", () => {
  if (state.busy) return;
  state.messages = [];
  state.attachments = [];
  drawAttachments();
  $("messages").replaceChildren();
  $("prompt").focus();
});
loadModel().catch((error) => { $("model").textContent = "(" + error.message + ")"; });
</script>
</body>
</html>
"""
