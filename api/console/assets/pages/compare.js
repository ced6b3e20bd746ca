// Several jobs side by side: their loss curves overlaid (train solid, eval dashed), and their settings and
// results in one table, rows that differ marked.

import { ApiError, SignedOut, api } from "../api.js";
import { COLORS, LossChart, chartControls } from "../chart.js";
import { badge, clear, errorBox, flatten, h, num } from "../dom.js";

const RESULT_KEYS = [
  "steps",
  "first_train_loss",
  "final_train_loss",
  "eval_loss",
  "validation_perplexity_before",
  "validation_perplexity_after",
  "tokens_per_second",
  "train_runtime_seconds",
];

function settingsOf(job) {
  const values = flatten({
    status: job.status,
    method: job.method,
    base_model: job.base_model,
    dataset: job.dataset,
    validation_dataset: job.validation_dataset,
    adapter: job.adapter,
    hyperparameters: job.hyperparameters,
    resources: { gpus: job.resources.gpus, zero_stage: job.resources.zero_stage },
    trainable_params: job.trainable_params,
  });
  for (const key of RESULT_KEYS) {
    if (job.result && job.result[key] !== undefined && job.result[key] !== null) values[`result.${key}`] = job.result[key];
  }
  return values;
}

export function render(root, params) {
  const ids = (params.get("ids") || "").split(",").filter(Boolean);
  let stopped = false;
  let chart = null;
  const picker = h("div", { class: "picker" });
  const body = h("div");
  const controls = chartControls(() => chart && chart.draw());
  root.append(
    h(
      "section",
      { class: "card" },
      h("div", { class: "toolbar" }, h("h1", {}, "Compare jobs"), h("span", { class: "spacer" })),
      h("p", { class: "muted" }, "Tick the jobs to compare: their loss curves are overlaid and their settings set side by side."),
      picker,
    ),
    body,
  );

  (async () => {
    try {
      const recent = await api.get("/v1/jobs?limit=50");
      const chosen = new Set(ids);
      const boxes = recent.data.map((job) => {
        const box = h("input", { type: "checkbox", value: job.id, checked: chosen.has(job.id) });
        return h("label", { class: "check pick" }, box, h("span", { class: "mono" }, job.id), badge(job.status), h("span", { class: "muted" }, `${job.method} · ${job.base_model}`));
      });
      const go = h("button", { type: "button", class: "primary", id: "compare-go" }, "Compare");
      go.addEventListener("click", () => {
        const picked = [...picker.querySelectorAll("input:checked")].map((b) => b.value);
        location.hash = `#/compare?ids=${picked.join(",")}`;
      });
      if (stopped) return;
      clear(picker, h("div", { class: "pick-list" }, boxes), go);
    } catch (error) {
      if (!(error instanceof SignedOut)) clear(picker, errorBox(error));
    }
    if (!ids.length) return;
    const found = await Promise.all(
      ids.map(async (id) => {
        try {
          const [job, metrics] = await Promise.all([api.get(`/v1/jobs/${id}`), api.get(`/v1/jobs/${id}/metrics`)]);
          return { id, job, metrics };
        } catch (error) {
          if (error instanceof ApiError && error.status === 404) return { id, missing: true };
          throw error;
        }
      }),
    ).catch((error) => {
      if (!(error instanceof SignedOut)) clear(body, errorBox(error));
      return null;
    });
    if (!found || stopped) return;
    const jobs = found.filter((f) => !f.missing);
    const missing = found.filter((f) => f.missing).map((f) => f.id);
    const series = [];
    jobs.forEach((f, i) => {
      const color = COLORS[i % COLORS.length];
      series.push({ label: `${f.id} train`, color });
      series.push({ label: `${f.id} eval`, color, dash: true, points: true });
    });
    const chartBox = h("div", { class: "chart", id: "compare-chart" });
    const settings = jobs.map((f) => settingsOf(f.job));
    const keys = [...new Set(settings.flatMap((s) => Object.keys(s)))];
    const table = h(
      "table",
      { class: "grid compare", id: "compare-table" },
      h("thead", {}, h("tr", {}, h("th", {}, "Setting"), jobs.map((f, i) => h("th", { class: `series-${i % COLORS.length}` }, h("a", { href: `#/jobs/${f.id}`, class: "mono" }, f.id))))),
      h(
        "tbody",
        {},
        keys.map((key) => {
          const cells = settings.map((s) => (s[key] === undefined ? "—" : typeof s[key] === "number" ? num(s[key]) : String(s[key])));
          const differs = new Set(cells).size > 1;
          return h("tr", { class: differs ? "differs" : null, dataset: { key } }, h("th", {}, key), cells.map((c) => h("td", { class: "mono" }, c)));
        }),
      ),
    );
    clear(
      body,
      h(
        "section",
        { class: "card" },
        h("h2", {}, "Loss curves"),
        controls.element,
        chartBox,
        h("p", { class: "muted small", id: "compare-caption", dataset: { jobs: String(jobs.length) } }, `${jobs.length} jobs; solid: train, dashed: eval.`),
        missing.length ? h("p", { class: "error" }, `Not found (or another team's): ${missing.join(", ")}`) : null,
      ),
      h("section", { class: "card" }, h("h2", {}, "Settings and results"), h("p", { class: "muted small" }, "Rows that differ are marked."), table),
    );
    chart = new LossChart(chartBox, series, controls.state);
    jobs.forEach((f, i) => {
      chart.replace(2 * i, f.metrics.train);
      chart.replace(2 * i + 1, f.metrics.eval);
    });
    chart.draw();
  })();

  return () => {
    stopped = true;
    if (chart) chart.destroy();
  };
}
