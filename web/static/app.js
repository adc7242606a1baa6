// Umbra console: a little script on top of pages that work without it.
// It places the snapshot timeline by time, enables typed confirmations,
// polls a task's progress and shows the live event stream.
"use strict";
(function () {
  // The timeline: each snapshot at its place in time.
  var tl = document.getElementById("timeline");
  if (tl) {
    tl.classList.add("placed");
    tl.querySelectorAll("li").forEach(function (li) {
      li.style.left = (Number(li.dataset.pos) / 10) + "%";
    });
  }

  // Typed confirmations: the button waits for the expected word.
  document.querySelectorAll("form.typed").forEach(function (f) {
    var input = f.querySelector("input[name=confirm]");
    var btn = f.querySelector("button[type=submit]");
    var check = function () { btn.disabled = input.value.trim() !== f.dataset.expect; };
    input.addEventListener("input", check);
    check();
  });

  // A running task: poll its progress once a second until it ends.
  var task = document.getElementById("task");
  if (task && task.dataset.state === "running") {
    var bar = document.getElementById("progress");
    var text = document.getElementById("progress-text");
    var state = document.getElementById("task-state");
    var human = function (n) {
      var u = ["B", "KiB", "MiB", "GiB", "TiB"], i = 0;
      while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
      return (i ? n.toFixed(1) : n) + " " + u[i];
    };
    var poll = function () {
      fetch("/tasks/" + task.dataset.task, { headers: { Accept: "application/json" }, credentials: "same-origin" })
        .then(function (r) { if (!r.ok) { throw new Error("HTTP " + r.status); } return r.json(); })
        .then(function (t) {
          if (t.total > 0) { bar.max = t.total; bar.value = t.done; text.textContent = human(t.done) + " of " + human(t.total); }
          if (t.state === "running") { setTimeout(poll, 1000); return; }
          task.dataset.state = t.state;
          bar.max = 1; bar.value = 1;
          state.textContent = t.state === "failed" ? "Failed: " + t.error : "Done: " + t.result;
        })
        .catch(function (e) { state.textContent = "Lost the task's progress (" + e.message + "): reload the page."; });
    };
    setTimeout(poll, 1000);
  }

  // Live events: Server-Sent Events from the service's event stream.
  var list = document.getElementById("events");
  if (list && window.EventSource) {
    var st = document.getElementById("events-state");
    var es = new EventSource("/events/stream");
    es.onopen = function () { st.textContent = "Connected: new events appear at the top."; };
    es.onerror = function () { st.textContent = "Disconnected: reconnecting… (if this stays, your session may have expired: reload the page)"; };
    es.onmessage = function (m) {
      var ev = JSON.parse(m.data);
      var li = document.createElement("li");
      var t = document.createElement("time");
      t.dateTime = ev.time; t.textContent = new Date(ev.time).toLocaleString();
      var k = document.createElement("span");
      k.className = "kind"; k.textContent = ev.kind;
      var what = [ev.volume && (ev.snapshot ? ev.volume + "@" + ev.snapshot : ev.volume), ev.set_id && "set " + ev.set_id, ev.job && "job " + ev.job, ev.state, ev.message,
        ev.dropped && ev.dropped + " earlier events missed"].filter(Boolean).join(" · ");
      li.append(t, k, document.createTextNode(what));
      list.prepend(li);
      while (list.children.length > 200) { list.lastChild.remove(); }
    };
  }
})();
