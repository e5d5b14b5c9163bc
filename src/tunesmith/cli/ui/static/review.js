// Review labels: keep / relabel / drop buttons save one decision each (POST /api/review/decision,
// through window.tunesmith.post, which sends the CSRF token); a Label Studio export is imported as a
// file read in the browser and posted as JSON. Row keys come from data-* attributes (no inline script).
"use strict";

(function () {
  var table = document.getElementById("review");
  if (!table || !window.tunesmith) { return; }
  var run = table.getAttribute("data-run");
  var file = table.getAttribute("data-file") || null;
  var message = document.getElementById("review-message");
  var count = document.getElementById("decision-count");

  function say(text, isError) {
    message.textContent = text;
    message.className = isError ? "error" : "";
  }

  function decide(row, action) {
    // The row's key, not its text: text read back from an HTML attribute is not always the text sent
    // (CRLF arrives as LF), so the server looks the exact text and given label up in suspects.jsonl.
    var body = {run: run, row: row.getAttribute("data-row"), action: action};
    if (file) { body.file = file; }
    if (action === "relabel") { body.label = row.querySelector("select").value; }
    row.classList.add("saving");
    window.tunesmith.post("/api/review/decision", body).then(function (answer) {
      row.classList.remove("saving");
      if (!answer.ok) { say(window.tunesmith.errorText(answer.data), true); return; }
      var d = answer.data.decision;
      row.querySelector(".status").textContent = d.action + (d.label ? " \u2192 " + d.label : "");
      row.setAttribute("data-decided", d.action);
      count.textContent = answer.data.count;
      say("saved to " + answer.data.file, false);
    }, function () {
      row.classList.remove("saving");
      say("the workbench did not answer", true);
    });
  }

  table.addEventListener("click", function (event) {
    var button = event.target.closest("button[data-action]");
    if (!button) { return; }
    decide(button.closest("tr"), button.getAttribute("data-action"));
  });

  var input = document.getElementById("ls-import");
  var importButton = document.getElementById("ls-import-button");
  if (!input || !importButton) { return; }
  importButton.addEventListener("click", function () {
    if (!input.files.length) { say("choose Label Studio's JSON export first", true); return; }
    input.files[0].text().then(function (text) {
      var tasks;
      try { tasks = JSON.parse(text); } catch (e) { say("that file is not JSON", true); return; }
      var url = "/api/review/import?run=" + encodeURIComponent(run) + (file ? "&file=" + encodeURIComponent(file) : "");
      return window.tunesmith.post(url, tasks).then(function (answer) {
        if (!answer.ok) { say(window.tunesmith.errorText(answer.data), true); return; }
        var d = answer.data;
        count.textContent = d.count;
        say("imported: keep " + d.keep + ", relabel " + d.relabel + ", drop " + d.drop + "; skipped: " +
            d.skipped_no_annotation + " without an annotation, " + d.skipped_unknown_label + " with an unknown label, " +
            d.skipped_invalid + " invalid. Reload to see them in the queue.", false);
      });
    });
  });
})();
