// A job's plan as both the job page and the new-job form show it: memory per GPU, parameters, the dataset
// report (samples, tokens, truncation), refusals and notes.

import { h, num } from "./dom.js";

export function planFacts(plan) {
  const memory = plan.memory;
  const params = plan.params;
  const rows = [
    ["Memory per GPU", memory ? `${num(memory.total_gib, 3)} GiB estimated peak` : null, "plan-memory"],
    [
      "Parameters",
      params ? `${num(params.trainable)} trainable of ${num(params.total)} (${num(params.trainable_percent, 3)}%)` : null,
      "plan-params",
    ],
    ["Effective batch size", plan.effective_batch_size ? num(plan.effective_batch_size) : null, null],
    ["Topology", plan.topology ? `${plan.topology.world_size} GPU(s), ${plan.topology.launcher}` : null, null],
  ];
  return h(
    "dl",
    { class: "facts" },
    rows.filter(([, value]) => value).map(([term, value, id]) => [h("dt", {}, term), h("dd", { id }, value)]),
  );
}

export function datasetTable(plan) {
  const datasets = Object.entries(plan.datasets || {});
  if (!datasets.length) return null;
  const headings = ["Dataset", "Format", "Samples", "Tokens", "Mean", "Longest", "Truncated", "Trained tokens"];
  return h(
    "table",
    { class: "grid", id: "dataset-report" },
    h("thead", {}, h("tr", {}, headings.map((t) => h("th", {}, t)))),
    h(
      "tbody",
      {},
      datasets.map(([name, d]) => {
        const tokens = d.tokens || {};
        return h(
          "tr",
          { dataset: { dataset: name } },
          h("td", {}, name),
          h("td", {}, d.format ?? "—"),
          h("td", {}, num(d.samples)),
          h("td", {}, num(tokens.total)),
          h("td", {}, num(tokens.mean, 3)),
          h("td", {}, num(tokens.max)),
          h("td", {}, `${num(d.truncated_samples)} at ${num(d.max_seq_length)}`),
          h("td", {}, num(d.trained_tokens)),
        );
      }),
    ),
  );
}

export function findings(plan) {
  const parts = [];
  for (const [title, list, id] of [
    ["Refusals", plan.refusals, "plan-refusals"],
    ["Notes", plan.notes, "plan-notes"],
  ]) {
    if (list && list.length) {
      parts.push(h("h3", {}, title));
      parts.push(h("ul", { class: title.toLowerCase(), id }, list.map((n) => h("li", {}, n.param ? `${n.param}: ` : "", n.message))));
    }
  }
  return parts;
}
