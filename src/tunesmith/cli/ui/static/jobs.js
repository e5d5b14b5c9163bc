// "New run" form (live validation, estimate, start) and a job's live page (server-sent events).
(function () {
  "use strict";

  function token() {
    var meta = document.querySelector("meta[name=csrf-token]");
    return meta ? meta.getAttribute("content") : "";
  }

  function post(url, body) {
    if (window.tunesmith && window.tunesmith.post) { return window.tunesmith.post(url, body); }
    return fetch(url, {method: "POST", credentials: "same-origin",
      headers: {"Content-Type": "application/json", "X-Tunesmith-CSRF": token()},
      body: JSON.stringify(body || {})});
  }

  function message(reply) {  // an {error: {message}} answer, or {error: "..."}
    var e = reply && reply.error;
    return typeof e === "string" ? e : (e && e.message) || "request failed";
  }

  function values(form) {
    var out = {};
    form.querySelectorAll("input[name], select[name]").forEach(function (el) {
      var box = el.closest("fieldset");
      if (box && box.hidden) { return; }
      out[el.name] = el.type === "checkbox" ? el.checked : el.value;
    });
    return out;
  }

  function showMethodGroups(form) {
    var method = form.querySelector("[name='train.method']");
    if (!method) { return; }
    form.querySelectorAll("fieldset[data-methods]").forEach(function (box) {
      box.hidden = box.getAttribute("data-methods").split(" ").indexOf(method.value) < 0;
    });
    var lr = form.querySelector("[name='train.learning_rate']");
    var rates = JSON.parse(form.getAttribute("data-learning-rates") || "{}");
    if (lr && rates[method.value] !== undefined) { lr.placeholder = "method default: " + rates[method.value]; }
  }

  function setupForm(form) {
    var status = document.getElementById("form-status");
    var errorBox = document.getElementById("form-error");
    var yamlBox = document.getElementById("form-yaml");
    var timer = null;
    var seq = 0;

    function validate() {
      var mine = ++seq;
      return post("/api/validate", {values: values(form)}).then(function (r) { return r.json(); }).then(function (reply) {
        if (mine !== seq) { return reply; }
        errorBox.textContent = reply.ok ? "" : (reply.error || message(reply));
        status.textContent = reply.ok ? "config is valid" : "";
        if (yamlBox && reply.yaml !== undefined) { yamlBox.textContent = reply.yaml; }
        return reply;
      });
    }

    function later() {
      clearTimeout(timer);
      timer = setTimeout(validate, 400);
    }

    form.addEventListener("input", later);
    form.addEventListener("change", function () { showMethodGroups(form); later(); });
    showMethodGroups(form);

    document.getElementById("estimate").addEventListener("click", function () {
      var out = document.getElementById("estimate-result");
      out.textContent = "estimating (loads the data and the tokenizer)...";
      post("/api/estimate", {values: values(form)}).then(function (r) { return r.json(); }).then(function (reply) {
        if (!reply.ok) { out.textContent = reply.error || message(reply); return; }
        var e = reply.estimate;
        var hw = reply.hardware;
        out.textContent = (e ? reply.method + ": about " + e.memory_mb + " MB and " + Math.round(e.seconds) +
          " s of training on " + hw.name + (e.fits ? "" : " (does NOT fit this machine's memory)")
          : reply.method + " trains no weights: no estimate") + "\n" + reply.recommendation.reason;
      });
    });

    form.addEventListener("submit", function (event) {
      event.preventDefault();
      post("/api/jobs", {values: values(form)}).then(function (r) { return r.json(); }).then(function (reply) {
        if (reply.id) { window.location.href = "/jobs/" + encodeURIComponent(reply.id); return; }
        errorBox.textContent = message(reply);
      });
    });
  }

  function fmtSeconds(s) {
    var m = Math.floor(s / 60);
    return (m ? m + " min " : "") + (s % 60) + " s";
  }

  function drawChart(canvas, losses, vals) {
    var ctx = canvas.getContext && canvas.getContext("2d");
    if (!ctx) { return; }
    var all = losses.concat(vals);
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    if (!all.length) { return; }
    var maxStep = Math.max.apply(null, all.map(function (p) { return p[0]; })) || 1;
    var ys = all.map(function (p) { return p[1]; });
    var lo = Math.min.apply(null, ys), hi = Math.max.apply(null, ys);
    var span = hi - lo || 1;
    function line(points, colour) {
      ctx.strokeStyle = colour;
      ctx.beginPath();
      points.forEach(function (p, i) {
        var x = 30 + (canvas.width - 40) * p[0] / maxStep;
        var y = canvas.height - 20 - (canvas.height - 30) * (p[1] - lo) / span;
        if (i) { ctx.lineTo(x, y); } else { ctx.moveTo(x, y); }
      });
      ctx.stroke();
    }
    line(losses, "#3366cc");
    line(vals, "#dc3912");
  }

  function setupJob(section) {
    var id = section.getAttribute("data-job");
    var el = function (name) { return document.getElementById(name); };
    var losses = [], vals = [], source = null;
    var rows = {};  // validation rows by step: an event seen again (a rewritten log) replaces its row
    var flagged = {};  // overfitting flags shown, by step and signal

    function live(state) { return state === "running" || state === "orphaned"; }

    function showStatus(s) {
      el("job-state").textContent = s.state;
      el("job-exit").textContent = s.exit_code === null || s.exit_code === undefined ? "" : "(exit code " + s.exit_code + ")";
      el("job-stop").disabled = !live(s.state);
      el("job-resume").disabled = live(s.state) || s.state === "done";
      if (s.run_dir) { el("job-run").hidden = false; el("job-run").href = "/runs/" + s.run_dir; }
    }

    // Each record's event carries an id (the log offset after it): when the connection drops, the
    // browser reconnects with Last-Event-ID and the server continues from there, so nothing is replayed.
    // A record seen again anyway (the log was rewritten by a resume) replaces what was drawn for its step.
    function connect() {
      if (source) { source.close(); }
      source = new EventSource("/api/jobs/" + encodeURIComponent(id) + "/events");
      source.addEventListener("status", function (m) {
        var s = JSON.parse(m.data);
        showStatus(s);
        if (!live(s.state)) { source.close(); }
      });
      source.addEventListener("progress", function (m) {
        var p = JSON.parse(m.data);
        el("job-loss").textContent = p.loss;
        el("job-step").textContent = "step " + p.step + (p.total ? " / " + p.total : "");
        if (p.total) { el("job-progress").max = p.total; el("job-progress").value = p.step; }
        el("job-eta").textContent = p.eta_s !== null && p.eta_s !== undefined ? "ETA " + fmtSeconds(p.eta_s) : "";
        el("job-phase").textContent = p.phase || "";
        while (losses.length && losses[losses.length - 1][0] >= p.step) { losses.pop(); }
        losses.push([p.step, p.loss]);
        if (losses.length > 5000) { losses.shift(); }
        drawChart(el("job-chart"), losses, vals);
      });
      source.addEventListener("phase", function (m) { el("job-phase").textContent = JSON.parse(m.data).phase; });
      source.addEventListener("validation", function (m) {
        var v = JSON.parse(m.data);
        var figures = Object.keys(v).filter(function (k) {
          return ["type", "step", "epoch", "val_loss", "train_loss"].indexOf(k) < 0;
        }).map(function (k) { return k + " " + v[k]; }).join(", ");
        var row = document.createElement("tr");
        [v.step, v.val_loss, figures].forEach(function (text) {
          var cell = document.createElement("td");
          cell.textContent = text;
          row.appendChild(cell);
        });
        var seen = rows[v.step];
        if (seen) { seen.replaceWith(row); } else { section.querySelector("#job-validation tbody").appendChild(row); }
        rows[v.step] = row;
        vals = vals.filter(function (pt) { return pt[0] !== v.step; });
        vals.push([v.step, v.val_loss]);
        drawChart(el("job-chart"), losses, vals);
      });
      source.addEventListener("overfitting", function (m) {
        var f = JSON.parse(m.data);
        var key = f.step + " " + (f.flag && f.flag.signal);
        if (flagged[key]) { return; }
        flagged[key] = true;
        var item = document.createElement("li");
        item.textContent = "overfitting at step " + f.step + ": " + (f.flag && f.flag.detail || "");
        el("job-flags").appendChild(item);
      });
    }

    function act(what) {
      post("/api/jobs/" + encodeURIComponent(id) + "/" + what, {}).then(function (r) { return r.json(); }).then(function (reply) {
        if (reply.error) { el("job-error").textContent = message(reply); return; }
        el("job-error").textContent = "";
        showStatus(reply);
        if (what === "resume") {
          losses = []; vals = []; rows = {}; flagged = {};
          section.querySelector("#job-validation tbody").textContent = "";
          el("job-flags").textContent = "";
          connect();
        }
      });
    }

    el("job-stop").addEventListener("click", function () { act("stop"); });
    el("job-resume").addEventListener("click", function () { act("resume"); });
    connect();
  }

  document.addEventListener("DOMContentLoaded", function () {
    var form = document.getElementById("new-run");
    if (form) { setupForm(form); }
    var job = document.getElementById("job");
    if (job) { setupJob(job); }
  });
})();
