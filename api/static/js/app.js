// The page shell: a hash router, per-page timers and streams stopped on navigation, the API-key dialog and the
// project switcher (pages read the current project from projects.js).
import { apiKey, onKeyNeeded } from "./api.js";
import { datasetPage, datasetsPage } from "./datasets.js";
import { jobPage, jobsPage } from "./jobs.js";
import { modelPage, modelsPage, predictPage } from "./models.js";
import { loadProjects, project, projectsPage } from "./projects.js";
import { fill, h, toast } from "./ui.js";

const routes = [
  [/^\/datasets\/([\w-]+)$/, datasetPage], [/^\/datasets$/, datasetsPage],
  [/^\/jobs\/([\w-]+)$/, jobPage], [/^\/jobs$/, jobsPage],
  [/^\/models\/([\w-]+)$/, modelPage], [/^\/models$/, modelsPage],
  [/^\/predict$/, predictPage], [/^\/projects$/, projectsPage],
];

const dialog = document.getElementById("key-dialog");
const keyInput = document.getElementById("key-input");

// Resolves true when the user saved a key (the caller retries), false when they dismissed the dialog.
function askForKey() {
  return new Promise((resolve) => {
    keyInput.value = apiKey.get();
    dialog.returnValue = "";
    dialog.addEventListener("close", () => {
      const saved = dialog.returnValue === "saved" && keyInput.value.trim() !== "";
      if (saved) apiKey.set(keyInput.value.trim());
      resolve(saved);
    }, { once: true });
    dialog.showModal();
  });
}

// A new key may see other projects: after one is saved, reload the switcher and draw the page again.
const withNewKey = (saved) => { if (saved) setTimeout(reload); return saved; };
let pending = null;
onKeyNeeded(() => (pending ??= askForKey().then(withNewKey).finally(() => (pending = null))));
document.getElementById("key-save").addEventListener("click", (e) => {
  e.preventDefault();
  dialog.close("saved");
});
document.getElementById("key-clear").addEventListener("click", () => {
  apiKey.set("");
  keyInput.value = "";
  dialog.close("cleared");
});
document.getElementById("key-button").addEventListener("click", () => askForKey().then(withNewKey));

// Switching project keeps the section but leaves a detail page (its item belongs to the old project).
const projectSelect = document.getElementById("project-select");
projectSelect.addEventListener("change", () => {
  project.set(projectSelect.value);
  const section = (location.hash.slice(1) || "/datasets").split("?")[0].split("/")[1] || "datasets";
  if (location.hash === `#/${section}`) render();
  else location.hash = `#/${section}`;
});

let stops = [];
let generation = 0;

async function render() {
  for (const stop of stops) stop();
  stops = [];
  const mine = ++generation;
  const [path, query = ""] = (location.hash.slice(1) || "/datasets").split("?");
  const view = document.getElementById("view");
  fill(view);
  for (const a of document.querySelectorAll("[data-nav]")) a.classList.toggle("active", path.startsWith(`/${a.dataset.nav}`));
  const match = routes.map(([re, page]) => [re.exec(path), page]).find(([m]) => m);
  if (!match) {
    view.append(h("h1", {}, "Not found"), h("p", {}, h("a", { href: "#/datasets" }, "Go to datasets")));
    return;
  }
  const [[, id], page] = match;
  // Timers and streams belong to the page that started them; a newer render makes them stop.
  const every = (ms, fn) => {
    const timer = setInterval(() => mine === generation && fn().catch((e) => toast(e.message)), ms);
    stops.push(() => clearInterval(timer));
  };
  const cleanup = (stop) => stops.push(stop);
  try {
    await page(view, { id, params: new URLSearchParams(query), every, cleanup, rerender: reload });
  } catch (error) {
    if (mine !== generation) return;
    view.append(h("div", { class: "error" }, error.message,
      error.status === 401 ? [" ", h("button", { onclick: () => askForKey().then(withNewKey) }, "Enter API key")] : ""));
  }
}

// The switcher first (it settles which project the pages show), then the page.
async function reload() {
  try {
    await loadProjects();
  } catch (error) {
    if (error.status !== 401) toast(error.message);
  }
  return render();
}

// Ask for a key up front when the service needs one, rather than provoking a 401 first.
const config = await fetch("/ui/config.json").then((r) => r.json());
if (config.auth_required && !apiKey.get()) await askForKey();
window.addEventListener("hashchange", render);
reload();
