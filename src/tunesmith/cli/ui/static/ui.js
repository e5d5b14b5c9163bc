// tunesmith ui: what every page shares (window.tunesmith: post/get with the CSRF token) and the
// runs table's filter, sort and compare picks. No inline scripts: the CSP forbids them.
"use strict";

(function () {
  function csrfToken() {
    var meta = document.querySelector("meta[name='csrf-token']");
    return meta ? meta.getAttribute("content") : "";
  }

  // Resolves to the fetch Response (ok, status, headers) with its body already read: `data` is the
  // parsed JSON answer ({error: text} when not JSON), and `json()` answers the same data again.
  function request(method, url, body) {
    var options = {method: method, credentials: "same-origin", headers: {"Accept": "application/json"}};
    if (method !== "GET") {
      options.headers["X-Tunesmith-CSRF"] = csrfToken();
      if (body instanceof FormData) {
        options.body = body;
      } else if (body !== undefined) {
        options.headers["Content-Type"] = "application/json";
        options.body = JSON.stringify(body);
      }
    }
    return fetch(url, options).then(function (response) {
      return response.text().then(function (text) {
        var data;
        try { data = text ? JSON.parse(text) : {}; } catch (e) { data = {error: text}; }
        response.data = data;
        response.json = function () { return Promise.resolve(data); };
        return response;
      });
    });
  }

  // The message of an error answer: {"error": "..."} or the OpenAI shape {"error": {"message": ...}}.
  function errorText(data) {
    var e = data && data.error;
    if (e && typeof e === "object") { return e.message || JSON.stringify(e); }
    return e ? String(e) : "request failed";
  }

  window.tunesmith = {
    csrfToken: csrfToken,
    post: function (url, body) { return request("POST", url, body); },
    get: function (url) { return request("GET", url); },
    errorText: errorText
  };

  function rowsOf(table) { return Array.prototype.slice.call(table.tBodies[0].rows); }

  function setupFilter(table) {
    var input = document.getElementById("run-filter");
    if (!input) { return; }
    input.addEventListener("input", function () {
      var words = input.value.toLowerCase().split(/\s+/).filter(Boolean);
      rowsOf(table).forEach(function (row) {
        var text = row.textContent.toLowerCase();
        row.hidden = !words.every(function (w) { return text.indexOf(w) >= 0; });
      });
    });
  }

  function sortBy(table, th) {
    var key = th.getAttribute("data-sort");
    var numeric = th.getAttribute("data-type") === "number";
    var ascending = th.getAttribute("aria-sort") !== "ascending";
    table.querySelectorAll("th[data-sort]").forEach(function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    var rows = rowsOf(table);
    rows.sort(function (a, b) {
      var x = a.getAttribute("data-" + key) || "", y = b.getAttribute("data-" + key) || "";
      var order;
      if (numeric) {  // rows without a figure go last either way
        if (x === "" || y === "") { return (x === "") - (y === ""); }
        order = parseFloat(x) - parseFloat(y);
      } else {
        order = x.localeCompare(y);
      }
      return ascending ? order : -order;
    });
    rows.forEach(function (row) { table.tBodies[0].appendChild(row); });
  }

  function setupSort(table) {
    table.querySelectorAll("th[data-sort]").forEach(function (th) {
      th.addEventListener("click", function () { sortBy(table, th); });
      th.addEventListener("keydown", function (event) {
        if (event.key === "Enter" || event.key === " ") { event.preventDefault(); sortBy(table, th); }
      });
    });
  }

  function setupCompare(table) {
    var button = document.getElementById("compare-picked");
    var boxes = table.querySelectorAll("input.pick");
    function picked() {
      return Array.prototype.filter.call(boxes, function (b) { return b.checked; });
    }
    function update() {
      var n = picked().length;
      button.disabled = n !== 2;
      button.textContent = n === 2 ? "Compare the two picked runs" : "Pick two runs to compare (" + n + "/2)";
    }
    var wanted = new URLSearchParams(window.location.search).get("compare");
    boxes.forEach(function (box) {
      if (wanted && box.value === wanted) { box.checked = true; }
      box.addEventListener("change", function () {
        var now = picked();  // at most two: picking a third unpicks the earliest other one
        if (box.checked && now.length > 2) { now.filter(function (b) { return b !== box; })[0].checked = false; }
        update();
      });
    });
    button.addEventListener("click", function () {
      var two = picked();
      if (two.length !== 2) { return; }
      window.location.href = "/compare?a=" + encodeURIComponent(two[0].value) +
        "&b=" + encodeURIComponent(two[1].value);
    });
    update();
  }

  document.addEventListener("DOMContentLoaded", function () {
    var table = document.getElementById("runs");
    if (!table) { return; }
    setupFilter(table);
    setupSort(table);
    setupCompare(table);
  });
})();
