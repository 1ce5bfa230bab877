// Lineage graph: highlight a node's edges on hover; wheel zooms and drag pans (viewBox).
(function () {
  var svg = document.getElementById("lineage");
  if (!svg) return;
  svg.querySelectorAll(".node").forEach(function (node) {
    var key = node.dataset.key;
    node.addEventListener("mouseenter", function () {
      node.classList.add("hl");
      svg.querySelectorAll('.edge[data-src="' + key + '"], .edge[data-dst="' + key + '"]').forEach(function (e) { e.classList.add("hl"); });
    });
    node.addEventListener("mouseleave", function () { svg.querySelectorAll(".hl").forEach(function (e) { e.classList.remove("hl"); }); });
  });
  var vb = svg.getAttribute("viewBox").split(" ").map(Number), drag = null;
  function apply() { svg.setAttribute("viewBox", vb.join(" ")); }
  svg.addEventListener("wheel", function (ev) {
    ev.preventDefault();
    var f = ev.deltaY > 0 ? 1.15 : 1 / 1.15, r = svg.getBoundingClientRect();
    var mx = vb[0] + (ev.clientX - r.left) / r.width * vb[2], my = vb[1] + (ev.clientY - r.top) / r.height * vb[3];
    vb = [mx - (mx - vb[0]) * f, my - (my - vb[1]) * f, vb[2] * f, vb[3] * f]; apply();
  }, { passive: false });
  svg.addEventListener("mousedown", function (ev) { drag = [ev.clientX, ev.clientY, vb[0], vb[1]]; });
  window.addEventListener("mouseup", function () { drag = null; });
  window.addEventListener("mousemove", function (ev) {
    if (!drag) return; var r = svg.getBoundingClientRect();
    vb[0] = drag[2] - (ev.clientX - drag[0]) / r.width * vb[2]; vb[1] = drag[3] - (ev.clientY - drag[1]) / r.height * vb[3]; apply();
  });
})();
