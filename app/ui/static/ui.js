// compaas dashboard: the only script of the /ui pages (served by the app, no inline script).
// Plain DOM code: submit-on-change filters, a refresh while an upload is inspected, the
// pipeline builder fed by GET /v1/methods, and live job progress from the SSE stream.
"use strict";

function autosubmit() {
  for (const select of document.querySelectorAll("select.autosubmit")) {
    select.addEventListener("change", () => select.form.submit());
  }
}

function reloadWhilePending() {
  const note = document.querySelector("[data-reload-while-pending]");
  if (note) {
    setTimeout(() => location.reload(), Number(note.dataset.reloadWhilePending) || 2000);
  }
}

// ------------------------------------------------------------------ pipeline builder

function defaultsOf(schema) {
  const params = {};
  for (const [name, prop] of Object.entries(schema.properties || {})) {
    if (name === "op" || name === "version") continue;
    if (Object.prototype.hasOwnProperty.call(prop, "default")) params[name] = prop.default;
    else if (Array.isArray(prop.examples) && prop.examples.length) params[name] = prop.examples[0];
  }
  return params;
}

function pipelineBuilder() {
  const form = document.getElementById("job-form");
  if (!form) return;
  const builder = document.getElementById("builder");
  const stepsBox = document.getElementById("steps");
  const opSelect = document.getElementById("op-select");
  const output = document.getElementById("pipeline-json");
  const presetSelect = document.getElementById("preset-select");
  const kindPipeline = document.getElementById("kind-pipeline");
  const steps = [];
  let methods = {};

  function showKind() {
    const pipeline = kindPipeline.checked;
    builder.hidden = !pipeline;
    presetSelect.disabled = pipeline;
    output.disabled = !pipeline;
  }
  for (const radio of form.querySelectorAll("input[name=kind]")) {
    radio.addEventListener("change", showKind);
  }
  showKind();

  function serialize() {
    let ok = true;
    const pipeline = steps.map((step) => {
      try {
        const params = JSON.parse(step.textarea.value || "{}");
        step.error.textContent = "";
        return Object.assign({ op: step.op }, params);
      } catch (e) {
        ok = false;
        step.error.textContent = "not JSON: " + e.message;
        return { op: step.op };
      }
    });
    if (steps.length) output.value = JSON.stringify(pipeline, null, 1);
    return ok;
  }

  function addStep(op, params) {
    const box = document.createElement("fieldset");
    box.className = "step-editor";
    const legend = document.createElement("legend");
    legend.textContent = "step " + (steps.length + 1) + ": " + op;
    const hint = document.createElement("details");
    const summary = document.createElement("summary");
    summary.textContent = "about " + op;
    const about = document.createElement("p");
    about.className = "note";
    about.textContent = (methods[op] && methods[op].description) || "";
    hint.append(summary, about);
    const textarea = document.createElement("textarea");
    textarea.rows = 10;
    textarea.cols = 80;
    textarea.spellcheck = false;
    textarea.value = JSON.stringify(params, null, 1);
    const error = document.createElement("p");
    error.className = "error";
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "Remove";
    const step = { op, textarea, error, box };
    remove.addEventListener("click", () => {
      steps.splice(steps.indexOf(step), 1);
      box.remove();
      steps.forEach((s, i) => { s.box.querySelector("legend").textContent = "step " + (i + 1) + ": " + s.op; });
      if (!steps.length) output.value = "";
      serialize();
    });
    textarea.addEventListener("input", serialize);
    box.append(legend, hint, textarea, error, remove);
    stepsBox.append(box);
    steps.push(step);
    serialize();
  }

  fetch("/v1/methods", { credentials: "same-origin" })
    .then((r) => (r.ok ? r.json() : Promise.reject(new Error("GET /v1/methods: " + r.status))))
    .then((body) => {
      for (const item of body.items) {
        methods[item.op] = item;
        const option = document.createElement("option");
        option.value = item.op;
        option.textContent = item.op;
        opSelect.append(option);
      }
    })
    .catch((e) => { opSelect.title = String(e); });

  document.getElementById("add-step").addEventListener("click", () => {
    const method = methods[opSelect.value];
    if (method) addStep(method.op, defaultsOf(method.schema));
  });
  form.addEventListener("submit", (event) => {
    if (kindPipeline.checked && steps.length && !serialize()) event.preventDefault();
  });
}

// ------------------------------------------------------------------ live job progress

function liveJob() {
  const live = document.getElementById("live");
  if (!live || !live.dataset.live || !window.EventSource) return;
  const bar = document.getElementById("progress");
  const text = document.getElementById("progress-text");
  const message = document.getElementById("progress-message");
  const badge = document.getElementById("job-status");
  const note = document.getElementById("live-note");

  function setProgress(fraction) {
    const value = Math.max(Number(bar.value) || 0, Math.round(100 * fraction));
    bar.value = value;
    text.value = value + " %";
    live.dataset.progress = String(value);
  }
  function setStatus(status) {
    badge.textContent = status;
    badge.className = "badge " + status;
    live.dataset.status = status;
  }

  const source = new EventSource(live.dataset.events);
  source.addEventListener("progress", (e) => {
    const data = JSON.parse(e.data);
    if (typeof data.progress === "number") setProgress(data.progress);
    if (data.message) message.textContent = data.message;
  });
  source.addEventListener("step", (e) => {
    const data = JSON.parse(e.data);
    const item = document.querySelector('#live-steps li[data-step="' + data.index + '"] .step-status');
    if (item) {
      item.textContent = data.status;
      item.className = "step-status badge " + data.status;
    }
  });
  source.addEventListener("status", (e) => {
    const data = JSON.parse(e.data);
    if (data.status) setStatus(data.status);
    if (data.status === "succeeded") setProgress(1);
  });
  let finished = false;
  source.addEventListener("done", (e) => {
    // the server ends the stream right after `done`; closing on that end (below) instead of
    // here lets the response finish rather than be aborted
    finished = true;
    const data = JSON.parse(e.data);
    if (data.status) setStatus(data.status);
    if (data.status === "succeeded") setProgress(1);
    note.textContent = "finished: loading the results…";
    setTimeout(() => location.reload(), 1500);
  });
  source.addEventListener("error", () => {
    if (finished) source.close(); // the stream ended after `done`: do not reconnect
    else if (source.readyState === EventSource.CLOSED) note.textContent = "the event stream closed; reload to see the job";
  });
}

document.addEventListener("DOMContentLoaded", () => {
  autosubmit();
  reloadWhilePending();
  pipelineBuilder();
  liveJob();
});
