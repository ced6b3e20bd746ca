// The console's router: each page is a module whose render(root, params) draws into <main> and returns a
// function that stops what it started (timers, streams). Pages are addressed by the URL's fragment, so the API
// serves one page and no page's address carries a secret.

import { SignedOut, session } from "./api.js";
import { clear, h, notFound } from "./dom.js";
import * as compare from "./pages/compare.js";
import * as files from "./pages/files.js";
import * as job from "./pages/job.js";
import * as jobs from "./pages/jobs.js";
import * as newJob from "./pages/new_job.js";
import * as signIn from "./pages/sign_in.js";

const ROUTES = [
  [/^#\/signin$/, "signin", signIn],
  [/^#\/jobs$/, "jobs", jobs],
  [/^#\/jobs\/([^/]+)$/, "jobs", job],
  [/^#\/new$/, "new", newJob],
  [/^#\/files$/, "files", files],
  [/^#\/compare$/, "compare", compare],
];

const root = document.getElementById("app");
const signOutButton = document.getElementById("sign-out");
let stop = null;

function route() {
  if (stop) {
    stop();
    stop = null;
  }
  const [path, query = ""] = (location.hash || "#/jobs").split("?");
  const params = new URLSearchParams(query);
  const signedIn = Boolean(session.key());
  signOutButton.hidden = !signedIn;
  if (!signedIn && path !== "#/signin") {
    location.hash = "#/signin";
    return;
  }
  for (const [pattern, name, page] of ROUTES) {
    const match = pattern.exec(path);
    if (!match) continue;
    for (const link of document.querySelectorAll("#nav a[data-page]")) {
      link.classList.toggle("current", link.dataset.page === name);
    }
    document.body.dataset.page = name;
    clear(root);
    try {
      stop = page.render(root, params, ...match.slice(1).map(decodeURIComponent)) || null;
    } catch (error) {
      shown(error);
    }
    return;
  }
  document.body.dataset.page = "not-found";
  notFound(root, `No console page at ${path}.`);
}

function shown(error) {
  if (error instanceof SignedOut) return;
  clear(root, h("section", { class: "card" }, h("h1", {}, "Something went wrong"), h("p", {}, error.message)));
}

window.addEventListener("unhandledrejection", (event) => {
  if (event.reason instanceof SignedOut) event.preventDefault();
});
signOutButton.addEventListener("click", () => {
  session.signOut();
  location.hash = "#/signin";
});
window.addEventListener("hashchange", route);
route();
