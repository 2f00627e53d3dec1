// Pneumonet's page for clinicians: upload chest X-rays, read each score, toggle Grad-CAM, read the model card.
// Plain JavaScript, no build step, nothing from outside this origin (pneumonet/web/__init__.py).
// The bearer token lives in the variable `token` below and nowhere else: not in a URL, a cookie or web storage.
"use strict";

(() => {
  const PARALLEL = 2; // requests in flight at once: a long list must not make the endpoint refuse itself (503)
  const PREVIEWABLE = new Set(["image/jpeg", "image/png", "image/bmp", "image/gif", "image/webp"]);
  const SOURCES = {
    site: "site-calibrated (chosen on this site's own labelled images)",
    validation: "training (chosen on the validation patients)",
  };
  const POLICIES = {
    youden: () => "maximising Youden's J (sensitivity + specificity − 1)",
    min_sensitivity: (p) => `the highest threshold whose sensitivity is at least ${fixed(p.min_sensitivity, 2)}`,
    fixed: (p) => `fixed at ${fixed(p.fixed, 3)} (not chosen on data)`,
  };
  const METRICS = [["roc_auc", "ROC-AUC"], ["sensitivity", "Sensitivity"], ["specificity", "Specificity"],
    ["accuracy", "Accuracy"], ["pr_auc", "PR-AUC"], ["precision", "Precision (PPV)"], ["f1", "F1"]];

  let token = null; // the bearer token, only ever here
  let model = null; // GET v1/model, once it answered
  let view = "score";
  const queue = [];
  let running = 0;

  const $ = (id) => document.getElementById(id);

  function el(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (key === "text") node.textContent = value;
      else if (key === "class") node.className = value;
      else node.setAttribute(key, value);
    }
    node.append(...children.filter((child) => child !== null && child !== undefined));
    return node;
  }

  function fixed(value, digits) {
    return typeof value === "number" && Number.isFinite(value) ? value.toFixed(digits) : "–";
  }

  function percent(p) {
    return typeof p === "number" && Number.isFinite(p) ? `${(p * 100).toFixed(1)} %` : "–";
  }

  function threshold(t) {
    return `${fixed(t, 3)} (${percent(t)})`;
  }

  function megabytes(bytes) {
    return `${(bytes / 1e6).toFixed(1)} MB`;
  }

  function fileSize(bytes) {
    return bytes < 1e6 ? `${Math.max(1, Math.round(bytes / 1e3))} kB` : megabytes(bytes);
  }

  function setStatus(text, isError = false) {
    const status = $("status");
    status.textContent = text;
    status.classList.toggle("error", isError);
  }

  // --- the API ---------------------------------------------------------------------------------------

  function api(path, options = {}) {
    const headers = new Headers(options.headers || {});
    if (token) headers.set("Authorization", `Bearer ${token}`);
    return fetch(new URL(path, document.baseURI), { ...options, headers, credentials: "omit", cache: "no-store" });
  }

  async function errorText(response) {
    // The endpoint answers {"error": "..."}; Serve's own proxy (a full queue) answers plain text.
    const text = await response.text().catch(() => "");
    try {
      const body = JSON.parse(text);
      if (body && typeof body.error === "string") return body.error;
    } catch (_) {
      // not JSON: shown as it came
    }
    return text.trim().slice(0, 300) || response.statusText || "no details given";
  }

  function refusal(status, detail, retryAfter) {
    switch (status) {
      case 401:
        return { text: `Not authorised (401): the endpoint refused the token. Enter it again; this image was not scored.`,
          retry: true, reauth: true };
      case 413:
        return { text: `Too large (413): ${detail}` };
      case 415:
        return { text: `Not a supported file type (415): send JPEG, PNG or DICOM. The endpoint said: ${detail}` };
      case 408:
        return { text: `Not answered in time (408): the upload was too slow or the endpoint too busy; try again. ${detail}`,
          retry: true };
      case 422:
        return { text: `Cannot read this image (422): ${detail}` };
      case 503: {
        const when = retryAfter ? `in ${retryAfter} s` : "in a moment";
        return { text: `The endpoint is busy or restarting (503): try again ${when}. ${detail}`, retry: true };
      }
      default:
        return status >= 500
          ? { text: `Server error (${status}): ${detail}`, retry: true }
          : { text: `Refused (${status}): ${detail}` };
    }
  }

  async function call(path, options) {
    // {body} on success, {error: {text, retry?, reauth?}} otherwise; never throws.
    let response;
    try {
      response = await api(path, options);
    } catch (_) {
      return { error: { text: "Could not reach the endpoint (network error): check the connection, then try again.",
        retry: true } };
    }
    if (!response.ok) {
      return { status: response.status,
        error: refusal(response.status, await errorText(response), response.headers.get("Retry-After")) };
    }
    try {
      return { body: await response.json() };
    } catch (_) {
      return { error: { text: `The endpoint's answer (${response.status}) was not JSON.`, retry: true } };
    }
  }

  // --- connecting and the token ------------------------------------------------------------------------

  async function connect() {
    setStatus("Connecting to the endpoint…");
    const { body, status, error } = await call("v1/model");
    if (status === 401) {
      askToken(null);
      return;
    }
    if (error) {
      setStatus(`Cannot load the model's description. ${error.text}`, true);
      showRetryConnect();
      return;
    }
    model = body;
    ready();
  }

  function showRetryConnect() {
    if ($("retry-connect")) return;
    const button = el("button", { type: "button", id: "retry-connect", text: "Connect again" });
    button.addEventListener("click", () => {
      button.remove();
      connect();
    });
    $("status").after(button);
  }

  function askToken(message) {
    token = null;
    $("forget-token").hidden = true;
    $("token-view").hidden = false;
    const note = $("token-message");
    note.hidden = !message;
    note.textContent = message || "";
    if (!model) {
      setStatus("This endpoint needs its access token.");
      showView(null);
    }
    $("token-input").focus();
  }

  async function useToken(event) {
    event.preventDefault();
    const input = $("token-input");
    const given = input.value.trim();
    input.value = ""; // out of the page, in the variable only
    if (!given) return;
    token = given;
    const { body, status, error } = await call("v1/model");
    if (status === 401) {
      askToken("The endpoint refused this token (401): it is wrong or no longer valid. Check it and try again.");
      return;
    }
    if (error) {
      token = null;
      askToken(`The token could not be checked. ${error.text}`);
      return;
    }
    model = body;
    $("token-view").hidden = true;
    $("token-message").hidden = true;
    ready();
  }

  function ready() {
    const source = model.threshold_source === "site" ? "site-calibrated" : "training";
    setStatus(`Model ${model.name}, version ${model.version}: decides at ${percent(model.operating_threshold)} ` +
      `(${source} threshold).`);
    $("forget-token").hidden = !token;
    const limit = model.serving && model.serving.max_request_bytes;
    $("limit-hint").textContent = limit ? `Up to ${megabytes(limit)} per file.` : "";
    renderCard();
    showView(view);
  }

  function showView(name) {
    if (name) view = name;
    const connected = model !== null;
    $("score-view").hidden = !(connected && view === "score");
    $("card-view").hidden = !(connected && view === "card");
    $("nav-score").setAttribute("aria-pressed", String(view === "score"));
    $("nav-card").setAttribute("aria-pressed", String(view === "card"));
  }

  // --- uploads and results ---------------------------------------------------------------------------

  function mediaType(file) {
    const name = file.name.toLowerCase();
    if (name.endsWith(".dcm") || name.endsWith(".dicom")) return "application/dicom";
    return file.type || "application/octet-stream"; // the endpoint then recognises the format by content
  }

  function addFiles(files) {
    if (!model) {
      setStatus("Not connected yet: the files were not sent.", true);
      return;
    }
    for (const file of files) queue.push(createItem(file));
    $("clear").disabled = false;
    pump();
  }

  function createItem(file) {
    const node = $("result-template").content.firstElementChild.cloneNode(true);
    const part = (selector) => node.querySelector(selector);
    const item = { file, node, part, type: mediaType(file), result: null, overlay: null, busy: false, url: null };
    part(".file").textContent = `${file.name} · ${fileSize(file.size)}`;
    item.previewable = PREVIEWABLE.has(item.type);
    if (item.previewable) {
      item.url = URL.createObjectURL(file);
      part(".xray").src = item.url;
      part(".xray").alt = `Chest X-ray ${file.name}`;
      part(".xray").addEventListener("error", () => {
        part(".xray").hidden = true;
        part(".no-preview").hidden = false;
      }, { once: true });
    } else {
      part(".xray").hidden = true;
      part(".no-preview").hidden = false;
    }
    part(".gradcam").addEventListener("click", () => toggleGradcam(item));
    part(".retry").addEventListener("click", () => {
      part(".retry").hidden = true;
      queue.push(item);
      pump();
    });
    $("results").append(node);
    return item;
  }

  function pump() {
    while (running < PARALLEL && queue.length) {
      const item = queue.shift();
      running += 1;
      scoreItem(item).finally(() => {
        running -= 1;
        pump();
      });
    }
  }

  function predict(item, explain) {
    return call(explain ? "v1/predict?explain=gradcam" : "v1/predict",
      { method: "POST", headers: { "Content-Type": item.type }, body: item.file });
  }

  async function scoreItem(item) {
    const { node, part, file } = item;
    node.dataset.state = "pending";
    part(".state").hidden = false;
    part(".state").textContent = "Scoring…";
    part(".message").hidden = true;
    const limit = model.serving && model.serving.max_request_bytes;
    if (limit && file.size > limit) {
      fail(item, { text: `Too large (413, not sent): ${megabytes(file.size)} is over this endpoint's limit of ` +
        `${megabytes(limit)} per file (serve.max_request_bytes).` });
      return;
    }
    // A file the browser cannot show is scored with its Grad-CAM at once: the answer carries the model's view.
    const { body, error } = await predict(item, !item.previewable);
    if (error) fail(item, error);
    else showResult(item, body);
  }

  function fail(item, error) {
    const { node, part } = item;
    node.dataset.state = "error";
    part(".state").hidden = true;
    const message = part(".message");
    message.textContent = error.text;
    message.hidden = false;
    part(".retry").hidden = !error.retry;
    if (error.reauth) askToken("The endpoint refused the token (401). Enter it again, then try the images again.");
  }

  function showResult(item, body) {
    const { node, part } = item;
    item.result = body;
    const positive = body.prediction === ((model && model.positive_class) || "PNEUMONIA");
    node.dataset.state = "done";
    node.dataset.prediction = body.prediction;
    part(".state").hidden = true;
    part(".message").hidden = true;
    const decision = part(".decision");
    decision.hidden = false;
    decision.className = `decision ${positive ? "positive" : "negative"}`;
    decision.textContent = positive
      ? `${body.prediction}: probability at or above the threshold`
      : `${body.prediction}: probability below the threshold`;
    part(".facts").hidden = false;
    const probability = part(".probability");
    probability.textContent = percent(body.probability);
    probability.dataset.probability = String(body.probability);
    const shown = part(".threshold");
    shown.textContent = `${percent(body.threshold)} — ${SOURCES[body.threshold_source] || body.threshold_source}`;
    shown.dataset.threshold = String(body.threshold);
    shown.dataset.source = body.threshold_source;
    part(".model").textContent = `${body.model.name}, version ${body.model.version}`;
    if (body.gradcam_png) item.overlay = `data:image/png;base64,${body.gradcam_png}`;
    if (body.input_png && !item.previewable) {
      const xray = part(".xray");
      xray.src = `data:image/png;base64,${body.input_png}`;
      xray.alt = `Chest X-ray ${item.file.name}, as the model saw it`;
      xray.hidden = false;
      part(".no-preview").hidden = true;
      part(".file").textContent += ` · shown as the model saw it (${body.gradcam_size.join("×")} px)`;
    }
    part(".gradcam").hidden = false;
  }

  async function toggleGradcam(item) {
    const { part } = item;
    const button = part(".gradcam");
    if (item.busy) return;
    const on = button.getAttribute("aria-pressed") !== "true";
    if (on && !item.overlay) {
      item.busy = true;
      button.setAttribute("aria-busy", "true");
      button.textContent = "Computing Grad-CAM…";
      const { body, error } = await predict(item, true);
      item.busy = false;
      button.removeAttribute("aria-busy");
      button.textContent = "Show Grad-CAM";
      if (error) {
        const message = part(".message");
        message.textContent = `Grad-CAM not available. ${error.text}`;
        message.hidden = false;
        if (error.reauth) askToken("The endpoint refused the token (401). Enter it again.");
        return;
      }
      item.overlay = `data:image/png;base64,${body.gradcam_png}`;
    }
    const overlay = part(".overlay");
    if (on) {
      overlay.src = item.overlay;
      overlay.alt = `Grad-CAM heat map over ${item.file.name}: red marks the regions that raised the score most`;
    }
    overlay.hidden = !on;
    part(".legend").hidden = !on;
    part(".message").hidden = true;
    item.node.classList.toggle("with-gradcam", on);
    button.setAttribute("aria-pressed", String(on));
    button.textContent = on ? "Hide Grad-CAM" : "Show Grad-CAM";
  }

  function clearResults() {
    for (const node of [...$("results").children]) {
      if (node.dataset.state === "pending") continue; // still in flight: kept
      const image = node.querySelector(".xray");
      if (image.src.startsWith("blob:")) URL.revokeObjectURL(image.src);
      node.remove();
    }
    $("clear").disabled = $("results").children.length === 0;
  }

  // --- the model card --------------------------------------------------------------------------------

  function facts(rows) {
    const list = el("dl", { class: "card-facts" });
    for (const [term, value] of rows) {
      if (value === null || value === undefined || value === "") continue;
      list.append(el("dt", { text: term }), el("dd", { text: String(value) }));
    }
    return list;
  }

  function interval(ci, key) {
    const pair = ci && ci[key];
    return Array.isArray(pair) && pair.length === 2 ? `${fixed(pair[0], 3)} – ${fixed(pair[1], 3)}` : "–";
  }

  function metricsTable(metrics, caption) {
    const body = el("tbody");
    for (const [key, label] of METRICS) {
      if (!(key in metrics)) continue;
      body.append(el("tr", { "data-metric": key }, el("th", { scope: "row", text: label }),
        el("td", { text: fixed(metrics[key], 3) }), el("td", { text: interval(metrics.ci95, key) })));
    }
    const head = el("thead", {}, el("tr", {}, el("th", { scope: "col", text: "Figure" }),
      el("th", { scope: "col", text: "Value" }), el("th", { scope: "col", text: "95% interval" })));
    return el("div", { class: "table-wrap" }, el("table", {}, el("caption", { text: caption }), head, body));
  }

  function sampleText(metrics, threshold) {
    const counts = "n_positive" in metrics
      ? ` (${metrics.n_positive} pneumonia, ${metrics.n_negative} normal)` : "";
    const grouping = metrics.ci95_grouped_by === "patient" ? "whole patients" : "images";
    return `${metrics.n} images${counts}, at threshold ${fixed(threshold, 3)}; ` +
      `95% percentile-bootstrap intervals resampling ${grouping}.`;
  }

  function policyText(policy) {
    if (!policy || !POLICIES[policy.policy]) return "not recorded in this artifact";
    return POLICIES[policy.policy](policy);
  }

  function renderCard() {
    const card = $("card");
    const m = model;
    const val = m.val_metrics || {};
    const site = m.site_calibration;
    const parts = [
      el("p", { class: "disclaimer", role: "note" }, el("strong", { text: "Research software, not a medical device. " }),
        "Pneumonet is not cleared or approved for clinical use, and its score is not a diagnosis. The figures below " +
        "were measured on the images described; they need not hold for other patients, scanners or sites unless a " +
        "site calibration below says so."),
      el("h3", { text: "Model" }),
      facts([["Name", m.name], ["Version", m.version],
        ["Variant", m.backbone ? `${m.variant} (${m.backbone})` : m.variant],
        ["Input", `${m.image_size}×${m.image_size} px grayscale`], ["Preprocessing", m.preprocessing],
        ["Created", m.created_at]]),
      el("h3", { text: "Training data" }),
      facts([["Data", m.data_root || "not recorded"], ["Manifest digest (SHA-256)", m.manifest_digest || "not recorded"],
        ["Classes", (m.class_names || []).join(", ")], ["Positive class", m.positive_class]]),
      el("h3", { text: "Validation figures" }),
    ];
    if (val.n) {
      parts.push(metricsTable(val, `Validation: ${sampleText(val, m.threshold)}`));
    } else {
      parts.push(el("p", { text: "This artifact records no validation figures." }));
    }
    parts.push(el("h3", { text: "Threshold policy" }),
      el("p", { text: `Training threshold ${threshold(m.threshold)}, chosen on the validation images by ` +
        `${policyText(m.threshold_policy)}; never on test data.` }));
    if (site) {
      const sample = site.sample || {};
      parts.push(el("p", { text: `Site-calibrated threshold ${threshold(site.threshold)}, chosen by ` +
        `${policyText(site.policy)} on the site's own labelled sample (${sample.n} images of ` +
        `${sample.n_patients} patients, ${sample.root || "?"} ${sample.split || ""}) on ${site.calibrated_at}.` }));
      const at = site.at_site_threshold;
      if (at && at.n) parts.push(metricsTable(at, `Site sample at the site threshold: ${sampleText(at, site.threshold)}`));
    } else {
      parts.push(el("p", { text: "No site calibration: this model has not been checked on this site's own images." }));
    }
    parts.push(el("p", { class: "operating" },
      el("strong", { text: `The endpoint decides at ${threshold(m.operating_threshold)}: ` }),
      SOURCES[m.threshold_source] || m.threshold_source || "",
      ". An image scores PNEUMONIA when its probability is at or above it."));
    const serving = m.serving || {};
    parts.push(el("h3", { text: "Serving limits" }),
      facts([["Largest file", serving.max_request_bytes ? megabytes(serving.max_request_bytes) : null],
        ["Images per batch request", serving.max_batch_images],
        ["Longest wait for the model", serving.queue_timeout_s ? `${serving.queue_timeout_s} s, then 503` : null]]));
    card.replaceChildren(...parts);
  }

  // --- wiring ----------------------------------------------------------------------------------------

  function wire() {
    $("token-form").addEventListener("submit", useToken);
    $("nav-score").addEventListener("click", () => showView("score"));
    $("nav-card").addEventListener("click", () => showView("card"));
    $("forget-token").addEventListener("click", () => {
      model = null;
      askToken("Token forgotten.");
    });
    $("choose").addEventListener("click", () => $("file-input").click());
    $("file-input").addEventListener("change", (event) => {
      addFiles([...event.target.files]);
      event.target.value = ""; // the same file chosen again is a new upload
    });
    $("clear").addEventListener("click", clearResults);
    const drop = $("drop");
    // A file dropped anywhere is an upload: the browser must never navigate away to it (and lose the token).
    document.addEventListener("dragover", (event) => {
      event.preventDefault();
      drop.classList.add("over");
    });
    document.addEventListener("dragleave", (event) => {
      if (!event.relatedTarget) drop.classList.remove("over");
    });
    document.addEventListener("drop", (event) => {
      event.preventDefault();
      drop.classList.remove("over");
      if (event.dataTransfer && event.dataTransfer.files.length) addFiles([...event.dataTransfer.files]);
    });
    connect();
  }

  wire();
})();
