// Playground: chat with an OpenAI-compatible server through the dashboard's streaming relay; optionally the same
// prompt to a second model, side by side (each side keeps its own conversation).
(function () {
  var csrf = document.querySelector('meta[name="csrf-token"]').content, busy = false;
  var chat = document.getElementById("chat");
  var sides = [{ base: "base-url", model: "model", messages: [] }, { base: "base-url-2", model: "model-2", messages: [] }];
  function problem(msg) { var p = document.getElementById("problem"); p.hidden = !msg; p.textContent = msg || ""; }
  function val(id) { return document.getElementById(id).value; }
  function bubble(parent, role, label, text) {
    var d = document.createElement("div"); d.className = "msg " + role; d.dataset.role = role;
    var b = document.createElement("b"); b.textContent = label; var t = document.createElement("div"); t.className = "content"; t.textContent = text;
    d.appendChild(b); d.appendChild(t); parent.appendChild(d); return t;
  }
  function loadModels(side) {
    var sel = document.getElementById(side.model);
    return fetch("/api/playground/models?base_url=" + encodeURIComponent(val(side.base))).then(function (r) { return r.json().then(function (j) { return [r.ok, j]; }); })
      .then(function (res) {
        if (!res[0]) { problem(res[1].error); return; }
        problem(""); sel.innerHTML = "";
        res[1].models.forEach(function (m) { var o = document.createElement("option"); o.textContent = m; sel.appendChild(o); });
      });
  }
  async function stream(side, out) {
    var resp = await fetch("/api/playground/chat", { method: "POST", headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify({ base_url: val(side.base), model: val(side.model), messages: side.messages,
        temperature: parseFloat(val("temperature")), top_p: parseFloat(val("top-p")), max_tokens: parseInt(val("max-tokens"), 10) }) });
    if (!resp.ok) { var err = await resp.json(); throw new Error(err.error); }
    var reader = resp.body.getReader(), dec = new TextDecoder(), buf = "", answer = "";
    while (true) {
      var chunk = await reader.read(); if (chunk.done) break;
      buf += dec.decode(chunk.value, { stream: true });
      var events = buf.split("\n\n"); buf = events.pop();
      events.forEach(function (ev) {
        if (ev.indexOf("event: problem") === 0) { problem(JSON.parse(ev.split("data: ")[1])); return; }
        if (ev.indexOf("data: ") !== 0 || ev === "data: [DONE]") return;
        var delta = ((JSON.parse(ev.slice(6)).choices || [])[0] || {}).delta || {};
        if (delta.content) { answer += delta.content; out.textContent = answer; }
      });
    }
    out.parentNode.dataset.done = "1";
    return answer;
  }
  async function send() {
    var text = val("prompt").trim();
    if (!text || busy) return;
    busy = true; problem(""); document.getElementById("prompt").value = "";
    var active = document.getElementById("compare").checked ? sides : sides.slice(0, 1);
    bubble(chat, "user", "user", text);
    var row = document.createElement("div"); row.className = "answers"; chat.appendChild(row);
    await Promise.all(active.map(async function (side, i) {
      side.messages.push({ role: "user", content: text });
      var out = bubble(row, "assistant", active.length > 1 ? "assistant " + "ab"[i] + " · " + val(side.model) : "assistant", "");
      out.parentNode.dataset.side = "ab"[i];
      try { side.messages.push({ role: "assistant", content: await stream(side, out) }); }
      catch (e) { side.messages.pop(); out.parentNode.remove(); problem(String(e.message || e)); }
    }));
    busy = false;
  }
  document.getElementById("send").addEventListener("submit", send);
  document.getElementById("prompt").addEventListener("keydown", function (e) { if (e.key === "Enter" && e.ctrlKey) send(); });
  document.getElementById("clear").addEventListener("click", function () { sides.forEach(function (s) { s.messages = []; }); chat.innerHTML = ""; });
  document.getElementById("reload-models").addEventListener("click", function () { sides.forEach(loadModels); });
  document.getElementById("base-url").addEventListener("change", function () { loadModels(sides[0]); });
  document.getElementById("base-url-2").addEventListener("change", function () { loadModels(sides[1]); });
  loadModels(sides[0]).then(function () { return loadModels(sides[1]); });
})();
