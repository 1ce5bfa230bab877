// Keyboard-driven labelling: 1-5 rate, a-d pick the best answer, e edit, Ctrl+Enter save.
(function () {
  var form = document.getElementById("label-form");
  if (!form) return;
  document.addEventListener("keydown", function (e) {
    var typing = e.target.tagName === "TEXTAREA" || e.target.tagName === "INPUT" && e.target.type === "text";
    if (e.key === "Enter" && e.ctrlKey) { e.preventDefault(); form.submit(); return; }
    if (typing) return;
    var r = form.querySelector('input[name=rating][value="' + e.key + '"]'), c = form.querySelector('input[name=choice][value="' + e.key + '"]');
    if (r) { r.checked = true; e.preventDefault(); }
    else if (c) { c.checked = true; e.preventDefault(); }
    else if (e.key === "e") { e.preventDefault(); document.getElementById("edited").focus(); }
  });
})();
