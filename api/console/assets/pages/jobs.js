// The team's jobs, newest first: status, method, base model, progress, time left and queue position; filtered
// by status, 20 a page, refreshed every few seconds. Ticked jobs open side by side in Compare.

import { ApiError, SignedOut, api } from "../api.js";
import { ago, badge, clear, errorBox, etaText, h, progressCell, queueText } from "../dom.js";

const STATUSES = ["validating", "queued", "running", "pausing", "paused", "cancelling", "succeeded", "failed", "cancelled"];
const PAGE = 20;
const REFRESH_MS = 5000;

export function render(root, params) {
  const status = params.get("status") || "";
  const cursor = params.get("cursor") || "";
  const selected = new Set();
  const filter = h(
    "select",
    { id: "status-filter", "aria-label": "Filter by status" },
    h("option", { value: "" }, "all statuses"),
    STATUSES.map((s) => h("option", { value: s, selected: s === status }, s)),
  );
  filter.addEventListener("change", () => {
    location.hash = filter.value ? `#/jobs?status=${filter.value}` : "#/jobs";
  });
  const compareButton = h("button", { type: "button", id: "compare-selected", disabled: true }, "Compare selected");
  compareButton.addEventListener("click", () => {
    location.hash = `#/compare?ids=${[...selected].join(",")}`;
  });
  const body = h("tbody");
  const pager = h("div", { class: "pager" });
  const message = h("div");
  root.append(
    h(
      "section",
      { class: "card" },
      h(
        "div",
        { class: "toolbar" },
        h("h1", {}, "Jobs"),
        h("span", { class: "spacer" }),
        filter,
        compareButton,
        h("a", { class: "button primary", href: "#/new" }, "New job"),
      ),
      message,
      h(
        "table",
        { class: "jobs", id: "jobs-table" },
        h(
          "thead",
          {},
          h(
            "tr",
            {},
            ["", "Job", "Status", "Method", "Base model", "Progress", "Time left", "Queue", "Created"].map((t) =>
              h("th", {}, t),
            ),
          ),
        ),
        body,
      ),
      pager,
    ),
  );

  function row(job) {
    const box = h("input", { type: "checkbox", "aria-label": `select ${job.id}`, checked: selected.has(job.id) });
    box.addEventListener("change", () => {
      if (box.checked) selected.add(job.id);
      else selected.delete(job.id);
      compareButton.disabled = selected.size < 2;
      compareButton.textContent = `Compare selected (${selected.size})`;
    });
    return h(
      "tr",
      { dataset: { job: job.id, status: job.status } },
      h("td", {}, box),
      h("td", {}, h("a", { href: `#/jobs/${job.id}`, class: "mono" }, job.id)),
      h("td", {}, badge(job.status)),
      h("td", {}, job.method),
      h("td", {}, job.base_model),
      h("td", {}, progressCell(job)),
      h("td", { class: "eta" }, etaText(job)),
      h("td", { class: "queue" }, queueText(job)),
      h("td", { title: job.created_at }, ago(job.created_at)),
    );
  }

  let timer = null;
  let stopped = false;
  async function load() {
    const query = new URLSearchParams({ limit: String(PAGE) });
    if (status) query.set("status", status);
    if (cursor) query.set("cursor", cursor);
    try {
      const page = await api.get(`/v1/jobs?${query}`);
      // The queue position comes with one job's answer: read it for the queued jobs shown.
      const jobs = await Promise.all(
        page.data.map((job) => (job.status === "queued" ? api.get(`/v1/jobs/${job.id}`).catch(() => job) : job)),
      );
      if (stopped) return;
      clear(message);
      clear(body, jobs.length ? jobs.map(row) : h("tr", {}, h("td", { colspan: 9, class: "muted" }, "No jobs.")));
      const links = [];
      if (cursor) links.push(h("a", { href: status ? `#/jobs?status=${status}` : "#/jobs" }, "« Newest"));
      if (page.has_more) {
        const next = new URLSearchParams({ cursor: page.next_cursor });
        if (status) next.set("status", status);
        links.push(h("a", { href: `#/jobs?${next}`, id: "next-page" }, "Older »"));
      }
      clear(pager, links);
    } catch (error) {
      if (error instanceof SignedOut) return;
      clear(message, errorBox(error instanceof ApiError ? error : new Error(String(error))));
    }
    if (!stopped) timer = setTimeout(load, REFRESH_MS);
  }
  load();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}
