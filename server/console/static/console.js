// reprogram console: plain JavaScript over the server's documented JSON API.
// The API key lives in sessionStorage and travels as the X-API-Key header, never in a URL.
// Every request goes to the server that served this page (relative paths only).
"use strict";

(() => {
  const KEY = "reprogram.apiKey";
  const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
  const $ = (id) => document.getElementById(id);
  const state = { models: [], prompts: [], jobs: new Map(), streams: new Map(), urls: [] };

  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  // ---- small helpers ------------------------------------------------------------------------
  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (value === undefined || value === null || value === false) continue;
      if (name === "class") node.className = value;
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value === true ? "" : value);
    }
    for (const child of children.flat()) {
      if (child === undefined || child === null) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }
  const svg = (tag, attrs = {}) => {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
    return node;
  };
  const pct = (x) => (x === null || x === undefined ? "–" : `${(100 * x).toFixed(1)}%`);
  const fmt = (x) => (x === null || x === undefined ? "–" : Number(x).toLocaleString("en"));
  const score = (x) => (x === null || x === undefined ? "" : ` ${Number(x).toFixed(3)}`);
  function objectUrl(blob) {
    const url = URL.createObjectURL(blob);
    state.urls.push(url);
    return url;
  }

  function apiKey() { return sessionStorage.getItem(KEY) || ""; }
  function authHeaders() {
    const headers = new Headers();
    const key = apiKey();
    if (key) headers.set("X-API-Key", key);
    return headers;
  }

  async function errorText(res) {
    let text = "";
    try { text = await res.text(); } catch (_) { /* no body */ }
    try {
      const body = JSON.parse(text);
      if (body && typeof body.error === "string") return `${res.status}: ${body.error}`;
      if (body && body.detail) return `${res.status}: ${JSON.stringify(body.detail)}`;
    } catch (_) { /* not JSON */ }
    return `${res.status} ${res.statusText}${text ? `: ${text.slice(0, 300)}` : ""}`;
  }

  async function api(method, path, { form, json, signal } = {}) {
    const init = { method, headers: authHeaders(), cache: "no-store", signal };
    if (json !== undefined) {
      init.headers.set("Content-Type", "application/json");
      init.body = JSON.stringify(json);
    } else if (form) {
      init.body = form;
    }
    let res;
    try {
      res = await fetch(path, init);
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new ApiError(0, `cannot reach the server: ${err.message}`);
    }
    if (!res.ok) {
      const message = await errorText(res);
      throw new ApiError(res.status, res.status === 401
        ? `the server refused the key (${message}); enter a valid API key above` : message);
    }
    return res;
  }
  const getJSON = async (path) => (await api("GET", path)).json();
  const files = (name, list) => {
    const form = new FormData();
    for (const f of list) form.append(name, f, f.name);
    return form;
  };

  function showError(err) {
    const box = $("error");
    box.textContent = err && err.message ? err.message : String(err);
    box.hidden = false;
  }
  function clearError() { $("error").hidden = true; $("error").textContent = ""; }
  function say(text) { $("status").textContent = text; }
  async function guarded(fn) {
    clearError();
    try { await fn(); } catch (err) { if (err.name !== "AbortError") showError(err); }
  }

  // ---- tabs (arrow keys move between them, as the ARIA tabs pattern says) --------------------
  const tabs = () => [...document.querySelectorAll('[role="tab"]')];
  function selectTab(tab, focus = true) {
    for (const t of tabs()) {
      const on = t === tab;
      t.setAttribute("aria-selected", String(on));
      t.tabIndex = on ? 0 : -1;
      $(t.getAttribute("aria-controls")).hidden = !on;
    }
    if (focus) tab.focus();
  }
  function wireTabs() {
    for (const tab of tabs()) {
      tab.addEventListener("click", () => selectTab(tab));
      tab.addEventListener("keydown", (ev) => {
        const all = tabs();
        const at = all.indexOf(tab);
        const to = { ArrowRight: at + 1, ArrowLeft: at - 1, Home: 0, End: all.length - 1 }[ev.key];
        if (to === undefined) return;
        ev.preventDefault();
        selectTab(all[(to + all.length) % all.length]);
      });
    }
  }
  const show = (panel) => selectTab($(`tab-${panel}`));

  // ---- drop zones: a file input inside a label, plus drag and drop --------------------------
  function dropZone(zone, input, onFiles) {
    input.addEventListener("change", () => { if (input.files.length) onFiles([...input.files]); });
    zone.addEventListener("dragover", (ev) => { ev.preventDefault(); zone.classList.add("over"); });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (ev) => {
      ev.preventDefault();
      zone.classList.remove("over");
      if (ev.dataTransfer && ev.dataTransfer.files.length) onFiles([...ev.dataTransfer.files]);
    });
  }

  // ---- models -------------------------------------------------------------------------------
  async function loadModels() {
    const { models } = await getJSON("/v1/models");
    const infos = await Promise.all(models.map(
      (m) => getJSON(`/v1/models/${encodeURIComponent(m)}`)));
    state.models = infos;
    const list = $("model-list");
    list.replaceChildren(...infos.map(modelCard));
    if (!infos.length) list.append(el("p", {}, "This server serves no model yet."));
  }
  function modelCard(m) {
    const classes = m.class_names || [];
    const size = m.input_size ? m.input_size.join("×") : "any";
    return el("article", { class: "card model", "data-model": m.name },
      el("h3", {}, m.name),
      el("dl", {},
        el("dt", {}, "input"), el("dd", {}, `${size} RGB`),
        el("dt", {}, "classes"),
        el("dd", {}, `${classes.length}: ${classes.slice(0, 12).join(", ")}${classes.length > 12 ? ", …" : ""}`),
        el("dt", {}, "output"), el("dd", {}, m.output_kind || "–"),
        el("dt", {}, "batch cap"), el("dd", {}, fmt(m.max_batch_size)),
        m.architecture ? [el("dt", {}, "architecture"), el("dd", {}, m.architecture)] : null));
  }

  // ---- prompts ------------------------------------------------------------------------------
  async function loadPrompts() {
    const { prompts } = await getJSON("/v1/prompts");
    state.prompts = prompts;
    const list = $("prompt-list");
    list.replaceChildren(...prompts.map(promptCard));
    if (!prompts.length) list.append(el("p", {}, "No hosted prompt yet: upload one above, or run a tuning job."));
    const select = $("try-prompt");
    const keep = select.value;
    select.replaceChildren(...prompts.map((p) => el("option", { value: p.id },
      `${p.id} (${p.target_classes.length} classes, ${p.program_kind})`)));
    if (prompts.some((p) => p.id === keep)) select.value = keep;
    await Promise.all(prompts.map(drawProgram));
  }
  function promptCard(p) {
    const card = el("article", { class: "card prompt", "data-prompt": p.id },
      el("img", { class: "pixelated program", alt: `program of prompt ${p.id}` }),
      el("h3", {}, p.id),
      el("dl", {},
        el("dt", {}, "classes"), el("dd", {}, p.target_classes.join(", ")),
        el("dt", {}, "program"), el("dd", {}, p.program_kind),
        el("dt", {}, "label map"), el("dd", {}, p.labelmap_kind),
        el("dt", {}, "accuracy"), el("dd", {}, `${pct(p.val_accuracy)} validation, ${pct(p.test_accuracy)} test`),
        el("dt", {}, "source"), el("dd", {}, (p.source && p.source.name) || "–"),
        el("dt", {}, "created"), el("dd", {}, p.created || "–")),
      el("div", { class: "actions" },
        el("button", { type: "button", onclick: () => { $("try-prompt").value = p.id; show("try"); } }, "Try it"),
        el("button", { type: "button", class: "danger", onclick: (ev) => deletePrompt(p.id, ev.currentTarget) }, "Delete")));
    return card;
  }
  async function drawProgram(p) {
    const img = document.querySelector(`[data-prompt="${CSS.escape(p.id)}"] img`);
    try {
      const res = await api("GET", `/v1/prompts/${encodeURIComponent(p.id)}/program.png`);
      if (img) img.src = objectUrl(await res.blob());
    } catch (err) {
      if (img) img.alt = `program not drawn: ${err.message}`;
    }
  }
  function deletePrompt(id, button) {
    if (button.dataset.armed !== "1") {  // two steps: a slip of a key deletes nothing
      button.dataset.armed = "1";
      button.textContent = "Really delete?";
      setTimeout(() => { button.dataset.armed = ""; button.textContent = "Delete"; }, 5000);
      return;
    }
    guarded(async () => {
      await api("DELETE", `/v1/prompts/${encodeURIComponent(id)}`);
      say(`deleted prompt ${id}`);
      await loadPrompts();
    });
  }
  function uploadPrompt(list) {
    guarded(async () => {
      const file = list[0];
      say(`uploading ${file.name}…`);
      const res = await api("POST", "/v1/prompts", { form: files("file", [file]) });
      const summary = await res.json();
      say(`hosted ${file.name} as prompt ${summary.id} (${res.status === 201 ? "new" : "already hosted"})`);
      await loadPrompts();
    }).finally(() => { $("prompt-file").value = ""; });
  }

  // ---- try it -------------------------------------------------------------------------------
  function sourceModelOf(prompt) {
    const names = state.models.map((m) => m.name);
    const named = prompt && prompt.source && prompt.source.name;
    return names.includes(named) ? named : names[0];
  }
  function topList(entries, cls) {
    return el("ol", { class: cls }, entries.map((t, i) => el("li", {},
      el("span", { class: i === 0 ? "label" : "" }, t.label), score(t.score))));
  }
  function tryImages(list) {
    guarded(async () => {
      const id = $("try-prompt").value;
      if (!id) throw new Error("pick a prompt first (upload one on the Prompts tab)");
      const prompt = state.prompts.find((p) => p.id === id);
      const model = sourceModelOf(prompt);
      const k = Math.max(1, Math.min(20, Number($("try-topk").value) || 3));
      const results = $("try-results");
      results.replaceChildren();
      say(`classifying ${list.length} image(s) with prompt ${id}…`);
      await Promise.all(list.map((file) => tryOne(results, file, id, model, k)));
      say(`classified ${list.length} image(s) with prompt ${id}`);
    }).finally(() => { $("try-files").value = ""; });
  }
  async function tryOne(results, file, id, model, k) {
    const row = el("div", { class: "result", "data-file": file.name });
    results.append(row);
    const pid = encodeURIComponent(id);
    const [rendered, prompted, alone] = await Promise.allSettled([
      api("POST", `/v1/prompts/${pid}/render`, { form: files("files", [file]) }).then((r) => r.blob()),
      api("POST", `/v1/prompts/${pid}/predict?top_k=${k}`, { form: files("files", [file]) }).then((r) => r.json()),
      model ? api("POST", `/v1/models/${encodeURIComponent(model)}/predict?top_k=${k}`,
        { form: files("files", [file]) }).then((r) => r.json()) : Promise.reject(new Error("no source model")),
    ]);
    const fail = (what, r) => el("p", { class: "error" }, `${what}: ${r.reason.message}`);
    row.append(
      el("figure", {}, el("figcaption", {}, `${file.name}`),
        el("img", { class: "pixelated", alt: `uploaded image ${file.name}`, src: objectUrl(file) })),
      rendered.status === "fulfilled"
        ? el("figure", {}, el("figcaption", {}, "as the model receives it"),
          el("img", { class: "pixelated prompted", alt: `${file.name} with the program applied`, src: objectUrl(rendered.value) }))
        : fail("rendering", rendered),
      el("div", {}, el("h4", {}, "with the prompt"),
        prompted.status === "fulfilled" ? topList(prompted.value.predictions[0].top, "with-prompt") : fail("prediction", prompted)),
      el("div", {}, el("h4", {}, `${model || "the model"} alone`),
        alone.status === "fulfilled" ? topList(alone.value.predictions[0].top, "without-prompt") : fail("prediction", alone)));
    for (const r of [rendered, prompted, alone]) if (r.status === "rejected") showError(r.reason);
  }

  // ---- jobs ---------------------------------------------------------------------------------
  function jobConfig() {
    const config = {};
    const num = (id) => ($(id).value === "" ? null : Number($(id).value));
    if ($("job-program").value) config.program = $("job-program").value;
    for (const [id, name] of [["job-tokens", "tokens"], ["job-budget", "budget"],
      ["job-epochs", "epochs"], ["job-seed", "seed"]]) {
      const v = num(id);
      if (v !== null) config[name] = v;
    }
    return config;
  }
  function submitJob(ev) {
    ev.preventDefault();
    guarded(async () => {
      const data = $("job-data").files[0];
      if (!data) throw new Error("pick a data set archive (a zip or tar of class folders) first");
      const form = new FormData();
      form.append("data", data, data.name);
      form.append("config", JSON.stringify(jobConfig()));
      $("job-submit").disabled = true;
      try {
        const job = await (await api("POST", "/v1/fits", { form })).json();
        say(`submitted tuning job ${job.id}`);
        renderJob(job);
        follow(job.id);
      } finally { $("job-submit").disabled = false; }
    });
  }
  async function loadJobs() {
    const { fits } = await getJSON("/v1/fits");
    $("job-list").replaceChildren();
    state.jobs.clear();
    for (const job of [...fits].reverse()) {
      renderJob(job);
      if (!TERMINAL.has(job.state)) follow(job.id);
    }
    if (!fits.length) $("job-list").append(el("p", { class: "empty" }, "No tuning job yet."));
  }
  function curve(points) {
    const box = svg("svg", { class: "curve", viewBox: "0 0 100 40", preserveAspectRatio: "none",
      role: "img", "aria-label": `validation accuracy over ${points.length} evaluations` });
    if (points.length) {
      const last = points[points.length - 1].images || 1;
      const xy = points.map((p) => `${(100 * (p.images || 0) / last).toFixed(2)},${(40 - 38 * p.val_accuracy).toFixed(2)}`);
      box.append(svg("polyline", { points: xy.join(" "), "vector-effect": "non-scaling-stroke" }));
    }
    return box;
  }
  function renderJob(job) {
    const p = job.progress || {};
    const fraction = job.state === "succeeded" ? 1 : p.fraction;
    const result = job.result || {};
    const card = el("article", { class: "card job", "data-job": job.id },
      el("h3", {}, job.id),
      el("p", {}, "state: ", el("span", { class: `state state-${job.state}` }, job.state)),
      el("progress", { max: "1", value: fraction === null || fraction === undefined ? null : String(fraction),
        "aria-label": `progress of job ${job.id}` }),
      el("dl", {},
        el("dt", {}, "step"), el("dd", {}, `${fmt(p.step)} / ${fmt(p.steps)}`),
        el("dt", {}, "images"), el("dd", {}, `${fmt(p.images)} / ${fmt(p.budget)}`),
        el("dt", {}, "validation"), el("dd", { class: "val" }, pct(job.val_accuracy)),
        job.state === "succeeded" ? [el("dt", {}, "test"), el("dd", {}, pct(result.test_accuracy))] : null,
        job.prompt ? [el("dt", {}, "prompt"), el("dd", { class: "job-prompt" }, job.prompt)] : null),
      el("figure", { class: "curve-box" }, curve(job.curve || []),
        el("figcaption", {}, `validation accuracy (0–100%) against image evaluations, ${(job.curve || []).length} points`)),
      job.error ? el("p", { class: "error job-error" }, job.error) : null,
      el("div", { class: "actions" },
        TERMINAL.has(job.state) ? null
          : el("button", { type: "button", class: "danger", onclick: () => cancelJob(job.id) }, "Cancel"),
        job.prompt ? el("button", { type: "button", onclick: () => openPrompt(job.prompt) }, "Open prompt") : null));
    const old = state.jobs.get(job.id);
    if (old) old.replaceWith(card);
    else {
      const list = $("job-list");
      const empty = list.querySelector(".empty");
      if (empty) empty.remove();
      list.prepend(card);
    }
    state.jobs.set(job.id, card);
  }
  function cancelJob(id) {
    guarded(async () => {
      renderJob(await (await api("DELETE", `/v1/fits/${encodeURIComponent(id)}`)).json());
      say(`cancelled tuning job ${id}`);
    });
  }
  function openPrompt(id) {
    guarded(async () => {
      await loadPrompts();
      $("try-prompt").value = id;
      show("try");
      say(`prompt ${id} is selected: drop an image to try it`);
    });
  }
  // Server-Sent Events read with fetch, so the key travels in a header (EventSource sends none).
  async function follow(id) {
    if (state.streams.has(id)) return;
    const control = new AbortController();
    state.streams.set(id, control);
    try {
      const res = await api("GET", `/v1/fits/${encodeURIComponent(id)}/events`, { signal: control.signal });
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let at;
        while ((at = buffer.indexOf("\n\n")) >= 0) {
          onEvent(buffer.slice(0, at));
          buffer = buffer.slice(at + 2);
        }
      }
    } catch (err) {
      if (err.name !== "AbortError") showError(err);
    } finally {
      state.streams.delete(id);
    }
  }
  function onEvent(chunk) {
    let event = "message";
    let data = "";
    for (const line of chunk.split("\n")) {
      if (line.startsWith("event:")) event = line.slice(6).trim();
      else if (line.startsWith("data:")) data += line.slice(5).trim();
    }
    if (event === "job" && data) renderJob(JSON.parse(data));
    else if (event === "end") loadPrompts().catch(showError);
  }

  // ---- the key, and start -------------------------------------------------------------------
  function stopStreams() {
    for (const control of state.streams.values()) control.abort();
    state.streams.clear();
    for (const url of state.urls.splice(0)) URL.revokeObjectURL(url);
  }
  async function refresh() {
    stopStreams();
    say("loading…");
    await loadModels();
    await Promise.all([loadPrompts(), loadJobs().catch((err) => {
      // a server without tuning jobs says so; the rest of the console still works
      $("job-list").replaceChildren(el("p", { class: "error" }, err.message));
    })]);
    say(`connected${apiKey() ? " with your key" : ""}: ${state.models.length} model(s), ${state.prompts.length} prompt(s)`);
  }
  function wire() {
    wireTabs();
    $("key-input").value = apiKey();
    $("key-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const key = $("key-input").value.trim();
      if (key) sessionStorage.setItem(KEY, key); else sessionStorage.removeItem(KEY);
      guarded(refresh);
    });
    $("key-forget").addEventListener("click", () => {
      sessionStorage.removeItem(KEY);
      $("key-input").value = "";
      stopStreams();
      for (const id of ["model-list", "prompt-list", "try-results", "job-list"]) $(id).replaceChildren();
      $("try-prompt").replaceChildren();
      say("key forgotten");
    });
    dropZone($("prompt-drop"), $("prompt-file"), uploadPrompt);
    dropZone($("try-drop"), $("try-files"), tryImages);
    $("job-form").addEventListener("submit", submitJob);
    guarded(async () => {
      try {
        await refresh();
      } catch (err) {
        if (err.status !== 401 || apiKey()) throw err;
        say("This server needs an API key: enter it above.");
        $("key-input").focus();
      }
    });
  }
  document.addEventListener("DOMContentLoaded", wire);
})();
