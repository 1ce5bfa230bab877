// A job's output, followed live over server-sent events; the state badge updates when the job ends.
(function () {
  var job = JSON.parse(document.getElementById("job-json").textContent), log = document.getElementById("log");
  var src = new EventSource("/api/jobs/" + encodeURIComponent(job.id) + "/log/stream");
  src.onmessage = function (ev) {
    var msg = JSON.parse(ev.data), atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
    log.textContent += msg.text;
    if (atEnd) log.scrollTop = log.scrollHeight;
  };
  function finish(state) {
    src.close();
    var badge = document.getElementById("job-state"); badge.textContent = state; badge.className = "state " + state;
    var cancel = document.getElementById("cancel"); if (cancel) cancel.remove();
  }
  src.addEventListener("end", function (ev) { finish(JSON.parse(ev.data)); });
  src.addEventListener("problem", function (ev) { src.close(); log.textContent += "\n[" + JSON.parse(ev.data) + "]"; });
})();
