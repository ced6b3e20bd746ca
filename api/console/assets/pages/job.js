// One job: its status and progress, live loss curves (train and eval, streamed over the job's server-sent
// events), its evaluation (the base model's and the adapter's answers side by side), events, plan,
// hyperparameters, artifacts and checkpoints with their sha256 and downloads, and cancel.

import { ApiError, SignedOut, api, download, streamEvents } from "../api.js";
import { LossChart, chartControls } from "../chart.js";
import { datasetTable, findings, planFacts } from "../plan.js";
import {
  TERMINAL,
  ago,
  badge,
  bytes,
  clear,
  errorBox,
  etaText,
  flatten,
  h,
  notFound,
  num,
  progressCell,
  queueText,
  when,
} from "../dom.js";

const REFRESH_MS = 5000;
// Events worth re-reading the job for (its status, progress or result changed).
const JOB_EVENTS = new Set(["status", "queued", "running", "succeeded", "failed", "cancelled", "memory", "efficiency"]);

function section(id, title, ...children) {
  return h("section", { class: "card", id }, h("h2", {}, title), ...children);
}

function facts(pairs) {
  return h(
    "dl",
    { class: "facts" },
    pairs.filter(([, value]) => value !== null && value !== undefined && value !== "").map(([term, value]) => [
      h("dt", {}, term),
      h("dd", {}, value),
    ]),
  );
}

function keyValueTable(values, id) {
  const rows = Object.entries(values);
  if (!rows.length) return h("p", { class: "muted" }, "None.");
  return h(
    "table",
    { class: "kv", id },
    h("tbody", {}, rows.map(([k, v]) => h("tr", {}, h("th", {}, k), h("td", { class: "mono" }, String(v))))),
  );
}

function planView(plan) {
  if (!plan) return h("p", { class: "muted" }, "No plan yet: the job is being validated.");
  const memory = plan.memory;
  return [
    planFacts(plan),
    datasetTable(plan),
    memory && memory.components_gib
      ? [
          h("h3", {}, "Memory estimate per GPU (GiB)"),
          keyValueTable(Object.fromEntries(Object.entries(memory.components_gib).map(([k, v]) => [k, num(v, 3)])), "memory-components"),
        ]
      : null,
    findings(plan),
    h("details", {}, h("summary", {}, "The whole plan (JSON)"), h("pre", {}, JSON.stringify(plan, null, 2))),
  ];
}

export function render(root, params, jobId) {
  const abort = new AbortController();
  let job = null;
  let timer = null;
  let stopped = false;

  const header = h("div", { class: "card job-header" });
  const overview = h("div");
  const controls = chartControls(() => chart.draw());
  const chartBox = h("div", { class: "chart", id: "loss-chart" });
  const caption = h("p", { class: "muted chart-caption", id: "chart-caption", dataset: { trainPoints: "0", evalPoints: "0" } });
  const evaluation = h("div", { id: "evaluation-body" }, h("p", { class: "muted" }, "Shown when training has ended."));
  const eventsBody = h("tbody");
  const planBox = h("div");
  const hyper = h("div");
  const artifacts = h("div", { id: "artifacts-body" });
  const checkpoints = h("div", { id: "checkpoints-body" });
  const downloadNote = h("p", { class: "muted", id: "download-note", role: "status" });

  const chart = new LossChart(
    chartBox,
    [
      { label: "train", color: "#2563eb" },
      { label: "eval", color: "#dc2626", dash: true, points: true },
    ],
    controls.state,
  );

  const page = h(
    "div",
    { class: "job-page" },
    header,
    h(
      "nav",
      { class: "tabs" },
      [
        ["overview", "Overview"],
        ["curves", "Loss curves"],
        ["evaluation", "Evaluation"],
        ["events", "Events"],
        ["plan", "Plan"],
        ["hyperparameters", "Hyperparameters"],
        ["artifacts", "Artifacts"],
      ].map(([id, label]) =>
        h("a", { href: `#/jobs/${jobId}`, onclick: (e) => (e.preventDefault(), document.getElementById(id).scrollIntoView()) }, label),
      ),
    ),
    section("overview", "Overview", overview),
    section("curves", "Loss curves", controls.element, chartBox, caption),
    section("evaluation", "Evaluation", evaluation),
    section(
      "events",
      "Events",
      h("div", { class: "scroll" }, h("table", { class: "grid", id: "events-table" }, h("thead", {}, h("tr", {}, ["Time", "Type", "Message"].map((t) => h("th", {}, t)))), eventsBody)),
    ),
    section("plan", "Plan", planBox),
    section("hyperparameters", "Hyperparameters", hyper),
    section("artifacts", "Artifacts and checkpoints", downloadNote, artifacts, h("h3", {}, "Checkpoints"), checkpoints),
  );

  function drawCaption() {
    const train = chart.count(0);
    const evalPoints = chart.count(1);
    caption.dataset.trainPoints = String(train);
    caption.dataset.evalPoints = String(evalPoints);
    const last = [...chart.points[0].entries()].sort((a, b) => a[0] - b[0]).pop();
    caption.textContent = train
      ? `${train} training points${evalPoints ? `, ${evalPoints} eval points` : ""}; latest step ${last[0]}, loss ${num(last[1])}`
      : "No training step logged yet.";
  }

  function drawHeader() {
    const cancel = h("button", { type: "button", id: "cancel-job", class: "danger" }, "Cancel job");
    cancel.addEventListener("click", async () => {
      if (!confirm(`Cancel ${jobId}?`)) return;
      cancel.disabled = true;
      try {
        job = (await api.post(`/v1/jobs/${jobId}/cancel`)).body;
        drawJob();
      } catch (error) {
        if (!(error instanceof SignedOut)) header.append(errorBox(error));
      }
    });
    clear(
      header,
      h(
        "div",
        { class: "toolbar" },
        h("h1", { class: "mono" }, job.id),
        badge(job.status),
        h("span", { class: "muted" }, `${job.method} on ${job.base_model}`),
        h("span", { class: "spacer" }),
        h("a", { class: "button", href: `#/compare?ids=${job.id}` }, "Compare…"),
        TERMINAL.has(job.status) || job.status === "cancelling" ? null : cancel,
      ),
    );
  }

  function drawOverview() {
    const r = job.result || {};
    clear(
      overview,
      facts([
        ["Status", badge(job.status)],
        ["Progress", progressCell(job)],
        ["Time left", etaText(job)],
        ["Queue", queueText(job)],
        ["Runs on", job.placement ? `${job.placement.host} · GPUs ${job.placement.gpu_indices.join(",") || "none (CPU)"} · ${job.placement.launcher}` : null],
        ["Attempt", job.attempt || null],
        ["Created", `${when(job.created_at)} (${ago(job.created_at)})`],
        ["Started", job.started_at ? when(job.started_at) : null],
        ["Finished", job.finished_at ? when(job.finished_at) : null],
        ["Error", job.error ? `${job.error.code}: ${job.error.message}` : null],
        ["Dataset", job.dataset],
        ["Validation dataset", job.validation_dataset],
        ["Trainable parameters", job.trainable_params ? `${num(job.trainable_params)} of ${num(job.total_params)}` : null],
        ["Training loss", r.first_train_loss !== undefined ? `${num(r.first_train_loss)} → ${num(r.final_train_loss)}` : null],
        ["Eval loss", r.eval_loss !== undefined && r.eval_loss !== null ? num(r.eval_loss) : null],
        [
          "Validation perplexity",
          r.validation_perplexity_before !== undefined ? `${num(r.validation_perplexity_before)} → ${num(r.validation_perplexity_after)}` : null,
        ],
        ["Tokens per second", r.tokens_per_second ? num(r.tokens_per_second) : null],
        ["Trackers", job.integrations && job.integrations.length ? job.integrations.map((i) => i.type).join(", ") : null],
      ]),
    );
  }

  function drawHyperparameters() {
    const values = flatten({
      method: job.method,
      base_model: job.base_model,
      adapter: job.adapter,
      quantization: job.quantization,
      hyperparameters: job.hyperparameters,
      resources: job.resources,
      integrations: job.integrations && job.integrations.length ? job.integrations : null,
      eval_prompts: job.eval_prompts,
      eval_samples: job.eval_samples,
      eval_max_new_tokens: job.eval_max_new_tokens,
    });
    clear(hyper, keyValueTable(values, "hyperparameters-table"));
  }

  function drawJob() {
    drawHeader();
    drawOverview();
    drawHyperparameters();
    clear(planBox, planView(job.plan));
  }

  function addEvent(event) {
    eventsBody.append(
      h(
        "tr",
        { class: `level-${event.level}`, dataset: { type: event.type } },
        h("td", { class: "nowrap", title: event.created_at }, new Date(event.created_at).toLocaleTimeString()),
        h("td", {}, event.type),
        h("td", {}, event.message),
      ),
    );
  }

  async function loadArtifacts() {
    const [list, saved] = await Promise.all([
      api.get(`/v1/jobs/${jobId}/artifacts`),
      api.get(`/v1/jobs/${jobId}/checkpoints`),
    ]);
    const archives = Object.entries(list.archive_urls || {}).map(([kind, url]) =>
      h(
        "button",
        {
          type: "button",
          class: "download",
          dataset: { download: `${kind}.tar` },
          onclick: () => fetchFile(url, `${jobId}-${kind}.tar`, null),
        },
        `Download ${kind}.tar`,
      ),
    );
    clear(
      artifacts,
      list.data.length
        ? [
            h("div", { class: "toolbar" }, archives),
            h(
              "table",
              { class: "grid", id: "artifacts-table" },
              h("thead", {}, h("tr", {}, ["Kind", "File", "Size", "sha256", ""].map((t) => h("th", {}, t)))),
              h(
                "tbody",
                {},
                list.data.map((a) =>
                  h(
                    "tr",
                    { dataset: { kind: a.kind, name: a.name } },
                    h("td", {}, a.kind),
                    h("td", { class: "mono" }, a.name),
                    h("td", { class: "nowrap" }, bytes(a.size_bytes)),
                    h("td", { class: "mono sha", title: a.sha256 }, a.sha256),
                    h(
                      "td",
                      {},
                      h(
                        "button",
                        { type: "button", class: "link", onclick: () => fetchFile(a.download_url, a.name.split("/").pop(), a.sha256) },
                        "Download",
                      ),
                    ),
                  ),
                ),
              ),
            ),
          ]
        : h("p", { class: "muted" }, "No artifacts yet: they are stored when the job succeeds."),
    );
    clear(
      checkpoints,
      saved.data.length
        ? h(
            "table",
            { class: "grid" },
            h("thead", {}, h("tr", {}, ["Step", "Attempt", "Files", "Size", "Saved", ""].map((t) => h("th", {}, t)))),
            h(
              "tbody",
              {},
              saved.data.map((c) =>
                h(
                  "tr",
                  {},
                  h("td", {}, c.step),
                  h("td", {}, c.attempt),
                  h("td", {}, c.num_files),
                  h("td", {}, bytes(c.size_bytes)),
                  h("td", {}, ago(c.created_at)),
                  h("td", {}, h("button", { type: "button", class: "link", onclick: () => fetchFile(c.download_url, `${jobId}-step-${c.step}.tar`, null) }, "Download")),
                ),
              ),
            ),
          )
        : h("p", { class: "muted" }, "No checkpoints kept."),
    );
  }

  async function fetchFile(url, name, sha256) {
    downloadNote.textContent = `Downloading ${name}…`;
    try {
      const { size, verified } = await download(url, name, sha256);
      downloadNote.textContent =
        `Downloaded ${name} (${bytes(size)})` +
        (verified === true ? ": sha256 verified in the browser." : verified === false ? ": sha256 MISMATCH, do not use it." : ".");
      downloadNote.dataset.verified = String(verified);
    } catch (error) {
      if (!(error instanceof SignedOut)) downloadNote.textContent = `Could not download ${name}: ${error.message}`;
    }
  }

  async function loadEvaluation() {
    try {
      const result = await api.get(`/v1/jobs/${jobId}/evaluation`);
      const ppl = result.perplexity;
      clear(
        evaluation,
        ppl
          ? h(
              "p",
              { id: "perplexity" },
              `Validation perplexity on ${ppl.samples} samples: `,
              h("strong", {}, num(ppl.before)),
              " with the base model, ",
              h("strong", {}, num(ppl.after)),
              " with the adapter.",
            )
          : null,
        result.note ? h("p", { class: "muted" }, result.note) : null,
        result.samples.length
          ? h(
              "table",
              { class: "grid side-by-side", id: "evaluation-table" },
              h("thead", {}, h("tr", {}, ["Prompt", "Base model", "With the adapter"].map((t) => h("th", {}, t)))),
              h(
                "tbody",
                {},
                result.samples.map((s) =>
                  h(
                    "tr",
                    {},
                    h("td", {}, h("div", {}, s.prompt), s.reference ? h("div", { class: "muted small" }, `expected: ${s.reference}`) : null),
                    h("td", { class: "answer base" }, s.base),
                    h("td", { class: "answer adapter" }, s.adapter),
                  ),
                ),
              ),
            )
          : h("p", { class: "muted" }, "No prompts were evaluated."),
        h("p", { class: "muted small" }, `Greedy answers of at most ${result.max_new_tokens} tokens.`),
      );
    } catch (error) {
      if (error instanceof ApiError && error.status === 404) {
        clear(evaluation, h("p", { class: "muted" }, TERMINAL.has(job.status) ? "This job has no evaluation (no eval_prompts, no validation dataset, or it did not train)." : "Shown when training has ended."));
      } else if (!(error instanceof SignedOut)) {
        clear(evaluation, errorBox(error));
      }
    }
  }

  async function refreshJob() {
    try {
      job = await api.get(`/v1/jobs/${jobId}`);
      if (!stopped) drawJob();
    } catch (error) {
      if (!(error instanceof SignedOut) && !stopped) header.append(errorBox(error));
    }
  }

  function poll() {
    timer = setTimeout(async () => {
      if (stopped) return;
      await refreshJob();
      if (job && !TERMINAL.has(job.status)) poll();
    }, REFRESH_MS);
  }

  async function follow() {
    // Every point so far, then each new one; every event so far, then each new one; `end` when the job ends.
    for (let tries = 0; !stopped && tries < 50; tries += 1) {
      clear(eventsBody);
      chart.replace(0, []);
      chart.replace(1, []);
      try {
        await streamEvents(
          `/v1/jobs/${jobId}/events/stream?metrics=true`,
          (type, data) => {
            if (type === "metric") {
              chart.add(data.split === "eval" ? 1 : 0, data.step, data.loss);
              drawCaption();
            } else if (type === "metrics") {
              // a logged step's losses as an event (OpenAI's metrics events): the curves show them already
            } else if (type === "end") {
              refreshJob().then(() => Promise.all([loadArtifacts(), loadEvaluation()]));
            } else {
              addEvent(data);
              if (JOB_EVENTS.has(type)) refreshJob();
            }
          },
          abort.signal,
        );
        return;
      } catch (error) {
        if (stopped || error instanceof SignedOut || error.name === "AbortError") return;
        await new Promise((resolve) => setTimeout(resolve, 3000));
      }
    }
  }

  (async () => {
    try {
      job = await api.get(`/v1/jobs/${jobId}`);
    } catch (error) {
      if (error instanceof ApiError && error.status === 404) {
        notFound(root, `Job ${jobId} does not exist, or it belongs to another team.`);
      } else if (!(error instanceof SignedOut)) {
        clear(root, errorBox(error));
      }
      return;
    }
    if (stopped) return;
    root.append(page);
    drawJob();
    drawCaption();
    chart.draw();
    await Promise.all([loadArtifacts(), loadEvaluation()]).catch(() => {});
    if (!TERMINAL.has(job.status)) poll();
    follow();
  })();

  return () => {
    stopped = true;
    abort.abort();
    clearTimeout(timer);
    chart.destroy();
  };
}
