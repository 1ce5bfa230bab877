// Playground: chat with an OpenAI-compatible server through the dashboard's streaming relay.
(function () {
  var csrf = document.querySelector('meta[name="csrf-token"]').content, messages = [], busy = false;
  var chat = document.getElementById("chat"), modelSel = document.getElementById("model");
  function problem(msg) { var p = document.getElementById("problem"); p.hidden = !msg; p.textContent = msg || ""; }
  function bubble(role, text) {
    var d = document.createElement("div"); d.className = "msg " + role; d.dataset.role = role;
    var b = document.createElement("b"); b.textContent = role; var t = document.createElement("div"); t.className = "content"; t.textContent = text;
    d.appendChild(b); d.appendChild(t); chat.appendChild(d); return t;
  }
  function loadModels() {
    var base = document.getElementById("base-url").value;
    fetch("/api/playground/models?base_url=" + encodeURIComponent(base)).then(function (r) { return r.json().then(function (j) { return [r.ok, j]; }); })
      .then(function (res) {
        if (!res[0]) { problem(res[1].error); return; }
        problem(""); modelSel.innerHTML = "";
        res[1].models.forEach(function (m) { var o = document.createElement("option"); o.textContent = m; modelSel.appendChild(o); });
      });
  }
  async function send() {
    var text = document.getElementById("prompt").value.trim();
    if (!text || busy) return;
    busy = true; problem(""); document.getElementById("prompt").value = "";
    messages.push({ role: "user", content: text }); bubble("user", text);
    var out = bubble("assistant", ""), answer = "";
    try {
      var resp = await fetch("/api/playground/chat", { method: "POST", headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
        body: JSON.stringify({ base_url: document.getElementById("base-url").value, model: modelSel.value, messages: messages,
          temperature: parseFloat(document.getElementById("temperature").value), top_p: parseFloat(document.getElementById("top-p").value),
          max_tokens: parseInt(document.getElementById("max-tokens").value, 10) }) });
      if (!resp.ok) { var err = await resp.json(); problem(err.error); out.parentNode.remove(); messages.pop(); return; }
      var reader = resp.body.getReader(), dec = new TextDecoder(), buf = "";
      while (true) {
        var chunk = await reader.read(); if (chunk.done) break;
        buf += dec.decode(chunk.value, { stream: true });
        var events = buf.split("\n\n"); buf = events.pop();
        events.forEach(function (ev) {
          if (ev.indexOf("event: problem") === 0) { problem(JSON.parse(ev.split("data: ")[1])); return; }
          if (ev.indexOf("data: ") !== 0) return;
          var data = ev.slice(6); if (data === "[DONE]") { out.parentNode.dataset.done = "1"; return; }
          var delta = ((JSON.parse(data).choices || [])[0] || {}).delta || {};
          if (delta.content) { answer += delta.content; out.textContent = answer; }
        });
      }
      out.parentNode.dataset.done = "1";
      messages.push({ role: "assistant", content: answer });
    } catch (e) { problem("chat failed: " + e); } finally { busy = false; }
  }
  document.getElementById("send").addEventListener("submit", send);
  document.getElementById("prompt").addEventListener("keydown", function (e) { if (e.key === "Enter" && e.ctrlKey) send(); });
  document.getElementById("clear").addEventListener("click", function () { messages = []; chat.innerHTML = ""; });
  document.getElementById("reload-models").addEventListener("click", loadModels);
  document.getElementById("base-url").addEventListener("change", loadModels);
  loadModels();
})();
