// sdlab web UI: a thin client of the server's A1111 API (/sdapi/v1) and job routes (/sdlab/v1/jobs).
// No build step, no dependencies: plain DOM and fetch.
"use strict";

const $ = (id) => document.getElementById(id);
const POLL_MS = 300;
const PLAY_MS = 180;

const ui = {
  gallery: [],        // {src, infotext, frames, steps, seed}
  selected: null,
  player: { frames: [], steps: [], timer: null },
};

// ---- server calls ----

async function api(path, body) {
  const options = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  };
  const response = await fetch(path, options);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(errorMessage(response, data));
  return data;
}

function errorMessage(response, data) {
  let detail = data.detail ?? data.error?.message ?? response.statusText;
  if (Array.isArray(detail)) detail = detail.map((d) => `${d.loc.slice(1).join(".")}: ${d.msg}`).join("\n");
  return `${response.status}: ${detail}`;
}

// ---- setup ----

async function init() {
  const [samplers, schedulers, options, models] = await Promise.all([
    api("/sdapi/v1/samplers"), api("/sdapi/v1/schedulers"), api("/sdapi/v1/options"), api("/sdapi/v1/sd-models"),
  ]);
  const current = models.find((m) => m.title === options.sd_model_checkpoint || m.filename === options.sd_model_checkpoint);
  fillSelect($("model"), models.map((m) => [m.model_name, m.model_name]), current?.model_name);
  fillSelect($("refiner"), models.map((m) => [m.model_name, m.model_name]), null);
  fillSelect($("sampler"), samplers.map((s) => [s.name, s.name]), "DPM++ 2M");
  // Preselect the model's own default schedule (e.g. its trailing timesteps for a zero-terminal-SNR model).
  fillSelect($("schedule"), schedulers.map((s) => [s.name, s.label]), options.sdlab_default_schedule ?? "karras");
  $("model-name").textContent = `model: ${options.sd_model_checkpoint}`;
  $("width").value = $("height").value = options.sdlab_native_size ?? 512;
  $("cfg").value = options.sdlab_default_cfg ?? 7;
}

function fillSelect(select, pairs, preferred) {
  for (const [value, label] of pairs) select.add(new Option(label, value, false, value === preferred));
}

// ---- generating ----

function requestBody(jobId) {
  return {
    prompt: $("prompt").value, negative_prompt: $("negative").value,
    sampler_name: $("sampler").value, scheduler: $("schedule").value,
    steps: Number($("steps").value), cfg_scale: Number($("cfg").value),
    width: Number($("width").value), height: Number($("height").value),
    batch_size: Number($("batch").value), seed: Number($("seed").value),
    force_task_id: jobId, save_steps: true,
    refiner_checkpoint: $("refiner").value || null, refiner_switch_at: Number($("refiner-switch").value),
    override_settings: {
      sd_model_checkpoint: $("model").value,
      token_merging_ratio: Number($("token-merging").value), deepcache: Number($("deepcache").value),
    },
  };
}

async function generate(event) {
  event.preventDefault();
  const jobId = "ui-" + Math.random().toString(36).slice(2, 12);
  showError(null);
  setBusy(true);
  const polling = pollProgress(jobId);
  try {
    const result = await api("/sdapi/v1/txt2img", requestBody(jobId));
    const steps = await api(`/sdlab/v1/jobs/${jobId}/steps`).catch(() => ({ frames: [], steps: [] }));
    addResults(result, steps);
  } catch (error) {
    showError(error.message);
  } finally {
    polling.stop();
    setBusy(false);
  }
}

function pollProgress(jobId) {
  let active = true;
  const tick = async () => {
    if (!active) return;
    try {
      const job = await api(`/sdlab/v1/jobs/${jobId}`);
      showProgress(job);
    } catch (_) { /* not queued yet, or already forgotten */ }
    if (active) setTimeout(tick, POLL_MS);
  };
  setTimeout(tick, POLL_MS / 2);
  return { stop: () => { active = false; } };
}

function showProgress(job) {
  const percent = Math.round(job.progress * 100);
  $("progress-fill").style.width = `${percent}%`;
  $("progress-text").textContent = job.status === "queued"
    ? `queued (${job.queue_position} ahead)` : `step ${job.step}/${job.total}`;
  if (job.preview) showImage(`data:image/png;base64,${job.preview}`);
}

function setBusy(busy) {
  $("generate").disabled = busy;
  $("interrupt").disabled = !busy;
  $("progress").hidden = !busy;
  if (busy) { $("progress-fill").style.width = "0"; $("progress-text").textContent = "queued"; }
}

function showError(message) {
  $("error").hidden = !message;
  $("error").textContent = message ?? "";
}

// ---- results, gallery, player ----

function addResults(result, steps) {
  const info = JSON.parse(result.info);
  if (!result.images.length) {  // stopped before an image was decoded
    showError(info.interrupted ? "interrupted before an image was ready" : "no image came back");
    return;
  }
  result.images.forEach((b64, i) => {
    const item = {
      src: `data:image/png;base64,${b64}`, infotext: info.infotexts[i], seed: info.all_seeds[i],
      frames: i === 0 ? steps.frames : [], steps: i === 0 ? steps.steps : [],
    };
    ui.gallery.unshift(item);
    $("gallery").prepend(galleryFigure(item));
  });
  select(ui.gallery[result.images.length - 1]);
}

function galleryFigure(item) {
  const figure = document.createElement("figure");
  const img = new Image();
  img.src = item.src;
  img.alt = item.infotext.split("\n")[0];
  const caption = document.createElement("figcaption");
  caption.textContent = `seed ${item.seed}`;
  figure.append(img, caption);
  figure.addEventListener("click", () => select(item));
  item.figure = figure;
  return figure;
}

function select(item) {
  ui.selected?.figure?.classList.remove("selected");
  ui.selected = item;
  item.figure.classList.add("selected");
  showImage(item.src);
  $("infotext").hidden = false;
  $("infotext").textContent = item.infotext;
  loadPlayer(item);
}

function showImage(src) {
  $("current").src = src;
  $("current").hidden = false;
  $("placeholder").hidden = true;
}

function loadPlayer(item) {
  stopPlaying();
  const player = ui.player;
  player.frames = item.frames.map((f) => `data:image/png;base64,${f}`);
  player.steps = item.steps;
  $("player").hidden = player.frames.length === 0;
  $("step-slider").max = Math.max(0, player.frames.length - 1);
  $("step-slider").value = $("step-slider").max;
  $("step-label").textContent = player.frames.length ? `step ${player.steps.at(-1)}/${player.steps.at(-1)}` : "";
}

function showFrame(index) {
  const player = ui.player;
  $("step-slider").value = index;
  $("current").src = player.frames[index];
  $("step-label").textContent = `step ${player.steps[index]}/${player.steps.at(-1)}`;
}

function togglePlay() {
  if (ui.player.timer) { stopPlaying(); return; }
  let index = 0;
  $("play").textContent = "⏸";
  ui.player.timer = setInterval(() => {
    showFrame(index);
    index += 1;
    if (index >= ui.player.frames.length) stopPlaying();
  }, PLAY_MS);
}

function stopPlaying() {
  clearInterval(ui.player.timer);
  ui.player.timer = null;
  $("play").textContent = "▶";
}

// ---- wiring ----

$("params").addEventListener("submit", generate);
$("interrupt").addEventListener("click", () => api("/sdapi/v1/interrupt", {}).catch(() => {}));
$("random-seed").addEventListener("click", () => { $("seed").value = Math.floor(Math.random() * 2 ** 32); });
$("reuse-seed").addEventListener("click", () => { if (ui.selected) $("seed").value = ui.selected.seed; });
$("play").addEventListener("click", togglePlay);
$("step-slider").addEventListener("input", (e) => { stopPlaying(); showFrame(Number(e.target.value)); });
init().catch((error) => showError(`could not reach the server: ${error.message}`));
