// dts web: the live parts. The pages work without this file; nothing is loaded from elsewhere.
"use strict";
(function () {
  function esc(s) {
    return String(s == null ? "" : s).replace(/[&<>"']/g, function (c) {
      return {"&": "&amp;", "<": "&lt;", ">": "&gt;", "\"": "&quot;", "'": "&#39;"}[c];
    });
  }
  function when(t) { return t ? String(t).replace("T", " ").slice(0, 19) : ""; }

  // Log: live tail (polling /api/log for lines newer than the newest shown)
  var live = document.getElementById("live");
  if (live) {
    var rows = document.getElementById("log-rows");
    var timer = null;
    var tick = function () {
      var first = rows.querySelector("tr[data-time]");
      var after = first ? first.getAttribute("data-time") : "1970-01-01T00:00:00Z";
      var url = live.getAttribute("data-source") + "&after=" + encodeURIComponent(after);
      fetch(url, {credentials: "same-origin", headers: {"Accept": "application/json"}})
        .then(function (r) { return r.ok ? r.json() : {events: []}; })
        .then(function (data) {
          var empty = rows.querySelector("tr.empty");
          if (empty && data.events.length) { empty.remove(); }
          data.events.slice().reverse().forEach(function (ev) {
            var tr = document.createElement("tr");
            tr.className = "status-" + esc(ev.status);
            tr.setAttribute("data-time", ev.time);
            tr.innerHTML = "<td class=\"t\">" + esc(when(ev.time)) + "</td><td>" + esc(ev.stage) +
              "</td><td>" + esc(ev.status) + "</td><td>" + esc(ev.event) + "</td><td>" +
              (ev.job ? "<a href=\"/jobs/" + encodeURIComponent(ev.job) + "\">" + esc(ev.job) + "</a>" : "") +
              "</td><td>" + (ev.study_uid ? "<a href=\"/exams/" + encodeURIComponent(ev.study_uid) + "\">" +
              esc(ev.accession || "study") + "</a>" : "") + "</td><td class=\"msg\">" + esc(ev.message) + "</td>";
            rows.insertBefore(tr, rows.firstChild);
          });
        })
        .catch(function () {});
    };
    live.addEventListener("change", function () {
      if (live.checked) { tick(); timer = setInterval(tick, 2000); }
      else if (timer) { clearInterval(timer); timer = null; }
    });
  }

  // Overview: refresh the page's counts every 10 s while it is visible
  if (document.getElementById("queues") && document.getElementById("services")) {
    setInterval(function () {
      if (document.visibilityState === "visible") { window.location.reload(); }
    }, 10000);
  }
})();
