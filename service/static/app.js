// Demo page for the autoencoder API. Plain JS, no dependencies, public endpoints only.
"use strict";

const KEY_STORAGE = "convae.apiKey";
const MAX_PARALLEL = 4; // uploads in flight at once; the server batches them anyway
const MAX_ERRORS = 6; // messages kept in the banner

const $ = (id) => document.getElementById(id);

// ---------------------------------------------------------------------------------------------
// API access: the X-API-Key header, the key prompt on 401, readable errors.

class ApiError extends Error {
  constructor(message, status, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function storedKey() {
  try {
    return sessionStorage.getItem(KEY_STORAGE);
  } catch {
    return null; // storage disabled: the key is asked for again
  }
}

function storeKey(key) {
  try {
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    else sessionStorage.removeItem(KEY_STORAGE);
  } catch {
    /* storage disabled */
  }
  $("key-state").hidden = !key;
}

// The body of an error response as {code, message}, whatever the server sent.
async function errorOf(response) {
  const text = await response.text().catch(() => "");
  try {
    const body = JSON.parse(text);
    if (body && body.error && body.error.message) {
      return { code: body.error.code || "error", message: String(body.error.message) };
    }
    if (body && body.detail) return { code: "error", message: JSON.stringify(body.detail) };
  } catch {
    /* not JSON */
  }
  const snippet = text.trim().slice(0, 200);
  return {
    code: "http_" + response.status,
    message: `HTTP ${response.status} ${response.statusText}${snippet ? ": " + snippet : ""}`,
  };
}

let keyPrompt = null; // one dialog for every request that got a 401 at the same time

function askForKey(reason) {
  if (keyPrompt) return keyPrompt;
  const dialog = $("key-dialog");
  $("key-error").textContent = reason || "";
  $("key-input").value = "";
  keyPrompt = new Promise((resolve) => {
    dialog.addEventListener(
      "close",
      () => {
        const key = dialog.returnValue === "ok" ? $("key-input").value.trim() : "";
        if (key) storeKey(key);
        keyPrompt = null;
        resolve(Boolean(key));
      },
      { once: true },
    );
  });
  dialog.returnValue = "";
  dialog.showModal();
  $("key-input").focus();
  return keyPrompt;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// fetch() with the key; JSON (or a Blob) back, or an ApiError with the server's message.
async function api(path, { method = "GET", body = null, as = "json" } = {}) {
  let busyRetries = 2;
  for (;;) {
    const key = storedKey();
    const headers = key ? { "X-API-Key": key } : {};
    let response;
    try {
      response = await fetch(path, { method, body, headers });
    } catch (err) {
      throw new ApiError(`could not reach the service (${err.message})`, 0, "network_error");
    }
    if (response.status === 401) {
      const problem = await errorOf(response);
      if (storedKey() !== key) continue; // a key was entered while this request was out
      const reason = key ? `The key was rejected: ${problem.message}` : "";
      if (await askForKey(reason)) continue;
      throw new ApiError("this service needs an API key and none was given", 401, problem.code);
    }
    if ((response.status === 429 || response.status === 503) && busyRetries-- > 0) {
      const wait = Number(response.headers.get("Retry-After"));
      if (Number.isFinite(wait) && wait >= 0 && wait <= 10) {
        await response.body?.cancel();
        await sleep(wait * 1000);
        continue;
      }
    }
    if (!response.ok) {
      const problem = await errorOf(response);
      throw new ApiError(problem.message, response.status, problem.code);
    }
    return as === "blob" ? response.blob() : response.json();
  }
}

function describe(err) {
  if (err instanceof ApiError) {
    const where = err.status ? ` (HTTP ${err.status}, ${err.code})` : "";
    return `${err.message}${where}`;
  }
  return String(err && err.message ? err.message : err);
}

function showError(context, err) {
  const box = $("errors");
  const item = document.createElement("div");
  item.className = "error";
  const text = document.createElement("span");
  text.className = "error-message";
  text.textContent = `${context}: ${describe(err)}`;
  const close = document.createElement("button");
  close.type = "button";
  close.className = "dismiss";
  close.textContent = "×";
  close.title = "dismiss";
  close.addEventListener("click", () => item.remove());
  item.append(text, close);
  box.append(item);
  while (box.children.length > MAX_ERRORS) box.firstElementChild.remove();
}

// ---------------------------------------------------------------------------------------------
// Small DOM helpers.

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value);
  }
  node.append(...children);
  return node;
}

function figure(src, caption, className) {
  const img = el("img", { alt: caption, class: className || "" });
  if (src) img.src = src;
  return el("figure", {}, img, el("figcaption", { text: caption }));
}

const png = (b64) => "data:image/png;base64," + b64;
const fmt = (x, digits = 4) => (typeof x === "number" ? x.toFixed(digits) : "—");

// ---------------------------------------------------------------------------------------------
// Upload, reconstruct and score.

const entries = []; // {id, name, file, url, card, ok}
let nextId = 0;
let threshold = null;

function cardFor(entry) {
  const input = figure(entry.url, "input", "input");
  input.querySelector("img").addEventListener("error", () => input.classList.add("no-preview"));
  const card = el(
    "article",
    { class: "card", "data-state": "pending", "data-name": entry.name },
    el("h3", { text: entry.name, title: entry.name }),
    el(
      "div",
      { class: "pictures" },
      input,
      figure(null, "reconstruction", "recon"),
      el("div", { class: "heat" }, figure(null, "error heatmap", "heatmap")),
    ),
    el("p", { class: "stats", text: "working…" }),
  );
  return card;
}

function fillCard(entry, reconstruction, scored) {
  const { card } = entry;
  const result = scored.results[0];
  card.querySelector("img.recon").src = png(reconstruction.images[0]);
  if (result.heatmap) card.querySelector("img.heatmap").src = png(result.heatmap);
  const stats = card.querySelector(".stats");
  stats.textContent = "";
  stats.append(
    el("span", { class: "mse", text: `MSE ${fmt(reconstruction.mse[0])}` }),
    el("span", {
      class: "score",
      text: `${scored.scorer} score ${fmt(result.score)} / threshold ${fmt(scored.threshold)}`,
    }),
  );
  if (result.is_anomaly) {
    stats.append(el("span", { class: "mark", text: "● above threshold", title: "anomaly" }));
  } else {
    stats.append(el("span", { class: "ok-mark", text: "normal" }));
  }
  card.dataset.anomaly = String(result.is_anomaly);
  card.dataset.state = "done";
  if (threshold === null) {
    threshold = scored.threshold;
    $("threshold").textContent =
      `anomaly when the ${scored.scorer} score is above ${fmt(threshold)}`;
  }
}

async function processEntry(entry) {
  const form = () => {
    const data = new FormData();
    data.append("images", entry.file, entry.name);
    return data;
  };
  try {
    const [reconstruction, scored] = await Promise.all([
      api("/reconstruct", { method: "POST", body: form() }),
      api("/anomaly-score?heatmap=true", { method: "POST", body: form() }),
    ]);
    if (!entry.card.isConnected) return; // cleared meanwhile
    fillCard(entry, reconstruction, scored);
    entry.ok = true;
  } catch (err) {
    entry.card.dataset.state = "error";
    const stats = entry.card.querySelector(".stats");
    stats.textContent = describe(err);
    stats.classList.add("error-text");
    showError(entry.name, err);
  }
  refreshPickers();
}

async function runLimited(items, worker) {
  const queue = [...items];
  const lanes = Array.from({ length: Math.min(MAX_PARALLEL, queue.length) }, async () => {
    while (queue.length) await worker(queue.shift());
  });
  await Promise.all(lanes);
}

function addFiles(fileList) {
  const added = [];
  for (const file of fileList) {
    if (!file || file.size === undefined) continue;
    const entry = { id: nextId++, name: file.name || `image-${nextId}`, file, ok: false };
    entry.url = URL.createObjectURL(file);
    entry.card = cardFor(entry);
    $("results").append(entry.card);
    entries.push(entry);
    added.push(entry);
  }
  if (added.length) runLimited(added, processEntry);
}

function clearAll() {
  for (const entry of entries) URL.revokeObjectURL(entry.url);
  entries.length = 0;
  $("results").textContent = "";
  $("strip").textContent = "";
  refreshPickers();
}

// ---------------------------------------------------------------------------------------------
// Interpolation: K+2 images from A to B, or the decoded 0.5/0.5 average.

function refreshPickers() {
  const usable = entries.filter((e) => e.ok);
  for (const [index, id] of [
    [0, "interp-a"],
    [1, "interp-b"],
  ]) {
    const select = $(id);
    const previous = select.value;
    select.textContent = "";
    for (const entry of usable) {
      select.append(el("option", { value: String(entry.id), text: entry.name }));
    }
    if (usable.some((e) => String(e.id) === previous)) select.value = previous;
    else if (usable[index]) select.value = String(usable[index].id);
  }
  const ready = usable.length >= 2;
  $("interpolate").disabled = !ready;
  $("average").disabled = !ready;
  $("interp-hint").hidden = ready;
}

let interpolationRun = 0;

async function interpolate(mode) {
  const a = entries.find((e) => String(e.id) === $("interp-a").value);
  const b = entries.find((e) => String(e.id) === $("interp-b").value);
  if (!a || !b) {
    showError("Interpolate", new Error("pick two images that reconstructed without error"));
    return;
  }
  const run = ++interpolationRun;
  const data = new FormData();
  data.append("images", a.file, a.name);
  data.append("images", b.file, b.name);
  const steps = Number($("steps").value);
  if (mode === "average") data.append("weights", "0.5,0.5");
  else data.append("steps", String(steps));
  const strip = $("strip");
  strip.dataset.state = "pending";
  try {
    const reply = await api("/interpolate", { method: "POST", body: data });
    if (run !== interpolationRun) return; // a newer request replaced this one
    strip.textContent = "";
    if (mode === "average") {
      strip.append(
        figure(a.url, `A: ${a.name}`, "end"),
        figure(png(reply.images[0]), "average 0.5 / 0.5", "step average"),
        figure(b.url, `B: ${b.name}`, "end"),
      );
    } else {
      const n = reply.images.length;
      reply.images.forEach((image, i) => {
        const t = n > 1 ? i / (n - 1) : 0;
        strip.append(figure(png(image), `t = ${t.toFixed(2)}`, "step"));
      });
    }
    strip.dataset.mode = mode;
    strip.dataset.count = String(reply.images.length);
    strip.dataset.state = "done";
  } catch (err) {
    if (run !== interpolationRun) return;
    strip.textContent = ""; // no stale pictures under a failed request
    delete strip.dataset.mode;
    delete strip.dataset.count;
    strip.dataset.state = "error";
    showError("Interpolate", err);
  }
}

// ---------------------------------------------------------------------------------------------
// Generation: POST /generate with class, temperature, seed and count.

function setUpGenerate(card) {
  const select = $("gen-class");
  const classes = (card.generation && card.generation.classes) || [];
  select.textContent = "";
  select.append(el("option", { value: "", text: "any" }));
  for (const name of classes) select.append(el("option", { value: name, text: name }));
  $("generate").disabled = classes.length === 0;
  if (classes.length === 0) $("gen-hint").textContent = "This model has no generation density.";
}

let generationRun = 0;

async function generate() {
  const run = ++generationRun;
  const request = {
    n: Number($("gen-n").value),
    temperature: Number($("gen-temperature").value),
  };
  if ($("gen-class").value) request.class = $("gen-class").value;
  if ($("gen-seed").value.trim() !== "") request.seed = Number($("gen-seed").value);
  const strip = $("gen-strip");
  strip.dataset.state = "pending";
  try {
    // A Blob's type becomes the request's Content-Type.
    const body = new Blob([JSON.stringify(request)], { type: "application/json" });
    const reply = await api("/generate", { method: "POST", body });
    if (run !== generationRun) return; // a newer request replaced this one
    strip.textContent = "";
    reply.images.forEach((image, i) => {
      strip.append(figure(png(image), `${reply.classes[i]} ${i + 1}`, "generated"));
    });
    $("gen-hint").textContent = `seed ${reply.seed}: send it again for the same images.`;
    strip.dataset.seed = String(reply.seed);
    strip.dataset.count = String(reply.images.length);
    strip.dataset.state = "done";
  } catch (err) {
    if (run !== generationRun) return;
    strip.textContent = "";
    delete strip.dataset.count;
    strip.dataset.state = "error";
    showError("Generate", err);
  }
}

// ---------------------------------------------------------------------------------------------
// Model card: GET /model and the report figures.

function cardRow(list, term, value) {
  list.append(el("dt", { text: term }), el("dd", { text: value }));
}

async function loadModel() {
  const list = $("model-card");
  try {
    const card = await api("/model");
    list.textContent = "";
    const metrics = card.metrics || {};
    const input = card.input || {};
    const anomaly = card.anomaly || {};
    $("model-badge").textContent = `${card.name} v${card.version}`;
    cardRow(list, "name", String(card.name));
    cardRow(list, "version", String(card.version));
    cardRow(list, "architecture", String(card.architecture ?? "—"));
    cardRow(list, "latent size", String(card.latent_dim ?? "—"));
    cardRow(list, "input", `${input.height}×${input.width}×${input.channels} ${input.color || ""}`);
    const ratio =
      typeof metrics.val_mse === "number" && metrics.pca_val_mse > 0
        ? ` (${(metrics.val_mse / metrics.pca_val_mse).toFixed(2)}× PCA)`
        : "";
    cardRow(list, "val MSE", `${fmt(metrics.val_mse, 5)}${ratio}`);
    const components = metrics.pca_components ? `, ${metrics.pca_components} components` : "";
    cardRow(list, "PCA val MSE", `${fmt(metrics.pca_val_mse, 5)}${components}`);
    cardRow(list, "anomaly", `${anomaly.scorer || "—"} > ${fmt(anomaly.threshold)}`);
    cardRow(list, "providers", (card.providers || []).join(", ") || "—");
    if (card.created) cardRow(list, "created", String(card.created));
    setUpGenerate(card);
    setUpDenoiser(card);
    list.dataset.state = "done";
  } catch (err) {
    $("model-badge").textContent = "model card unavailable";
    list.textContent = "";
    cardRow(list, "unavailable", describe(err));
    list.dataset.state = "error";
    showError("Model card", err);
    return;
  }
  await loadFigures();
}

async function loadFigures() {
  const box = $("figures");
  box.textContent = "";
  let names;
  try {
    names = (await api("/model/report")).figures || [];
  } catch (err) {
    showError("Report figures", err);
    return;
  }
  // Fetched with the key (an <img src> could not send it), shown from object URLs.
  await Promise.all(
    names.map(async (name) => {
      const fig = figure(null, name, "report");
      box.append(fig);
      try {
        const blob = await api(`/model/report/${encodeURIComponent(name)}`, { as: "blob" });
        const url = URL.createObjectURL(blob);
        const img = fig.querySelector("img");
        img.src = url;
        const link = el("a", { href: url, target: "_blank", title: "open full size" });
        img.replaceWith(link);
        link.append(img);
      } catch (err) {
        fig.remove();
        showError(`Report figure ${name}`, err);
      }
    }),
  );
  box.dataset.count = String(box.children.length);
}

// ---------------------------------------------------------------------------------------------
// Denoise: an upload, resized here to the denoiser's input size, optionally with Gaussian noise
// added in the page, sent to /denoise; PSNR of the noisy and the cleaned image against it.

const denoiser = { size: null, file: null, run: 0 };

// The denoiser is described by the model card (GET /model's `denoiser`): one request, one
// error when it fails, and set up again when the card loads again (after a key is given).
function setUpDenoiser(card) {
  const input = card.denoiser ? card.denoiser.input : null;
  denoiser.size = input ? [input.width, input.height] : null;
  $("denoise-hint").dataset.model = card.denoiser
    ? `${card.denoiser.name} v${card.denoiser.version}`
    : "";
  if (!card.denoiser) {
    $("denoise-hint").textContent = "This server has no denoising model loaded (AE_DENOISE_MODEL).";
  }
  $("denoise-run").disabled = !(denoiser.size && denoiser.file);
}

// A standard normal sample (Box-Muller).
function gaussian() {
  const u = 1 - Math.random();
  return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * Math.random());
}

async function pixelsOf(source, [width, height]) {
  const canvas = el("canvas", { width: String(width), height: String(height) });
  const context = canvas.getContext("2d", { willReadFrequently: true });
  context.imageSmoothingQuality = "high";
  context.drawImage(source, 0, 0, width, height);
  return { canvas, data: context.getImageData(0, 0, width, height) };
}

function withNoise(image, sigma) {
  const out = new ImageData(new Uint8ClampedArray(image.data), image.width, image.height);
  for (let i = 0; i < out.data.length; i += 4) {
    for (let c = 0; c < 3; c++) out.data[i + c] = Math.round(image.data[i + c] + sigma * gaussian());
  }
  return out; // Uint8ClampedArray clips to 0..255
}

// PSNR in dB over the RGB channels, as scikit-image computes it with data_range 255.
function psnr(a, b) {
  let sum = 0;
  let n = 0;
  for (let i = 0; i < a.data.length; i += 4) {
    for (let c = 0; c < 3; c++) {
      const d = a.data[i + c] - b.data[i + c];
      sum += d * d;
      n++;
    }
  }
  return sum === 0 ? Infinity : 10 * Math.log10((255 * 255) / (sum / n));
}

function imageDataUrl(image) {
  const canvas = el("canvas", { width: String(image.width), height: String(image.height) });
  canvas.getContext("2d").putImageData(image, 0, 0);
  return canvas.toDataURL("image/png");
}

const loadImg = (src) =>
  new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("the browser cannot display this image"));
    img.src = src;
  });

async function imageOf(blob) {
  const url = URL.createObjectURL(blob);
  try {
    return await loadImg(url);
  } finally {
    URL.revokeObjectURL(url);
  }
}

function psnrFigure(src, title, value) {
  const fig = figure(src, "", "step");
  const caption = fig.querySelector("figcaption");
  caption.textContent = title;
  if (value !== null) {
    caption.append(el("br"), el("span", { class: "psnr", text: `${value.toFixed(2)} dB` }));
  }
  return fig;
}

async function denoise() {
  const run = ++denoiser.run;
  const out = $("denoise-out");
  const sigma = Number($("denoise-sigma").value);
  out.dataset.state = "pending";
  try {
    let clean = null;
    let noisy;
    let body;
    if (sigma > 0) {
      clean = (await pixelsOf(await imageOf(denoiser.file), denoiser.size)).data;
      noisy = withNoise(clean, sigma);
      body = await (await fetch(imageDataUrl(noisy))).blob();
    } else {
      body = denoiser.file;
    }
    const data = new FormData();
    data.append("images", body, denoiser.file.name);
    const reply = await api("/denoise", { method: "POST", body: data });
    if (run !== denoiser.run) return; // a newer request replaced this one
    const cleanedImg = await loadImg(png(reply.images[0]));
    const cleaned = (await pixelsOf(cleanedImg, denoiser.size)).data;
    if (!noisy) noisy = (await pixelsOf(await imageOf(body), denoiser.size)).data;
    out.textContent = "";
    const noisyPsnr = clean ? psnr(clean, noisy) : null;
    const cleanedPsnr = clean ? psnr(clean, cleaned) : null;
    if (clean) out.append(psnrFigure(imageDataUrl(clean), "original", null));
    out.append(
      psnrFigure(imageDataUrl(noisy), sigma > 0 ? `noisy (σ ${sigma})` : "upload", noisyPsnr),
      psnrFigure(png(reply.images[0]), `cleaned (${reply.model.name} v${reply.model.version})`, cleanedPsnr),
    );
    out.dataset.psnrNoisy = noisyPsnr === null ? "" : noisyPsnr.toFixed(2);
    out.dataset.psnrCleaned = cleanedPsnr === null ? "" : cleanedPsnr.toFixed(2);
    out.dataset.state = "done";
  } catch (err) {
    if (run !== denoiser.run) return;
    out.textContent = "";
    out.dataset.state = "error";
    showError("Denoise", err);
  }
}

function setUpDenoise() {
  $("denoise-file").addEventListener("change", (event) => {
    denoiser.file = event.target.files[0] || null;
    event.target.value = "";
    $("denoise-run").disabled = !(denoiser.size && denoiser.file);
    if (denoiser.size && denoiser.file) denoise();
  });
  $("denoise-sigma").addEventListener("input", (event) => {
    $("denoise-sigma-value").textContent = event.target.value;
  });
  $("denoise-run").addEventListener("click", denoise);
}

// ---------------------------------------------------------------------------------------------
// Wiring.

function setUp() {
  $("key-state").hidden = !storedKey();
  const drop = $("drop");
  $("files").addEventListener("change", (event) => {
    addFiles(event.target.files);
    event.target.value = ""; // the same file can be picked again
  });
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => {
      event.preventDefault();
      drop.classList.add("over");
    });
  }
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    if (event.dataTransfer) addFiles(event.dataTransfer.files);
  });
  drop.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") $("files").click();
  });
  $("heatmap-toggle").addEventListener("change", (event) => {
    $("results").classList.toggle("show-heatmap", event.target.checked);
  });
  $("clear").addEventListener("click", clearAll);
  $("steps").addEventListener("input", (event) => {
    $("steps-value").textContent = event.target.value;
  });
  $("steps").addEventListener("change", () => {
    if ($("strip").dataset.mode === "path") interpolate("path");
  });
  $("interpolate").addEventListener("click", () => interpolate("path"));
  $("average").addEventListener("click", () => interpolate("average"));
  $("gen-temperature").addEventListener("input", (event) => {
    $("gen-temperature-value").textContent = event.target.value;
  });
  $("generate").addEventListener("click", generate);
  $("key-button").addEventListener("click", async () => {
    if (await askForKey("")) loadModel();
  });
  refreshPickers();
  loadModel();
}

setUp();
setUpDenoise();
