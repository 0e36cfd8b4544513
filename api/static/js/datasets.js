// Datasets: upload by drag-and-drop with a progress bar, the list, and one dataset's report.
import { api, upload } from "./api.js";
import { follow, project } from "./projects.js";
import { badge, dropZone, fill, h, hbars, progressBar, short, toast, when } from "./ui.js";

export async function datasetsPage(view, { every }) {
  const bar = h("div", { id: "upload-progress", hidden: true }, progressBar(0), h("span", { class: "muted" }));
  const name = h("input", { id: "dataset-name", placeholder: "name (optional)" });
  const list = h("div", { id: "datasets-list" });
  const send = async ([file]) => {
    const form = new FormData();
    form.append("file", file);
    if (name.value.trim()) form.append("name", name.value.trim());
    bar.hidden = false;
    const label = bar.querySelector("span.muted");
    try {
      // The project in the URL, not the form: a quota can refuse the upload before its body is sent.
      const dataset = await upload(`/v1/datasets?${project.query()}`, form, (f) => {
        bar.replaceChild(progressBar(f), bar.firstChild);
        label.textContent = `uploading ${file.name}: ${Math.round(100 * f)}%`;
      });
      label.textContent = `uploaded ${file.name}`;
      location.hash = `#/datasets/${dataset.id}`;
    } catch (error) {
      label.textContent = "";
      toast(error.message);
    }
  };
  view.append(h("h1", {}, "Datasets ", h("span", { class: "muted project-name" }, `in ${project.get()}`)),
    h("div", { class: "card" },
      h("h2", {}, `Upload to ${project.get()}`),
      h("p", { class: "muted" }, "A .zip or .tar.gz of class sub-folders (cat/…, dog/…), optionally with train/val/test on top."),
      h("div", { class: "row" }, name),
      h("p"), dropZone({ id: "dataset-drop", accept: ".zip,.tar.gz,.tgz,application/zip,application/gzip",
        text: "Drop an archive here, or click to choose one", onFiles: send }),
      h("p"), bar),
    h("div", { class: "card" }, h("h2", {}, `Datasets in ${project.get()}`), list));

  const refresh = async () => {
    const { data } = await api(`/v1/datasets?limit=100&${project.query()}`);
    fill(list, data.length ? h("table", {},
      h("tr", {}, ["name", "status", "classes", "images", "created", ""].map((t) => h("th", {}, t))),
      data.map((d) => h("tr", { "data-dataset": d.id },
        h("td", {}, h("a", { href: `#/datasets/${d.id}` }, d.name)), h("td", {}, badge(d.status)),
        h("td", {}, (d.classes || []).length || "–"), h("td", { class: "num" }, d.num_images),
        h("td", { class: "muted" }, when(d.created_at)),
        h("td", {}, d.status === "ready" ? h("a", { href: `#/jobs?dataset=${d.id}` }, "train") : ""))))
      : h("p", { class: "muted" }, `No datasets in ${project.get()} yet.`));
  };
  await refresh();
  every(3000, refresh);
}

export async function datasetPage(view, { id, every }) {
  const body = h("div");
  view.append(body);
  const render = (d) => {
    const report = d.report || {};
    const counts = Object.entries(d.class_counts || {});
    const warnings = [];
    if ((report.leakage || []).length) warnings.push(`${report.leakage.length} group(s) of identical images straddle splits (leakage)`);
    if ((report.duplicates || []).length) warnings.push(`${report.duplicates.length} group(s) of exact duplicate images`);
    if ((report.conflicting_labels || []).length) warnings.push(`${report.conflicting_labels.length} duplicate group(s) carry different labels`);
    if (report.imbalance_ratio >= 3) warnings.push(`classes are imbalanced: the largest is ${report.imbalance_ratio}× the smallest`);
    const progress = d.progress || {};
    fill(body, 
      h("h1", {}, `Dataset ${d.name} `, badge(d.status)),
      h("p", { class: "muted mono" }, d.id),
      d.status === "processing" && progress.total
        ? h("div", { class: "card" }, `ingesting ${progress.processed}/${progress.total}`, progressBar(progress.processed / progress.total)) : null,
      d.error ? h("div", { class: "error" }, `${d.error} (${d.error_code})`) : null,
      warnings.map((w) => h("div", { class: "warning" }, w)),
      h("div", { class: "grid" },
        h("div", { class: "card" }, h("h2", {}, `Images per class (${d.num_images})`),
          counts.length ? hbars(counts.map(([c, n]) => [c, n])) : h("p", { class: "muted" }, "–")),
        h("div", { class: "card" }, h("h2", {}, "Summary"),
          h("table", {},
            h("tr", {}, h("th", {}, "project"), h("td", {}, d.project)),
            h("tr", {}, h("th", {}, "file"), h("td", {}, d.filename)),
            h("tr", {}, h("th", {}, "size"), h("td", {}, `${(d.size_bytes / 2 ** 20).toFixed(2)} MiB`)),
            h("tr", {}, h("th", {}, "classes"), h("td", {}, (d.classes || []).join(", ") || "–")),
            h("tr", {}, h("th", {}, "preset splits"), h("td", {}, d.splits ? Object.keys(d.splits).join(", ") : "none")),
            h("tr", {}, h("th", {}, "created"), h("td", {}, when(d.created_at)))),
          d.status === "ready" ? h("p", {}, h("a", { href: `#/jobs?dataset=${d.id}`, id: "train-this" }, "Train a model on this dataset →")) : null)),
      h("div", { class: "card" }, h("h2", {}, `Rejected files (${d.rejected.length})`),
        d.rejected.length ? h("table", { id: "rejected" }, h("tr", {}, h("th", {}, "path"), h("th", {}, "reason")),
          d.rejected.slice(0, 500).map((r) => h("tr", {}, h("td", { class: "mono" }, r.path), h("td", {}, r.reason))))
          : h("p", { class: "muted" }, "None.")),
      (report.duplicates || []).length ? h("div", { class: "card" }, h("h2", {}, "Duplicates"),
        h("ul", {}, report.duplicates.slice(0, 50).map((g) => h("li", { class: "mono" }, g.join("  ≡  "))))) : null);
    return d;
  };
  let dataset = render(await api(`/v1/datasets/${id}`));
  follow(dataset.project);
  every(1000, async () => {
    if (dataset.status === "processing") dataset = render(await api(`/v1/datasets/${id}`));
  });
  return short(id);
}
