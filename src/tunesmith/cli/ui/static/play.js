// Try it: classification posts one text (window.tunesmith.post) and shows both labels with their
// probabilities; generation and chat read the server-sent events of POST /api/play/generate as they
// arrive (fetch's body stream: EventSource cannot POST or send the CSRF token). The run and task
// come from data-* attributes (no inline script); every text is set with textContent.
"use strict";

(function () {
  var section = document.getElementById("play");
  if (!section || !window.tunesmith) { return; }
  var run = section.getAttribute("data-run");
  var task = section.getAttribute("data-task");
  var form = document.getElementById("play-form");
  var input = document.getElementById("play-input");
  var go = document.getElementById("play-go");
  var message = document.getElementById("play-message");
  var cells = {tuned: document.getElementById("play-tuned"), base: document.getElementById("play-base")};
  var history = {tuned: [], base: []};  // chat: each side keeps its own answers

  function say(text, isError) {
    message.textContent = text;
    message.className = isError ? "error" : "muted";
  }

  function el(tag, text, cls) {
    var node = document.createElement(tag);
    if (text !== undefined) { node.textContent = text; }
    if (cls) { node.className = cls; }
    return node;
  }

  function showLabel(cell, answer) {
    cell.textContent = "";
    if (answer.error) { cell.appendChild(el("p", answer.error, "error")); return; }
    var head = el("p");
    head.appendChild(el("b", answer.label));
    head.className = "play-label";
    cell.appendChild(head);
    var table = el("table");
    var body = el("tbody");
    Object.keys(answer.probabilities).sort(function (a, b) {
      return answer.probabilities[b] - answer.probabilities[a];
    }).forEach(function (label) {
      var row = el("tr");
      row.appendChild(el("td", label));
      row.appendChild(el("td", answer.probabilities[label].toFixed(4)));
      body.appendChild(row);
    });
    table.appendChild(body);
    cell.appendChild(table);
  }

  function classify(text) {
    return window.tunesmith.post("/api/play/classify", {run: run, text: text}).then(function (answer) {
      if (!answer.ok) { say(window.tunesmith.errorText(answer.data), true); return; }
      showLabel(cells.tuned, answer.data.tuned);
      showLabel(cells.base, answer.data.base);
      say("", false);
    });
  }

  // Chat: the conversation so far, one block per turn, with an answer block to fill per side.
  function answerBlocks(text) {
    var out = {};
    ["tuned", "base"].forEach(function (side) {
      if (task !== "chat") { cells[side].textContent = ""; }
      if (task === "chat") { cells[side].appendChild(el("p", text, "play-user")); }
      out[side] = el("pre", "", "play-answer");
      cells[side].appendChild(out[side]);
    });
    return out;
  }

  function handle(event, blocks, texts) {
    if (event.error) {
      blocks[event.side].appendChild(el("span", " " + event.error, "error"));
    } else if (event.text !== undefined) {
      texts[event.side] += event.text;
      blocks[event.side].textContent = texts[event.side];
    } else if (event.finish) {
      blocks[event.side].setAttribute("data-finish", event.finish);
    }
  }

  function readEvents(response, blocks, texts) {
    var reader = response.body.getReader();
    var decoder = new TextDecoder();
    var buffer = "";
    function pump() {
      return reader.read().then(function (chunk) {
        if (chunk.done) { return; }
        buffer += decoder.decode(chunk.value, {stream: true});
        var parts = buffer.split("\n\n");
        buffer = parts.pop();
        parts.forEach(function (part) {
          if (part.indexOf("data: ") !== 0) { return; }
          var data = part.slice(6);
          if (data !== "[DONE]") { handle(JSON.parse(data), blocks, texts); }
        });
        return pump();
      });
    }
    return pump();
  }

  function generate(text) {
    var maxTokens = parseInt(document.getElementById("play-max-tokens").value, 10) || 64;
    var body = {run: run, max_tokens: maxTokens};
    if (task === "chat") {
      history.tuned.push({role: "user", content: text});
      history.base.push({role: "user", content: text});
      body.messages = history.tuned;
      body.base_messages = history.base;
    } else {
      body.prompt = text;
    }
    return fetch("/api/play/generate", {
      method: "POST", credentials: "same-origin", body: JSON.stringify(body),
      headers: {"Content-Type": "application/json", "X-Tunesmith-CSRF": window.tunesmith.csrfToken()}
    }).then(function (response) {
      if (!response.ok) {
        if (task === "chat") { history.tuned.pop(); history.base.pop(); }
        return response.text().then(function (t) {
          var data;
          try { data = JSON.parse(t); } catch (e) { data = {error: t}; }
          say(window.tunesmith.errorText(data), true);
        });
      }
      var blocks = answerBlocks(text);
      var texts = {tuned: "", base: ""};
      say("answering…", false);
      return readEvents(response, blocks, texts).then(function () {
        if (task === "chat") {
          history.tuned.push({role: "assistant", content: texts.tuned});
          history.base.push({role: "assistant", content: texts.base});
          input.value = "";
        }
        say("", false);
      });
    });
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    var text = input.value;
    if (!text.trim()) { return; }
    go.disabled = true;
    say(task === "classification" ? "classifying…" : "starting…", false);
    var done = task === "classification" ? classify(text) : generate(text);
    done.catch(function () { say("the workbench did not answer", true); }).then(function () { go.disabled = false; });
  });

  var clear = document.getElementById("play-clear");
  if (clear) {
    clear.addEventListener("click", function () {
      history = {tuned: [], base: []};
      cells.tuned.textContent = "";
      cells.base.textContent = "";
      say("", false);
    });
  }
})();
