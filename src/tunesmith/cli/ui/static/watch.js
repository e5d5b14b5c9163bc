// The watch page (cli/ui/watch.py): while training runs, fetch /api/watch every 2 s and swap in the
// chart block the server drew (escaped SVG and table); stop once the server says `done` (training
// finished, the job training it was stopped, failed or interrupted, or its log has been idle ten
// minutes with no job on it) or the run is gone.
(function () {
  "use strict";
  var section = document.getElementById("watch");
  if (!section) { return; }
  var api = section.getAttribute("data-api");
  var body = document.getElementById("watch-body");
  var status = document.getElementById("watch-status");
  var lines = section.getAttribute("data-lines");
  var failures = 0;
  var PERIOD_MS = 2000;
  var MAX_FAILURES = 5;

  function message(data, fallback) {
    if (data && data.error) { return data.error.message || String(data.error); }
    return fallback;
  }

  function show(data) {
    if (String(data.lines) !== lines) {  // redraw only when the log grew
      body.innerHTML = data.html;
      lines = String(data.lines);
    }
    status.textContent = data.status;
    section.setAttribute("data-done", data.done ? "1" : "0");
  }

  function poll() {
    fetch(api, { headers: { Accept: "application/json" }, credentials: "same-origin" })
      .then(function (response) {
        return response.json().then(function (data) { return { ok: response.ok, data: data }; });
      })
      .then(function (answer) {
        failures = 0;
        if (!answer.ok) {  // the run folder went away (a failed run is removed): say so, stop
          status.textContent = "Stopped watching: " + message(answer.data, "the run is no longer readable") + ".";
          section.setAttribute("data-done", "1");
          return;
        }
        show(answer.data);
        if (!answer.data.done) { window.setTimeout(poll, PERIOD_MS); }
      })
      .catch(function () {
        failures += 1;
        if (failures < MAX_FAILURES) {
          window.setTimeout(poll, PERIOD_MS * failures);
        } else {
          status.textContent = "Stopped watching: the workbench does not answer. Reload the page to try again.";
        }
      });
  }

  if (section.getAttribute("data-done") !== "1") { window.setTimeout(poll, PERIOD_MS); }
}());
