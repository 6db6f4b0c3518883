// The emoserve page: a file through POST /v1/classify, the microphone
// through the WebSocket /v1/stream. No libraries: it works offline.
"use strict";

const COLORS = ["#6b7280", "#0891b2", "#eab308", "#2563eb", "#dc2626", "#7c3aed", "#16a34a", "#ea580c"];
const LIVE_SECONDS = 30;  // the live plot's span
let labels = [];
let live = null;  // the recording: audio nodes, socket, windows so far

const $ = (id) => document.getElementById(id);
const percent = (p) => `${(100 * p).toFixed(1)}%`;
const color = (label) => COLORS[Math.max(0, labels.indexOf(label)) % COLORS.length];

function showError(id, message) {
  $(id).textContent = message;
  $(id).hidden = !message;
}

// The message of an error answer ({"error": {"code", "message"}}).
function errorText(body, fallback) {
  return body && body.error ? `${body.error.code}: ${body.error.message}` : fallback;
}

async function loadModel() {
  try {
    const reply = await fetch("/v1/model");
    const model = await reply.json();
    if (!reply.ok) throw new Error(errorText(model, reply.statusText));
    labels = model.labels;
    $("model").textContent =
      `Model ${model.name}, version ${model.version}: ${model.labels.join(", ")}`;
    for (const figure of document.querySelectorAll("figure")) addLegend(figure);
  } catch (error) {
    $("model").textContent = `The model could not be read: ${error.message}`;
  }
}

function addLegend(figure) {
  const legend = document.createElement("div");
  legend.className = "legend";
  legend.setAttribute("aria-hidden", "true");  // the table and text say the same
  for (const label of labels) {
    const item = document.createElement("span");
    const swatch = document.createElement("i");
    swatch.style.background = color(label);
    item.append(swatch, label);
    legend.append(item);
  }
  figure.append(legend);
}

// Each label's probability over time, one line each, in [t0, t1] seconds.
// Windows without speech (no scores) leave a gap.
function plot(svg, windows, t0, t1) {
  const width = 600, height = 160, left = 28, bottom = 16;
  const x = (t) => left + ((t - t0) / Math.max(t1 - t0, 1e-6)) * (width - left - 4);
  const y = (p) => (1 - p) * (height - bottom - 4) + 4;
  const ns = "http://www.w3.org/2000/svg";
  const element = (name, attributes, text) => {
    const e = document.createElementNS(ns, name);
    for (const [k, v] of Object.entries(attributes)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  };
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.replaceChildren();
  for (const p of [0, 0.5, 1]) {
    svg.append(element("line", {x1: left, x2: width, y1: y(p), y2: y(p), stroke: "#9ca3af",
                                "stroke-width": 0.5}));
    svg.append(element("text", {x: 2, y: y(p) + 3}, p.toFixed(1)));
  }
  const step = Math.max(1, Math.ceil((t1 - t0) / 10));
  for (let t = Math.ceil(t0); t <= t1; t += step) {
    svg.append(element("text", {x: x(t) - 4, y: height - 3}, `${t}s`));
  }
  const dots = windows.length <= 200;  // a dot per window while they are few
  for (const label of labels) {
    let points = [];
    const flush = () => {
      if (points.length > 0) {
        svg.append(element("polyline", {points: points.join(" "), fill: "none",
                                        stroke: color(label), "stroke-width": 2}));
      }
      points = [];
    };
    for (const w of windows) {
      const score = (w.scores || []).find((s) => s.label === label);
      const middle = (w.startSeconds + w.endSeconds) / 2;
      if (!score || middle < t0) { flush(); continue; }
      const [px, py] = [x(middle).toFixed(1), y(score.probability).toFixed(1)];
      points.push(`${px},${py}`);
      if (dots) svg.append(element("circle", {cx: px, cy: py, r: 2.5, fill: color(label)}));
    }
    flush();
  }
  svg.dataset.windows = String(windows.length);
}

// --- A file -----------------------------------------------------------

async function classifyFile(file) {
  showError("file-error", "");
  $("file-result").hidden = true;
  $("file-label").textContent = "";
  try {
    const reply = await fetch("/v1/classify?timeline=true", {method: "POST", body: file});
    const result = await reply.json();
    if (!reply.ok) throw new Error(errorText(result, reply.statusText));
    $("file-label").textContent = result.topLabel;
    $("file-detail").textContent =
      `(${file.name}: ${result.audioDurationSeconds.toFixed(1)} s, ` +
      `${result.speechWindowCount} of ${result.windowCount} windows with speech)`;
    const rows = result.scores.map((s) => {
      const row = document.createElement("tr");
      const name = document.createElement("td");
      name.textContent = s.label;
      const value = document.createElement("td");
      const bar = document.createElement("span");
      bar.className = "bar";
      bar.style.width = `${(8 * s.probability).toFixed(2)}rem`;
      bar.style.background = color(s.label);
      value.append(bar, percent(s.probability));
      row.append(name, value);
      return row;
    });
    $("file-scores").tBodies[0].replaceChildren(...rows);
    const end = result.timeline.length ? result.timeline[result.timeline.length - 1].endSeconds : 1;
    $("file-result").hidden = false;
    plot($("file-plot"), result.timeline, 0, end);
  } catch (error) {
    showError("file-error", `The file could not be classified: ${error.message}`);
  }
}

function setUpFile() {
  $("file").addEventListener("change", () => {
    if ($("file").files.length) classifyFile($("file").files[0]);
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) classifyFile(e.dataTransfer.files[0]);
  });
}

// --- The microphone -----------------------------------------------------

function setRecording(on, status) {
  $("record").textContent = on ? "Stop recording" : "Start recording";
  $("record").setAttribute("aria-pressed", String(on));
  $("live-status").textContent = status;
}

async function startRecording() {
  showError("live-error", "");
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({
      audio: {channelCount: 1, echoCancellation: false, noiseSuppression: false,
              autoGainControl: false}});
  } catch (error) {
    showError("live-error", `No microphone: ${error.message}`);
    return;
  }
  const context = new AudioContext();
  const source = context.createMediaStreamSource(stream);
  // Float32 samples at the context's rate, as they come (the server resamples).
  const processor = context.createScriptProcessor(4096, 1, 1);
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const socket = new WebSocket(`${scheme}://${location.host}/v1/stream`);
  live = {stream, context, source, processor, socket, windows: [], ending: false, failed: false};
  $("utterances").replaceChildren();
  $("live-label").textContent = "—";
  $("live-result").hidden = false;
  setRecording(true, "Connecting…");
  socket.onopen = () => {
    socket.send(JSON.stringify({
      format: {encoding: "AUDIO_ENCODING_FLOAT32", sampleRateHertz: context.sampleRate,
               channelCount: 1},
      interimResults: true}));
    source.connect(processor);
    processor.connect(context.destination);  // silence: the output buffer stays zero
    $("live-status").textContent = "Listening";
  };
  processor.onaudioprocess = (event) => {
    if (socket.readyState === WebSocket.OPEN && !live.ending) {
      socket.send(new Float32Array(event.inputBuffer.getChannelData(0)));
    }
  };
  socket.onmessage = (event) => onLiveMessage(live, JSON.parse(event.data));
  socket.onclose = (event) => {
    stopAudio(live);
    if (event.code !== 1000 && !live.failed) {
      showError("live-error", `The connection closed (code ${event.code}).`);
    }
    setRecording(false, event.code === 1000 ? "Stopped" : "Stopped by an error");
  };
}

function stopAudio(recording) {
  recording.processor.disconnect();
  recording.source.disconnect();
  recording.stream.getTracks().forEach((track) => track.stop());
  recording.context.close();
}

// The server flushes the last window and utterance, then closes.
function stopRecording() {
  live.ending = true;
  if (live.socket.readyState === WebSocket.OPEN) {
    live.socket.send(JSON.stringify({end: true}));
    $("live-status").textContent = "Finishing…";
  }
}

function onLiveMessage(recording, message) {
  if (message.error) {
    recording.failed = true;
    showError("live-error", errorText(message));
  } else if (message.window) {
    const w = message.window;
    recording.windows.push(w);
    if (w.speech && w.scores.length) {
      $("live-label").textContent = `${w.scores[0].label} (${percent(w.scores[0].probability)})`;
    }
    const end = w.endSeconds;
    plot($("live-plot"), recording.windows, Math.max(0, end - LIVE_SECONDS),
         Math.max(end, LIVE_SECONDS));
  } else if (message.speechEvent) {
    const started = message.speechEvent.type === "SPEECH_STARTED";
    if (!recording.ending) $("live-status").textContent = started ? "Speech" : "Silence";
  } else if (message.utterance) {
    const u = message.utterance;
    const item = document.createElement("li");
    item.textContent = `${u.startSeconds.toFixed(1)}–${u.endSeconds.toFixed(1)} s: ` +
      `${u.topLabel} (${percent(u.scores[0].probability)}, ${u.windowCount} windows)`;
    $("utterances").append(item);
  }
}

function setUpRecording() {
  if (!navigator.mediaDevices || !window.AudioContext) {
    $("record").disabled = true;
    $("live-status").textContent = "This browser cannot record here (it needs HTTPS or localhost).";
    return;
  }
  $("record").addEventListener("click", () => {
    if (live && !live.ending && live.socket.readyState <= WebSocket.OPEN) {
      stopRecording();
    } else {
      startRecording();
    }
  });
}

loadModel();
setUpFile();
setUpRecording();
