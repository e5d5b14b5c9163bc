// Rate: "Create rating pairs" posts /api/rate/export; each A / B / tie choice posts /api/rate/rating
// at once (window.tunesmith.post sends the CSRF token) and the pooled results are redrawn from the
// answer. The rater's earlier choices are loaded when the name is given. The run comes from data-run.
"use strict";

(function () {
  var section = document.getElementById("rate");
  if (!section || !window.tunesmith) { return; }
  var run = section.getAttribute("data-run");
  var message = document.getElementById("rate-message");
  var raterInput = document.getElementById("rate-rater");
  var results = document.getElementById("rate-results");

  function say(text, isError) {
    message.textContent = text;
    message.className = isError ? "error" : "muted";
  }

  function el(tag, text) {
    var node = document.createElement(tag);
    if (text !== undefined) { node.textContent = String(text); }
    return node;
  }

  var create = document.getElementById("rate-create");
  if (create) {
    create.addEventListener("click", function () {
      create.disabled = true;
      say("creating the pairs…", false);
      window.tunesmith.post("/api/rate/export", {run: run}).then(function (answer) {
        if (!answer.ok) { create.disabled = false; say(window.tunesmith.errorText(answer.data), true); return; }
        window.location.reload();
      }, function () { create.disabled = false; say("the workbench did not answer", true); });
    });
    return;
  }

  function drawResults(r) {
    results.textContent = "";
    results.appendChild(el("h2", "Results"));
    var p = r.pooled;
    results.appendChild(el("p", r.one + " against " + r.two + ": " + p.ratings + " ratings by " + r.raters +
      " rater(s) on " + r.pairs + " pairs."));
    var table = el("table");
    table.id = "rate-table";
    var head = el("tr");
    ["outcome for " + r.one, "count", "rate", "95% interval"].forEach(function (h) { head.appendChild(el("th", h)); });
    var thead = el("thead");
    thead.appendChild(head);
    table.appendChild(thead);
    var body = el("tbody");
    ["win", "tie", "loss"].forEach(function (o) {
      var row = el("tr");
      [o, p[o].count, p[o].rate, "[" + p[o].ci_low + ", " + p[o].ci_high + "]"].forEach(function (v) {
        row.appendChild(el("td", v));
      });
      body.appendChild(row);
    });
    table.appendChild(body);
    results.appendChild(table);
    var a = r.agreement || {};
    results.appendChild(el("p", a.statistic ? "Agreement: " + a.statistic + " " + a.value + " on " + a.pairs +
      " pairs" : (a.note || "")));
  }

  function rater() { return raterInput.value.trim(); }

  function loadChoices() {
    var name = rater();
    section.querySelectorAll("input[type=radio]").forEach(function (r) { r.checked = false; });
    if (!name) { return; }
    window.tunesmith.get("/api/rate/ratings?run=" + encodeURIComponent(run) + "&rater=" +
        encodeURIComponent(name)).then(function (answer) {
      if (!answer.ok) { say(window.tunesmith.errorText(answer.data), true); return; }
      var choices = answer.data.choices || {};
      section.querySelectorAll("fieldset.pair").forEach(function (f) {
        var choice = choices[f.getAttribute("data-id")];
        var box = choice && f.querySelector("input[value='" + choice + "']");
        if (box) { box.checked = true; }
      });
    });
  }
  raterInput.addEventListener("change", loadChoices);

  section.querySelectorAll("fieldset.pair input[type=radio]").forEach(function (radio) {
    radio.addEventListener("change", function () {
      var fieldset = radio.closest("fieldset");
      var status = fieldset.querySelector(".status");
      if (!rater()) {
        radio.checked = false;
        say("enter your name first", true);
        raterInput.focus();
        return;
      }
      status.textContent = " saving…";
      window.tunesmith.post("/api/rate/rating", {run: run, rater: rater(), id: fieldset.getAttribute("data-id"),
                                                 choice: radio.value}).then(function (answer) {
        if (!answer.ok) { status.textContent = ""; say(window.tunesmith.errorText(answer.data), true); return; }
        status.textContent = " saved";
        var d = answer.data;
        say(d.ratings + " rating(s) by you saved in human/" + d.file +
          (d.results_error ? "; results not updated: " + d.results_error : ""), !!d.results_error);
        if (d.results) { drawResults(d.results); }
      }, function () { status.textContent = ""; say("the workbench did not answer", true); });
    });
  });
})();
