// Local-time rendering of unix timestamps (cells with data-ts).
document.querySelectorAll("[data-ts]").forEach(function (el) {
  var t = parseFloat(el.dataset.ts);
  if (!isNaN(t)) el.textContent = new Date(t * 1000).toLocaleString();
});
