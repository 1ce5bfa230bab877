// Serving monitor: poll the dashboard's scrape of the server's /metrics and this machine's resources.
(function () {
  var url = document.getElementById("url").value, history = [], last = null;
  function rows(table, obj, head) {
    var t = document.getElementById(table); t.innerHTML = head || "";
    Object.keys(obj).forEach(function (k) {
      var tr = document.createElement("tr"), th = document.createElement("th"), td = document.createElement("td");
      th.textContent = k; td.textContent = typeof obj[k] === "number" ? +obj[k].toFixed(3) : JSON.stringify(obj[k]); td.className = "n";
      tr.appendChild(th); tr.appendChild(td); t.appendChild(tr);
    });
  }
  function problem(msg) { var p = document.getElementById("problem"); p.hidden = !msg; p.textContent = msg || ""; }
  function tick() {
    fetch("/api/machine").then(function (r) { return r.json(); }).then(function (m) {
      var gpus = m.gpus || []; delete m.gpus;
      gpus.forEach(function (g) { m["GPU " + g.index + " " + g.name] = g.util_percent + " % util, " + g.mem_used_gb + " / " + g.mem_total_gb + " GB"; });
      rows("machine", m);
    });
    if (!url) return;
    fetch("/api/serving?url=" + encodeURIComponent(url)).then(function (r) { return r.json().then(function (j) { return [r.ok, j]; }); })
      .then(function (res) {
        if (!res[0]) { problem(res[1].error); return; }
        problem(""); var s = res[1], now = Date.now() / 1000;
        document.getElementById("scraped").textContent = s.url + " · " + new Date().toLocaleTimeString();
        rows("server", Object.assign({}, s.gauges, s.counters));
        var lat = document.getElementById("latency"); lat.innerHTML = "<tr><th></th><th>p50</th><th>p90</th><th>p99</th><th>requests</th></tr>";
        Object.keys(s.latency).forEach(function (k) {
          var v = s.latency[k], tr = document.createElement("tr");
          [k, v.p50, v.p90, v.p99, v.count].forEach(function (x, i) { var c = document.createElement(i ? "td" : "th"); c.textContent = x === null ? "–" : (typeof x === "number" ? +x.toFixed(4) : x); tr.appendChild(c); });
          lat.appendChild(tr);
        });
        var gen = s.counters["generated tokens (total)"];
        if (last && gen !== undefined) { history.push([history.length, (gen - last[1]) / Math.max(now - last[0], 1e-3)]); if (history.length > 120) history.shift(); }
        if (gen !== undefined) last = [now, gen];
        lmforgePlot.draw(document.getElementById("tps"), [{ color: "#2f6db5", points: history }]);
      }).catch(function (e) { problem("monitor error: " + e); });
  }
  tick(); setInterval(tick, 2000);
})();
