// Projects: the switcher in the header (the choice is remembered in this browser) and the projects page.
// Every list, upload and prediction of the other pages is scoped to project.get().
import { api } from "./api.js";
import { badge, bytes, fill, h, progressBar, short, toast, when } from "./ui.js";

const KEY = "tuneserve.project";
export const DEFAULT = "default";
const select = () => document.getElementById("project-select");

export const project = {
  get: () => localStorage.getItem(KEY) || DEFAULT,
  set: (name) => localStorage.setItem(KEY, name),
  // "project=<name>" for list URLs.
  query: () => `project=${encodeURIComponent(localStorage.getItem(KEY) || DEFAULT)}`,
  path: () => encodeURIComponent(localStorage.getItem(KEY) || DEFAULT),
};

// Fills the switcher with the projects this key may see. The remembered project stays if it is still visible,
// else 'default', else the first visible one (a member key without 'default' lands on its own project).
export async function loadProjects() {
  const { data } = await api("/v1/projects?limit=500");
  const names = data.map((p) => p.name);
  let current = project.get();
  if (!names.includes(current)) current = names.includes(DEFAULT) ? DEFAULT : (names[0] ?? DEFAULT);
  project.set(current);
  const node = select();
  fill(node, names.map((n) => h("option", { value: n }, n)));
  node.value = current;
  node.hidden = false;
  return data;
}

// A detail page of another project's item (e.g. an admin following a link) moves the switcher along.
export function follow(name) {
  if (!name || name === project.get()) return;
  project.set(name);
  const node = select();
  if (![...node.options].some((o) => o.value === name)) node.append(h("option", { value: name }, name));
  node.value = name;
}

function usageCell(p) {
  const used = p.usage.bytes;
  if (!p.quota_mb) return h("td", { class: "num" }, bytes(used));
  const quota = p.quota_mb * 2 ** 20;
  return h("td", { class: "num" }, h("div", { class: "row quota" }, progressBar(used / quota, { class: used >= quota ? "bar full" : "bar" }),
    h("span", {}, `${bytes(used)} of ${bytes(quota)}`)));
}

export async function projectsPage(view, { every, rerender }) {
  const list = h("div", { id: "projects-list" });
  const name = h("input", { id: "project-name", placeholder: "name, e.g. team-a", pattern: "[a-z0-9][a-z0-9-]{0,62}", required: true });
  const quota = h("input", { id: "project-quota", type: "number", min: 1, placeholder: "quota MiB (optional)", style: "width:12em" });
  const description = h("input", { id: "project-description", placeholder: "description (optional)" });
  const create = h("form", { id: "project-form", class: "row", onsubmit: async (e) => {
    e.preventDefault();
    try {
      const body = { name: name.value.trim(), description: description.value.trim() };
      if (quota.value) body.quota_mb = Number(quota.value);
      const created = await api("/v1/projects", { method: "POST", json: body });
      project.set(created.name);
      toast(`project ${created.name} created; now working in it`);
      rerender();
    } catch (error) { toast(error.message); }
  } }, name, quota, description, h("button", { type: "submit" }, "Create project"));
  view.append(h("h1", {}, "Projects"),
    h("div", { class: "card" }, h("h2", {}, "Projects this key can see"), list),
    h("div", { class: "card" }, h("h2", {}, "New project"),
      h("p", { class: "muted" }, "Admins only. Members see just their projects; anything else answers 404."), create));
  const refresh = async () => {
    const { data } = await api("/v1/projects?limit=500");
    const current = project.get();
    fill(list, h("table", {},
      h("tr", {}, ["project", "datasets", "jobs", "models", "disk used", "serving", "created", ""].map((t) => h("th", { class: ["datasets", "jobs", "models", "disk used"].includes(t) ? "num" : "" }, t))),
      data.map((p) => h("tr", { "data-project": p.name, class: p.name === current ? "current" : "" },
        h("td", {}, h("b", {}, p.name), p.description ? h("div", { class: "muted" }, p.description) : ""),
        h("td", { class: "num" }, p.usage.datasets), h("td", { class: "num" }, p.usage.jobs), h("td", { class: "num" }, p.usage.models),
        usageCell(p),
        h("td", {}, p.serving_model_id ? h("a", { href: `#/models/${p.serving_model_id}` }, short(p.serving_model_id)) : h("span", { class: "muted" }, "no model")),
        h("td", { class: "muted" }, when(p.created_at)),
        h("td", {}, p.name === current ? badge("current") : h("button", { class: "ghost small", "data-use": p.name, onclick: () => {
          project.set(p.name);
          rerender();
        } }, "Work here"))))));
  };
  await refresh();
  every(5000, refresh);
}
