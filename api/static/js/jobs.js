// Jobs: the new-job form (fields and defaults read from the API's own schema), the live list, one job's page.
import { api, followJob, imageUrl } from "./api.js";
import { follow, project } from "./projects.js";
import { badge, duration, fill, h, jobFraction, legend, lineChart, num, pct, progressBar, short, toast, when } from "./ui.js";

const MAIN_FIELDS = ["base_model", "weights", "epochs", "batch_size", "learning_rate", "image_size"];
const FINAL = ["succeeded", "failed", "cancelled"];

function field(name, schema) {
  const options = schema.enum || (schema.anyOf || []).flatMap((s) => s.enum || (s.const !== undefined ? [s.const] : []));
  const type = schema.type || (schema.anyOf || []).map((s) => s.type).find((t) => t && t !== "null") || "string";
  const initial = schema.default === null || schema.default === undefined ? "" : String(schema.default);
  let input;
  if (type === "boolean") {
    input = h("input", { type: "checkbox", name, checked: schema.default === true });
    return [h("label", { class: "check" }, input, name), input];
  }
  if (schema.enum) {
    input = h("select", { name }, options.map((o) => h("option", { value: o, selected: String(o) === initial }, o)));
  } else {
    input = h("input", { name, value: initial, placeholder: initial === "" ? "unset" : initial,
      inputmode: type === "integer" || type === "number" ? "decimal" : undefined });
  }
  input.dataset.type = type;
  input.dataset.default = initial;
  return [h("label", { class: "field", title: schema.description || "" }, name, input), input];
}

// Only values that differ from the defaults are sent, so the server's defaults stay the source of truth.
function changed(inputs) {
  const out = {};
  for (const input of inputs) {
    if (input.type === "checkbox") {
      if (input.checked !== (input.dataset.default === "true")) out[input.name] = input.checked;
      continue;
    }
    const raw = input.value.trim();
    if (raw === input.dataset.default || (raw === "" && input.dataset.default === "")) continue;
    const numeric = raw !== "" && !Number.isNaN(Number(raw));
    out[input.name] = raw === "" ? null : (input.dataset.type !== "string" && numeric ? Number(raw) : raw);
  }
  return out;
}

async function newJobForm(preselect) {
  const [schema, datasets] = await Promise.all([api("/openapi.json"), api(`/v1/datasets?status=ready&limit=200&${project.query()}`)]);
  const props = schema.components.schemas.Hyperparameters.properties;
  const built = Object.fromEntries(Object.entries(props).map(([name, s]) => [name, field(name, s)]));
  const inputs = Object.values(built).map(([, input]) => input);
  const dataset = h("select", { name: "dataset_id", id: "job-dataset" },
    datasets.data.map((d) => h("option", { value: d.id, selected: d.id === preselect }, `${d.name} (${short(d.id)}, ${d.num_images} images)`)));
  const submit = h("button", { type: "submit", id: "start-job" }, "Start training");
  const form = h("form", { id: "job-form", onsubmit: async (e) => {
    e.preventDefault();
    submit.disabled = true;
    try {
      const job = await api("/v1/jobs", { method: "POST", json: { dataset_id: dataset.value, hyperparameters: changed(inputs) } });
      location.hash = `#/jobs/${job.id}`;
    } catch (error) {
      toast(error.message);
      submit.disabled = false;
    }
  } },
  h("label", { class: "field" }, "dataset", dataset),
  h("div", { class: "fields" }, MAIN_FIELDS.filter((n) => built[n]).map((n) => built[n][0])),
  h("details", {}, h("summary", {}, "More hyperparameters (defaults shown)"),
    h("div", { class: "fields" }, Object.keys(built).filter((n) => !MAIN_FIELDS.includes(n)).map((n) => built[n][0]))),
  datasets.data.length ? submit : h("p", { class: "muted" }, `Upload a dataset to ${project.get()} first.`));
  return h("div", { class: "card" }, h("h2", {}, `New job in ${project.get()}`), form);
}

function jobRow(job) {
  const p = job.progress || {};
  return h("tr", { "data-job": job.id },
    h("td", {}, h("a", { href: `#/jobs/${job.id}` }, short(job.id))), h("td", {}, badge(job.status)),
    h("td", { style: "width:30%" }, progressBar(jobFraction(job))),
    h("td", {}, p.epochs ? `${p.epoch}/${p.epochs}` : "–"),
    h("td", { class: "num" }, job.status === "running" ? duration(p.eta_seconds) : "–"),
    h("td", {}, job.hyperparameters.base_model), h("td", { class: "muted" }, when(job.created_at)),
    h("td", {}, job.model_id ? h("a", { href: `#/models/${job.model_id}` }, "model") : ""));
}

export async function jobsPage(view, { params, every }) {
  const list = h("div", { id: "jobs-list" });
  view.append(h("h1", {}, "Jobs ", h("span", { class: "muted project-name" }, `in ${project.get()}`)),
    await newJobForm(params.get("dataset")), h("div", { class: "card" }, h("h2", {}, `Jobs in ${project.get()}`), list));
  const refresh = async () => {
    const { data } = await api(`/v1/jobs?limit=100&${project.query()}`);
    fill(list, data.length ? h("table", {},
      h("tr", {}, ["job", "status", "progress", "epoch", "ETA", "model", "created", ""].map((t) => h("th", {}, t))),
      data.map(jobRow)) : h("p", { class: "muted" }, `No jobs in ${project.get()} yet.`));
  };
  await refresh();
  every(1500, refresh);
}

export async function jobPage(view, { id, cleanup }) {
  let job = await api(`/v1/jobs/${id}`);
  follow(job.project);
  let history = job.history || [];
  const status = h("span", { id: "job-status" });
  const bar = h("div");
  const detail = h("span", { class: "muted", id: "job-progress" });
  const charts = h("div", { class: "grid", id: "curves" });
  const table = h("div");
  const result = h("div");
  const cancel = h("button", { class: "danger", id: "cancel-job", onclick: async () => {
    cancel.disabled = true;
    try { job = await api(`/v1/jobs/${id}/cancel`, { method: "POST" }); draw(); } catch (error) { toast(error.message); }
  } }, "Cancel");

  const draw = () => {
    const p = job.progress || {};
    fill(status, badge(job.status));
    fill(bar, progressBar(jobFraction(job), { id: "job-bar" }));
    detail.textContent = p.epochs
      ? `epoch ${p.epoch}/${p.epochs} · step ${p.step}/${p.steps} · ${num(p.images_per_second, 1)} img/s` +
        (job.status === "running" ? ` · ETA ${duration(p.eta_seconds)}` : "")
      : job.status === "queued" ? "waiting for a worker" : "";
    cancel.hidden = FINAL.includes(job.status) || job.status === "cancelling";
    const epochs = job.hyperparameters.epochs;
    fill(charts, 
      h("div", {}, h("h2", {}, "Loss"), lineChart(history, "loss", { epochs }), legend()),
      h("div", {}, h("h2", {}, "Accuracy"), lineChart(history, "accuracy", { epochs }), legend()));
    const keys = ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "images_per_second", "seconds"];
    fill(table, history.length ? h("table", { id: "history" }, h("tr", {}, keys.map((k) => h("th", { class: "num" }, k))),
      history.map((e) => h("tr", {}, keys.map((k) => h("td", { class: "num" }, k === "epoch" ? e[k] : num(e[k])))))) : "");
    const test = (job.metrics || {}).test || {};
    fill(result, 
      job.error ? h("div", { class: "error" }, `${job.error} (${job.error_code})`) : "",
      job.model_id ? h("p", {}, `Test accuracy ${pct(test.accuracy)} on ${test.samples ?? 0} images · `,
        h("a", { href: `#/models/${job.model_id}`, id: "job-model" }, `model ${short(job.model_id)} →`)) : "",
      job.model_id && test.warning ? h("p", { class: "muted", id: "test-warning" }, test.warning) : "");
  };
  const summary = h("div", { class: "card" },
    h("div", { class: "row" }, status, h("span", { style: "flex:1" }, bar), cancel), h("p"), detail,
    h("p", { class: "muted" }, `project ${job.project} · dataset `, h("a", { href: `#/datasets/${job.dataset_id}` }, short(job.dataset_id)),
      ` · attempts ${job.attempts} · created ${when(job.created_at)}`),
    h("details", {}, h("summary", {}, "hyperparameters"), h("pre", { class: "mono" }, JSON.stringify(job.hyperparameters, null, 1))),
    result);
  const png = h("div");
  view.append(h("h1", {}, `Job ${short(id)}`), summary, h("div", { class: "card" }, charts, table, png));
  draw();

  const showPng = async () => {
    const url = await imageUrl(`/v1/jobs/${id}/plots/curves.png`);
    fill(png, h("details", {}, h("summary", {}, "curves.png (server-rendered)"), h("img", { class: "plot", src: url, alt: "training curves" })));
  };
  if (FINAL.includes(job.status)) return showPng();
  cleanup(followJob(id, (name, data) => {
    if (name === "snapshot") { job = data; history = data.history || []; }
    else if (name === "progress") job = { ...job, progress: data };
    else if (name === "epoch") history = [...history.filter((e) => e.epoch !== data.epoch), data.metrics];
    else if (name === "state") job = { ...job, ...data };
    else if (name === "end") showPng();
    else if (name === "error") toast(data.detail);
    draw();
  }));
}
