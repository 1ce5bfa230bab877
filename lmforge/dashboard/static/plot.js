// A small line-chart plotter on <canvas>: several series, nice axis ticks, no dependencies.
(function () {
  function nice(lo, hi, n) {
    if (!(hi > lo)) { hi = lo + 1; lo = lo - 1; }
    var step = Math.pow(10, Math.floor(Math.log10((hi - lo) / n)));
    var err = (hi - lo) / n / step;
    if (err >= 7.5) step *= 10; else if (err >= 3.5) step *= 5; else if (err >= 1.5) step *= 2;
    var ticks = [];
    for (var v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) ticks.push(v);
    return ticks;
  }
  function label(v) {
    var a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e6)) return v.toExponential(1);
    return parseFloat(v.toPrecision(4)).toString();
  }
  function draw(canvas, series) {
    var ctx = canvas.getContext("2d"), W = canvas.width, H = canvas.height, L = 58, R = 10, T = 10, B = 28;
    ctx.clearRect(0, 0, W, H);
    var xs = [], ys = [];
    series.forEach(function (s) { s.points.forEach(function (p) { xs.push(p[0]); ys.push(p[1]); }); });
    ctx.font = "11px system-ui, sans-serif"; ctx.fillStyle = "#6b7380";
    if (!xs.length) { ctx.fillText("no data yet", W / 2 - 30, H / 2); return; }
    var x0 = Math.min.apply(null, xs), x1 = Math.max.apply(null, xs), y0 = Math.min.apply(null, ys), y1 = Math.max.apply(null, ys);
    if (x1 === x0) x1 = x0 + 1;
    if (y1 === y0) { y1 = y0 + Math.abs(y0 || 1) * 0.05; y0 = y0 - Math.abs(y0 || 1) * 0.05; }
    var pad = (y1 - y0) * 0.05; y0 -= pad; y1 += pad;
    var sx = function (x) { return L + (x - x0) / (x1 - x0) * (W - L - R); };
    var sy = function (y) { return T + (1 - (y - y0) / (y1 - y0)) * (H - T - B); };
    ctx.strokeStyle = "#e6e9ed"; ctx.lineWidth = 1; ctx.textAlign = "right";
    nice(y0, y1, 5).forEach(function (v) {
      var y = Math.round(sy(v)) + 0.5; ctx.beginPath(); ctx.moveTo(L, y); ctx.lineTo(W - R, y); ctx.stroke(); ctx.fillText(label(v), L - 4, y + 4);
    });
    ctx.textAlign = "center";
    nice(x0, x1, 6).forEach(function (v) {
      var x = Math.round(sx(v)) + 0.5; ctx.beginPath(); ctx.moveTo(x, T); ctx.lineTo(x, H - B); ctx.stroke(); ctx.fillText(label(v), x, H - B + 14);
    });
    ctx.fillText("step", (L + W - R) / 2, H - 3);
    series.forEach(function (s) {
      ctx.strokeStyle = s.color; ctx.fillStyle = s.color; ctx.lineWidth = 1.8; ctx.beginPath();
      s.points.forEach(function (p, i) { var x = sx(p[0]), y = sy(p[1]); if (i) ctx.lineTo(x, y); else ctx.moveTo(x, y); });
      ctx.stroke();
      if (s.points.length < 40) s.points.forEach(function (p) { ctx.beginPath(); ctx.arc(sx(p[0]), sy(p[1]), 2.5, 0, 7); ctx.fill(); });
    });
  }
  function ema(points, alpha) {
    if (!alpha) return points;
    var out = [], m = null;
    points.forEach(function (p) { m = m === null ? p[1] : alpha * m + (1 - alpha) * p[1]; out.push([p[0], m]); });
    return out;
  }
  window.lmforgePlot = { draw: draw, ema: ema, nice: nice };
})();
