// meddx web page: plain JS, no external code. Talks to the REST API with a bearer token.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const pct = (v) => (v === null || v === undefined) ? "n/a" : (100 * v).toFixed(1) + "%";
  let models = [];

  function headers() {
    const t = $("token").value.trim();
    return t ? { "Authorization": "Bearer " + t } : {};
  }
  function showError(msg) { $("error").textContent = msg || ""; }

  async function api(path, options) {
    const r = await fetch(path, Object.assign({ headers: headers() }, options || {}));
    let body = null;
    try { body = await r.json(); } catch (e) { body = null; }
    if (!r.ok) {
      const why = body && body.message ? body.message : r.statusText;
      const hint = body && body.hint ? " — " + body.hint : "";
      throw new Error(r.status + ": " + why + hint);
    }
    return body;
  }

  async function loadModels() {
    showError("");
    sessionStorage.setItem("meddx-token", $("token").value.trim());
    try {
      models = (await api("/v1/models")).models;
    } catch (e) { showError(e.message); return; }
    const sel = $("model");
    sel.textContent = "";
    for (const m of models) {
      const o = document.createElement("option");
      o.value = m.name;
      o.textContent = m.name + " " + m.version + (m.research_only ? " (research only)" : "");
      sel.appendChild(o);
    }
    describe();
    $("predict").disabled = models.length === 0;
  }

  function describe() {
    const m = models.find((x) => x.name === $("model").value);
    $("model-info").textContent = m ? (m.modality + " · " + m.intended_use + " · data licence: " + m.license) : "";
  }

  function render(p, model) {
    $("result").hidden = false;
    $("ood").hidden = !p.ood;
    $("ood").textContent = p.ood ? "Outside what this model was trained on (OOD score " + p.ood_score.toPrecision(4) + "): the model makes no recommendation for this case." : "";
    $("decision").textContent = p.ood ? "none (outside what this model was trained on)" : (p.decision || p.label);
    const probs = p.calibrated || p.probabilities;
    const pos = model && p.model ? p.model.positive_class : null;
    const key = pos && probs[pos] !== undefined ? pos : p.label;
    $("probability").textContent = key + " " + pct(probs[key]) + (p.calibrated ? "" : " (uncalibrated)");
    $("threshold").textContent = p.threshold !== null && p.threshold !== undefined
      ? "threshold " + p.threshold.toFixed(3) + " (" + p.operating_point + ")" : "";
    $("set").textContent = p.prediction_set ? "{" + p.prediction_set.join(", ") + "}" : "not available";
    $("refer").textContent = p.refer ? "uncertain: refer for expert review" : (p.review ? "flagged for review" : "");
    const tbody = $("probs");
    tbody.textContent = "";
    for (const [k, v] of Object.entries(probs)) {
      const tr = document.createElement("tr");
      for (const text of [k, pct(v), pct(p.probabilities[k])]) {
        const td = document.createElement("td"); td.textContent = text; tr.appendChild(td);
      }
      tbody.appendChild(tr);
    }
    $("image").src = p.image_png ? "data:image/png;base64," + p.image_png : "";
    $("heatmap").src = p.heatmap_png ? "data:image/png;base64," + p.heatmap_png : "";
    $("notice").hidden = !p.notice;
    $("notice").textContent = p.notice || "";
    $("model-line").textContent = "model " + p.model.name + " " + p.model.version + " · sha256 " + p.model.sha256.slice(0, 12) + "…";
  }

  async function predict() {
    showError("");
    const f = $("file").files[0];
    if (!f) { showError("choose an image first"); return; }
    const form = new FormData();
    form.append("file", f, f.name);
    const name = encodeURIComponent($("model").value);
    const explain = $("explain").checked ? "true" : "false";
    $("predict").disabled = true;
    try {
      const body = await api("/v1/models/" + name + "/predict?explain=" + explain, { method: "POST", body: form });
      render(body.predictions[0], body.model);
    } catch (e) { showError(e.message); } finally { $("predict").disabled = false; }
  }

  document.addEventListener("DOMContentLoaded", () => {
    const saved = sessionStorage.getItem("meddx-token");
    if (saved) { $("token").value = saved; }
    $("connect").addEventListener("click", loadModels);
    $("model").addEventListener("change", describe);
    $("predict").addEventListener("click", predict);
  });
})();
