// Training curves: load each run's metrics.jsonl, then follow it live over server-sent events.
(function () {
  var el = document.getElementById("runs-json");
  if (!el) return;
  var runs = JSON.parse(el.textContent), COLORS = ["#2f6db5", "#d9480f", "#2b8a3e", "#862e9c", "#e67700", "#0b7285", "#c2255c"];
  var data = {}, smooth = 0, pending = false;
  var state = window.lmforgeCurves = { data: data, points: function (id) { return (data[id] || []).length; } };
  function legend(id, role) { return document.querySelector('#legend li[data-run="' + id + '"] [data-role="' + role + '"]'); }
  function redraw() {
    if (pending) return; pending = true;
    requestAnimationFrame(function () {
      pending = false;
      document.querySelectorAll("figure.chart").forEach(function (fig) {
        var key = fig.dataset.key, series = [];
        runs.forEach(function (id, i) {
          var pts = (data[id] || []).filter(function (r) { return typeof r[key] === "number" && isFinite(r[key]); })
            .map(function (r) { return [r.step, r[key]]; });
          series.push({ color: COLORS[i % COLORS.length], points: key === "val_loss" ? pts : lmforgePlot.ema(pts, smooth) });
        });
        lmforgePlot.draw(fig.querySelector("canvas"), series);
      });
      runs.forEach(function (id) { legend(id, "points").textContent = (data[id] || []).length; });
    });
  }
  function follow(id, offset) {
    var src = new EventSource("/api/runs/" + encodeURIComponent(id) + "/metrics/stream?offset=" + offset);
    legend(id, "live").textContent = "● live";
    src.onmessage = function (ev) {
      var msg = JSON.parse(ev.data);
      Array.prototype.push.apply(data[id], msg.records);
      redraw();
    };
    src.addEventListener("end", function (ev) {
      src.close(); legend(id, "live").textContent = ""; legend(id, "state").textContent = JSON.parse(ev.data);
      legend(id, "state").className = "state " + JSON.parse(ev.data);
    });
    src.addEventListener("problem", function (ev) { src.close(); legend(id, "live").textContent = ""; legend(id, "problem").textContent = JSON.parse(ev.data); });
  }
  runs.forEach(function (id, i) {
    document.querySelector('#legend li[data-run="' + id + '"] .swatch').style.background = COLORS[i % COLORS.length];
    data[id] = [];
    fetch("/api/runs/" + encodeURIComponent(id) + "/metrics").then(function (r) { return r.json().then(function (j) { return [r.ok, j]; }); })
      .then(function (res) {
        if (!res[0]) { legend(id, "problem").textContent = res[1].error; if (res[1].error.indexOf("not logged") < 0) return; follow(id, 0); return; }
        data[id] = res[1].records;
        if (res[1].bad_lines) legend(id, "problem").textContent = res[1].bad_lines + " unreadable line(s) skipped";
        redraw();
        if (res[1].state === "running") follow(id, res[1].offset);
      }).catch(function (e) { legend(id, "problem").textContent = "cannot load metrics: " + e; });
  });
  var slider = document.getElementById("smooth");
  slider.addEventListener("input", function () { smooth = parseFloat(slider.value); document.getElementById("smooth-v").textContent = slider.value; redraw(); });
  redraw();
})();
