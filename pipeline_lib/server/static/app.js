// The speech page: streams 16-bit PCM from /v1/audio/speech and plays it as it arrives.
// Plain script, no build step and no third-party code: the server serves everything itself.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const app = $("app");
  const form = $("speech-form");
  const textBox = $("text");
  const speakButton = $("speak");
  const stopButton = $("stop");
  const downloadButton = $("download");
  const statusLine = $("status");
  const errorLine = $("error");
  const apiKeyField = $("api_key");
  const canvas = $("wave");
  const level = $("level");

  // Start a little ahead of the clock so that the first buffer is not clipped.
  const START_LEAD_S = 0.1;
  const FORMAT_TYPES = {
    mp3: "audio/mpeg", opus: "audio/ogg", aac: "audio/aac", flac: "audio/flac", wav: "audio/wav", pcm: "audio/L16",
  };

  // The API key lives in sessionStorage (this tab only, gone when it closes), never in the URL.
  const API_KEY_STORAGE = "soprano-api-key";

  let serverInfo = {};
  let modelId = "soprano";
  let audioContext = null;
  let analyser = null;
  let current = null; // the speech in progress: {controller, sources, ...}
  let last = null; // the last finished speech: {body, pcm: Uint8Array, sampleRate}

  // What the tests (and a curious user in the console) read: the page's own account of playback.
  const playback = {
    state: "idle", sampleRate: 0, startAt: 0, scheduledUntil: 0, samples: 0, buffers: 0, gaps: 0,
    ttfaMs: null, endedBuffers: 0,
  };
  window.sopranoPage = {
    playback,
    get audioContext() { return audioContext; },
  };

  function setState(state) {
    playback.state = state;
    app.dataset.state = state;
    const busy = state === "requesting" || state === "playing";
    speakButton.disabled = busy;
    stopButton.disabled = !busy;
    downloadButton.disabled = busy || last === null;
  }

  function say(message) {
    statusLine.textContent = message;
  }

  function showError(message) {
    errorLine.textContent = message;
    errorLine.hidden = false;
  }

  function clearError() {
    errorLine.textContent = "";
    errorLine.hidden = true;
  }

  // The server's words for a failed response: OpenAI's {"error": {"message", ...}} body.
  async function errorMessage(response) {
    let text = "";
    try {
      text = await response.text();
      const body = JSON.parse(text);
      if (body && body.error && body.error.message) return body.error.message;
      if (body && typeof body.detail === "string") return body.detail;
    } catch (_) { /* not JSON: fall through to the text */ }
    const what = `The server answered ${response.status} ${response.statusText}`.trim();
    return text ? `${what}: ${text.slice(0, 300)}` : what;
  }

  // Request headers with the API key's Authorization when one is entered.
  function headers(extra) {
    const key = apiKeyField.value.trim();
    return key ? { ...extra, Authorization: `Bearer ${key}` } : { ...extra };
  }

  function keepApiKey() {
    const key = apiKeyField.value.trim();
    try {
      if (key) sessionStorage.setItem(API_KEY_STORAGE, key); else sessionStorage.removeItem(API_KEY_STORAGE);
    } catch (_) { /* storage disabled: the key lasts as long as the page */ }
  }

  async function getJson(url) {
    const response = await fetch(url, { headers: headers({ Accept: "application/json" }) });
    if (!response.ok) throw new Error(await errorMessage(response));
    return response.json();
  }

  // GET /v1/audio/voices: {"voices": [{id, name, alias_of}], "default": id}.
  function fillVoices(body) {
    const select = $("voice");
    select.replaceChildren();
    for (const v of body.voices || []) {
      const name = v.alias_of ? `${v.name} (alias of ${v.alias_of})` : v.name || v.id;
      select.append(new Option(name, v.id, false, v.id === body.default));
    }
    if (select.options.length === 0) select.append(new Option("default", "default"));
  }

  function fillInfo(info) {
    serverInfo = info;
    for (const dd of document.querySelectorAll("#server-info dd")) {
      const value = info[dd.dataset.key];
      dd.textContent = value === undefined || value === null ? "–" : String(value);
    }
    if (info.sample_rate) $("sample_rate").options[0].textContent = `default (model: ${info.sample_rate} Hz)`;
    if (Array.isArray(info.formats)) {
      for (const option of [...$("format").options]) if (!info.formats.includes(option.value)) option.remove();
    }
    if (info.max_input_chars) textBox.dataset.max = String(info.max_input_chars);
    // The runtime's sampling defaults (SamplingParams), written once there: the page shows them.
    for (const [name, value] of Object.entries(info.sampling_defaults || {})) {
      const field = $(name);
      if (field && field.value === "") field.value = String(value);
    }
    if (info.max_new_tokens) {
      const tokens = $("max_new_tokens");
      tokens.max = String(info.max_new_tokens);
      if (Number(tokens.value) > info.max_new_tokens) tokens.value = String(info.max_new_tokens);
    }
    countChars();
  }

  function countChars() {
    const max = textBox.dataset.max;
    const count = $("text-count");
    count.textContent = `${textBox.value.length}${max ? ` of at most ${max}` : ""} characters.`;
    // Only marked: the server's own error says what is wrong when it is sent anyway.
    count.classList.toggle("over", Boolean(max) && textBox.value.length > Number(max));
  }

  // /v1/server/info answers 503 while the model loads: wait for it, saying so.
  async function loadInfo() {
    for (;;) {
      const response = await fetch("/v1/server/info", { headers: headers({ Accept: "application/json" }) });
      if (response.ok) return response.json();
      if (response.status !== 503) throw new Error(await errorMessage(response));
      say("The model is still loading…");
      const retry = Number(response.headers.get("Retry-After")) || 1;
      await new Promise((resolve) => setTimeout(resolve, Math.min(retry, 2) * 1000));
    }
  }

  async function loadServer() {
    clearError();
    say("Loading the server's settings…");
    const [voices, info, models] = await Promise.allSettled([getJson("/v1/audio/voices"), loadInfo(), getJson("/v1/models")]);
    if (voices.status === "fulfilled") fillVoices(voices.value);
    if (info.status === "fulfilled") fillInfo(info.value);
    if (models.status === "fulfilled") {
      const list = models.value.data || [];
      if (list.length && list[0].id) modelId = list[0].id;
    }
    const failed = [voices, info, models].filter((r) => r.status === "rejected");
    if (failed.length) {
      showError(`Could not read the server's settings: ${failed[0].reason.message}`);
      say("Not ready: see the error.");
      return;
    }
    say("Ready.");
  }

  function numberField(id) {
    const raw = $(id).value.trim();
    return raw === "" ? null : Number(raw);
  }

  // The request body from the form; a sampled request without a seed gets one, so that the download
  // (a second request with the same body) produces the same audio.
  function requestBody() {
    const body = {
      model: modelId,
      input: textBox.value,
      voice: $("voice").value,
      temperature: numberField("temperature"),
      top_p: numberField("top_p"),
      top_k: numberField("top_k"),
      repetition_penalty: numberField("repetition_penalty"),
      seed: numberField("seed"),
      max_new_tokens: numberField("max_new_tokens"),
      sample_rate: numberField("sample_rate"),
    };
    if (body.seed === null && body.temperature) body.seed = Math.floor(Math.random() * 2 ** 31);
    for (const key of Object.keys(body)) if (body[key] === null) delete body[key];
    return body;
  }

  function ensureAudio() {
    if (audioContext === null) {
      // At the model's rate, so that its buffers play without resampling; other rates still play.
      const options = serverInfo.sample_rate ? { sampleRate: serverInfo.sample_rate } : {};
      audioContext = new AudioContext(options);
      analyser = audioContext.createAnalyser();
      analyser.fftSize = 2048;
      analyser.connect(audioContext.destination);
    }
    // Called from the click or key handler, so the browser lets it start.
    return audioContext.resume();
  }

  function resetStats() {
    Object.assign(playback, {
      sampleRate: 0, startAt: 0, scheduledUntil: 0, samples: 0, buffers: 0, gaps: 0, ttfaMs: null, endedBuffers: 0,
    });
    for (const id of ["stat-ttfa", "stat-length", "stat-xrt", "stat-gaps"]) $(id).textContent = "–";
  }

  function showStats(elapsedS) {
    const audioS = playback.sampleRate ? playback.samples / playback.sampleRate : 0;
    if (playback.ttfaMs !== null) $("stat-ttfa").textContent = `${Math.round(playback.ttfaMs)} ms`;
    $("stat-length").textContent = `${audioS.toFixed(2)} s`;
    if (elapsedS > 0) $("stat-xrt").textContent = `${(audioS / elapsedS).toFixed(2)}×`;
    $("stat-gaps").textContent = String(playback.gaps);
  }

  // Little-endian 16-bit samples -> one AudioBuffer, scheduled right after the previous one.
  function schedule(bytes, speech) {
    const count = bytes.length >> 1;
    if (count === 0) return;
    const view = new DataView(bytes.buffer, bytes.byteOffset, count * 2);
    const buffer = audioContext.createBuffer(1, count, playback.sampleRate);
    const channel = buffer.getChannelData(0);
    for (let i = 0; i < count; i++) channel[i] = view.getInt16(2 * i, true) / 32768;
    const source = audioContext.createBufferSource();
    source.buffer = buffer;
    source.connect(analyser);
    const now = audioContext.currentTime;
    let at = playback.scheduledUntil;
    if (playback.buffers === 0) {
      at = now + START_LEAD_S;
      playback.startAt = at;
    } else if (at < now) {
      playback.gaps += 1; // the stream fell behind the clock: start this buffer a little later
      at = now + START_LEAD_S;
    }
    source.start(at);
    playback.scheduledUntil = at + buffer.duration;
    playback.buffers += 1;
    playback.samples += count;
    speech.sources.push(source);
    source.onended = () => {
      playback.endedBuffers += 1;
      speech.sources.splice(speech.sources.indexOf(source), 1);
      if (speech.streamDone && speech.sources.length === 0 && current === speech) finish(speech);
    };
  }

  function finish(speech) {
    current = null;
    last = { body: speech.body, pcm: concat(speech.chunks), sampleRate: playback.sampleRate };
    setState("finished");
    say(`Finished: ${$("stat-length").textContent} of audio.`);
  }

  function concat(chunks) {
    const out = new Uint8Array(chunks.reduce((n, c) => n + c.length, 0));
    let offset = 0;
    for (const c of chunks) { out.set(c, offset); offset += c.length; }
    return out;
  }

  async function speak() {
    if (current !== null) return;
    clearError();
    resetStats();
    const resumed = ensureAudio();
    const body = requestBody();
    $("stat-seed").textContent = body.seed === undefined ? "–" : String(body.seed);
    const speech = { body, controller: new AbortController(), sources: [], chunks: [], streamDone: false };
    current = speech;
    setState("requesting");
    say("Waiting for the first audio…");
    const started = performance.now();
    try {
      await resumed;
      const response = await fetch("/v1/audio/speech", {
        method: "POST",
        headers: headers({ "Content-Type": "application/json" }),
        // PCM at the chosen rate, else the model's own (the server's PCM default is OpenAI's 24 kHz).
        body: JSON.stringify({
          ...body, response_format: "pcm", stream_format: "audio", sample_rate: body.sample_rate || serverInfo.sample_rate,
        }),
        signal: speech.controller.signal,
      });
      if (!response.ok) throw new Error(await errorMessage(response));
      playback.sampleRate = Number(response.headers.get("X-Sample-Rate")) || body.sample_rate
        || serverInfo.sample_rate || audioContext.sampleRate;
      const reader = response.body.getReader();
      let carry = null; // the odd byte of a sample split between two network chunks
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        if (!value || value.length === 0) continue;
        speech.chunks.push(value);
        let bytes = value;
        if (carry !== null) {
          bytes = new Uint8Array(value.length + 1);
          bytes[0] = carry;
          bytes.set(value, 1);
          carry = null;
        }
        if (bytes.length % 2 === 1) {
          carry = bytes[bytes.length - 1];
          bytes = bytes.subarray(0, bytes.length - 1);
        }
        if (bytes.length === 0) continue;
        if (playback.ttfaMs === null) {
          playback.ttfaMs = performance.now() - started;
          setState("playing");
          say("Playing while it streams…");
          draw();
        }
        schedule(bytes, speech);
        showStats((performance.now() - started) / 1000);
      }
      speech.streamDone = true;
      showStats((performance.now() - started) / 1000);
      if (playback.buffers === 0) {
        current = null;
        setState("finished");
        say("The server sent no audio.");
      } else if (speech.sources.length === 0) {
        finish(speech);
      } else {
        say("All audio received; playing the rest…");
      }
    } catch (err) {
      if (current === speech) current = null;
      stopSources(speech);
      if (err.name === "AbortError") {
        setState("stopped");
        say("Stopped.");
        return;
      }
      setState("error");
      say("Failed.");
      showError(err.name === "TypeError" && playback.buffers > 0
        ? "The connection ended before the audio was complete."
        : err.message);
    }
  }

  function stopSources(speech) {
    for (const source of speech.sources.splice(0)) {
      source.onended = null;
      try { source.stop(); } catch (_) { /* not started yet */ }
    }
  }

  function stop() {
    const speech = current;
    if (speech === null) return;
    current = null;
    // Aborting the fetch closes the connection; the server drops the request's rows.
    speech.controller.abort();
    stopSources(speech);
    setState("stopped");
    say("Stopped.");
  }

  function wavFile(pcm, sampleRate) {
    const header = new DataView(new ArrayBuffer(44));
    const text = (offset, s) => { for (let i = 0; i < s.length; i++) header.setUint8(offset + i, s.charCodeAt(i)); };
    text(0, "RIFF"); header.setUint32(4, 36 + pcm.length, true); text(8, "WAVE");
    text(12, "fmt "); header.setUint32(16, 16, true); header.setUint16(20, 1, true); header.setUint16(22, 1, true);
    header.setUint32(24, sampleRate, true); header.setUint32(28, sampleRate * 2, true);
    header.setUint16(32, 2, true); header.setUint16(34, 16, true);
    text(36, "data"); header.setUint32(40, pcm.length, true);
    return new Blob([header.buffer, pcm], { type: "audio/wav" });
  }

  // WAV and PCM come from the bytes that were played (at the chosen rate, or the model's: the rate
  // of the server's own WAV); other formats are asked of the server with the same body (same seed),
  // which gives the same audio.
  async function download() {
    if (last === null) return;
    const format = $("format").value;
    clearError();
    let blob;
    if (format === "pcm") {
      blob = new Blob([last.pcm], { type: FORMAT_TYPES.pcm });
    } else if (format === "wav") {
      blob = wavFile(last.pcm, last.sampleRate);
    } else {
      downloadButton.disabled = true;
      say(`Encoding ${format.toUpperCase()} on the server…`);
      try {
        const response = await fetch("/v1/audio/speech", {
          method: "POST",
          headers: headers({ "Content-Type": "application/json" }),
          body: JSON.stringify({ ...last.body, response_format: format, stream_format: "audio" }),
        });
        if (!response.ok) throw new Error(await errorMessage(response));
        blob = new Blob([await response.arrayBuffer()], { type: FORMAT_TYPES[format] });
      } catch (err) {
        showError(err.message);
        say("Download failed.");
        return;
      } finally {
        downloadButton.disabled = current !== null;
      }
    }
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = `speech.${format}`;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 60000);
    say(`Saved speech.${format} (${blob.size} bytes).`);
  }

  function draw() {
    const g = canvas.getContext("2d");
    const data = new Float32Array(analyser.fftSize);
    const styles = getComputedStyle(document.documentElement);
    const frame = () => {
      analyser.getFloatTimeDomainData(data);
      const { width, height } = canvas;
      g.fillStyle = styles.getPropertyValue("--wave-bg").trim() || "#fff";
      g.fillRect(0, 0, width, height);
      g.strokeStyle = styles.getPropertyValue("--wave-line").trim() || "#000";
      g.lineWidth = 2;
      g.beginPath();
      let peak = 0;
      for (let i = 0; i < data.length; i++) {
        const x = (i / (data.length - 1)) * width;
        const y = (0.5 - data[i] / 2) * height;
        if (i === 0) g.moveTo(x, y); else g.lineTo(x, y);
        peak = Math.max(peak, Math.abs(data[i]));
      }
      g.stroke();
      level.style.width = `${Math.min(100, peak * 100).toFixed(1)}%`;
      if (playback.state === "playing") requestAnimationFrame(frame);
      else level.style.width = "0%";
    };
    requestAnimationFrame(frame);
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    speak();
  });
  stopButton.addEventListener("click", stop);
  downloadButton.addEventListener("click", download);
  textBox.addEventListener("input", countChars);
  textBox.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      speak();
    }
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && current !== null) stop();
  });

  apiKeyField.addEventListener("change", () => {
    keepApiKey();
    loadServer().catch((err) => showError(err.message));
  });
  try {
    apiKeyField.value = sessionStorage.getItem(API_KEY_STORAGE) || "";
  } catch (_) { /* storage disabled */ }

  setState("idle");
  countChars();
  loadServer().catch((err) => showError(err.message));
})();
