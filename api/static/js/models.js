// Models: the registry, one model's test metrics, confusion matrix, mistakes and the promote button; predict.
import { api, imageUrl } from "./api.js";
import { follow, project } from "./projects.js";
import { badge, dropZone, fill, h, hbars, num, pct, short, toast, when } from "./ui.js";

// "Project X serves model Y (pinned | its newest)", with a button back to "newest" when one is pinned.
function servingCard(info, models, rerender) {
  const id = info.serving_model_id;
  const pinned = models.some((m) => m.id === id && m.pinned);
  const unpin = h("button", { class: "ghost", id: "unpin", onclick: async () => {
    try {
      await api(`/v1/projects/${project.path()}/pin`, { method: "DELETE" });
      toast(`project ${info.name} serves its newest model again`);
      rerender();
    } catch (error) { toast(error.message); }
  } }, "Unpin: serve the newest");
  return h("div", { class: "card", id: "project-serving", "data-serving": id || "" }, h("div", { class: "row" },
    id ? h("span", {}, `Project ${info.name} serves `, h("a", { href: `#/models/${id}` }, h("b", { class: "mono" }, short(id))),
      pinned ? " (pinned)" : " (its newest model)", " at ", h("code", {}, `/v1/projects/${info.name}/predict`))
      : h("span", { class: "muted" }, `Project ${info.name} serves no model yet: /v1/projects/${info.name}/predict answers 503.`),
    h("span", { style: "flex:1" }), pinned ? unpin : ""));
}

export async function modelsPage(view, { rerender }) {
  const [{ data }, info] = await Promise.all([api(`/v1/models?limit=100&${project.query()}`), api(`/v1/projects/${project.path()}`)]);
  view.append(h("h1", {}, "Models ", h("span", { class: "muted project-name" }, `in ${project.get()}`)),
    servingCard(info, data, rerender), h("div", { class: "card" }, data.length ? h("table", { id: "models-list" },
    h("tr", {}, ["model", "base", "classes", "test accuracy", "macro F1", "created", ""].map((t) => h("th", {}, t))),
    data.map((m) => {
      const test = (m.metrics || {}).test || {};
      return h("tr", { "data-model": m.id }, h("td", {}, h("a", { href: `#/models/${m.id}` }, short(m.id))),
        h("td", {}, m.base_model), h("td", {}, m.classes.length), h("td", { class: "num" }, pct(test.accuracy)),
        h("td", { class: "num" }, num(test.macro_f1)), h("td", { class: "muted" }, when(m.created_at)),
        h("td", {}, m.serving ? badge("serving") : "", m.pinned ? " pinned" : ""));
    })) : h("p", { class: "muted" }, `No models in ${project.get()} yet: train one from the Jobs page.`)));
}

export async function modelPage(view, { id }) {
  const model = await api(`/v1/models/${id}`);
  follow(model.project);
  const test = (model.metrics || {}).test || {};
  const perClass = Object.entries(test.per_class || {});
  const promote = h("button", { id: "promote", disabled: model.pinned, onclick: async () => {
    try {
      await api(`/v1/models/${id}/promote`, { method: "POST" });
      toast(`model ${short(id)} now serves project ${model.project}`);
      promote.disabled = true;
      promote.textContent = "Pinned";
      fill(state, badge("serving"), " pinned");
    } catch (error) { toast(error.message); }
  } }, model.pinned ? "Pinned" : "Promote to serving");
  const state = h("span", { id: "serving" }, model.serving ? badge("serving") : "", model.pinned ? " pinned" : "");
  const confusion = h("div", { id: "confusion" }, h("p", { class: "muted" }, test.confusion_matrix ? "drawing…" : "No test split, so no confusion matrix."));
  const mistakes = test.misclassified || [];
  const calibration = (model.metrics || {}).calibration || {};
  const threshold = h("input", { id: "min-score", type: "number", min: 0, max: 1, step: 0.01, value: model.min_score, style: "width:6em" });
  const saveThreshold = h("button", { id: "save-min-score", onclick: async () => {
    try {
      const saved = await api(`/v1/models/${id}`, { method: "PATCH", json: { min_score: Number(threshold.value) } });
      threshold.value = saved.min_score;
      toast(`model ${short(id)} abstains under ${saved.min_score}`);
    } catch (error) { toast(error.message); }
  } }, "Save");
  const perClassThresholds = Object.entries(model.class_min_scores || {}).map(([c, v]) => `${c} ${num(v, 2)}`).join(", ");
  view.append(
    h("h1", {}, `Model ${short(id)} `, state),
    h("div", { class: "card" }, h("div", { class: "row" },
      h("span", {}, `project ${model.project} · ${model.base_model} · ${model.classes.length} classes · ${model.image_size}px · job `,
        h("a", { href: `#/jobs/${model.job_id}` }, short(model.job_id)), " · dataset ",
        h("a", { href: `#/datasets/${model.dataset_id}` }, short(model.dataset_id))),
      h("span", { style: "flex:1" }), promote),
    h("p", {}, `Test accuracy `, h("b", { id: "test-accuracy" }, pct(test.accuracy)),
      test.top5_accuracy !== undefined ? ` · top-5 ${pct(test.top5_accuracy)}` : "",
      ` · macro F1 ${num(test.macro_f1)} · ECE ${num(test.ece)} · ${test.samples ?? 0} test images`),
    test.warning ? h("p", { class: "muted", id: "test-warning" }, test.warning) : ""),
    h("div", { class: "card", id: "calibration" }, h("h2", {}, "Calibration and abstain"),
      h("p", {}, "Temperature ", h("b", { id: "temperature" }, num(model.temperature, 2)),
        calibration.ece_before !== undefined
          ? [" · test ECE ", h("b", { id: "ece-before" }, num(calibration.ece_before)), " before → ",
            h("b", { id: "ece-after" }, num(calibration.ece_after)), ` after (fitted on ${calibration.fitted_on} validation images)`]
          : h("span", { class: "muted" }, " · not calibrated (trained before temperature scaling): scores are the raw softmax")),
      h("div", { class: "row" }, h("label", { class: "field" }, "abstain (label null) under score", threshold), saveThreshold,
        perClassThresholds ? h("span", { class: "muted" }, ` per class: ${perClassThresholds}`) : "")),
    h("div", { class: "grid" },
      h("div", { class: "card" }, h("h2", {}, "Per class (test split)"), perClass.length ? h("table", { id: "per-class" },
        h("tr", {}, ["class", "precision", "recall", "F1", "support"].map((t) => h("th", { class: t === "class" ? "" : "num" }, t))),
        perClass.map(([c, s]) => h("tr", {}, h("td", {}, c), h("td", { class: "num" }, num(s.precision)),
          h("td", { class: "num" }, num(s.recall)), h("td", { class: "num" }, num(s.f1)), h("td", { class: "num" }, s.support ?? "–"))))
        : h("p", { class: "muted" }, "–")),
      h("div", { class: "card" }, h("h2", {}, "Confusion matrix"), confusion)),
    h("div", { class: "card" }, h("h2", {}, `Misclassified test images (${mistakes.length})`), mistakes.length
      ? h("div", { class: "thumbs", id: "mistakes" }) : h("p", { class: "muted" },
        test.samples ? "None recorded for this model." : "No test split.")));
  if (test.confusion_matrix) {
    const url = await imageUrl(`/v1/models/${id}/plots/confusion.png`);
    fill(confusion, h("img", { class: "plot", src: url, alt: "confusion matrix heatmap" }));
  }
  const thumbs = view.querySelector("#mistakes");
  for (const m of mistakes.slice(0, 48)) {
    const src = await imageUrl(`/v1/models/${id}/misclassified/${encodeURIComponent(m.image)}`).catch(() => "");
    thumbs.append(h("figure", {}, src ? h("img", { src, alt: m.image }) : "",
      h("figcaption", {}, h("span", { class: "muted" }, "true "), m.true, h("br"), h("span", { class: "muted" }, "pred "), m.pred)));
  }
}

export async function predictPage(view) {
  const { data } = await api(`/v1/models?limit=100&${project.query()}`);
  const serving = data.find((m) => m.serving);
  const model = h("select", { id: "predict-model" }, data.map((m) =>
    h("option", { value: m.id, selected: m === serving }, `${short(m.id)} · ${m.base_model} · ${m.classes.join(", ").slice(0, 60)}${m.serving ? " (serving)" : ""}`)));
  const topK = h("input", { id: "predict-topk", type: "number", min: 1, value: 5, style: "width:5em" });
  const results = h("div", { id: "predictions" });
  const classify = async (files) => {
    const form = new FormData();
    for (const f of files) form.append("file", f);
    form.append("top_k", topK.value || "5");
    form.append("model_id", model.value);
    fill(results, h("p", { class: "muted" }, "classifying…"));
    try {
      const body = await api(`/v1/projects/${project.path()}/predict`, { method: "POST", form });
      fill(results, ...body.predictions.map((p, i) => h("div", { class: "card prediction", "data-label": p.top[0].label },
        h("div", { class: "row" }, h("img", { class: "preview", src: URL.createObjectURL(files[i]), alt: p.filename }),
          h("div", { style: "flex:1" }, h("h2", {}, p.filename, " → ", h("span", { class: "top-label" }, p.label ?? "abstains (under the threshold)")),
            hbars(p.top.map((s) => [s.label, s.score, pct(s.score)]), { max: 1 }))))));
    } catch (error) {
      fill(results, h("div", { class: "error" }, error.message));
    }
  };
  view.append(h("h1", {}, "Predict ", h("span", { class: "muted project-name" }, `in ${project.get()}`)), h("div", { class: "card" },
    data.length ? [h("div", { class: "row" }, h("label", { class: "field" }, "model", model), h("label", { class: "field" }, "top k", topK)), h("p"),
      dropZone({ id: "predict-drop", accept: "image/*", multiple: true, text: "Drop images here, or click to choose", onFiles: classify })]
      : h("p", { class: "muted" }, `No model in ${project.get()} yet: train one first.`)), results);
}
