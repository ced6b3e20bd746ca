// A new training job: the form, then its plan (memory per GPU, parameters, the dataset report, refusals) made
// by a worker from the real datasets and model, and only then the submission.

import { ApiError, SignedOut, api } from "../api.js";
import { clear, errorBox, h, num } from "../dom.js";
import { datasetTable, findings, planFacts } from "../plan.js";

const PLAN_POLL_MS = 1000;

function field(label, control, hint) {
  return h("div", { class: "field" }, h("label", { for: control.id }, label), control, hint ? h("small", { class: "muted" }, hint) : null);
}

function input(id, attrs = {}) {
  return h("input", { id, name: id, ...attrs });
}

function select(id, options, value) {
  return h(
    "select",
    { id, name: id },
    options.map(([v, label]) => h("option", { value: v, selected: v === value }, label)),
  );
}

export function render(root, params) {
  let stopped = false;
  const planBox = h("div", { id: "plan-result" });
  const message = h("div", { id: "submit-result" });
  const form = h("form", { id: "new-job", class: "grid-form" });
  const submit = h("button", { type: "button", id: "submit-job", class: "primary", disabled: true }, "Submit job");
  const check = h("button", { type: "submit", id: "check-plan" }, "Check the plan");
  let planned = null; // the spec the shown plan is for

  const controls = {
    base_model: select("base_model", [["", "loading…"]]),
    dataset: select("dataset", [["", "loading…"]]),
    validation_dataset: select("validation_dataset", [["", "none"]]),
    method: select("method", [["lora", "LoRA"], ["dora", "DoRA"], ["rslora", "rsLoRA"], ["qlora", "QLoRA (4-bit base)"]], "lora"),
    rank: input("rank", { type: "number", min: 1, max: 1024, value: 16 }),
    alpha: input("alpha", { type: "number", min: 1, step: "any", placeholder: "2 × rank" }),
    target_modules: select("target_modules", [["all-linear", "all linear layers"], ["attention", "attention projections"]], "all-linear"),
    length: select("length", [["epochs", "epochs"], ["max_steps", "steps"]], "epochs"),
    length_value: input("length_value", { type: "number", min: 1, value: 3 }),
    learning_rate: input("learning_rate", { type: "number", min: 0, step: "any", value: 0.0002 }),
    batch_size: input("batch_size", { type: "number", min: 1, value: 4 }),
    max_seq_length: input("max_seq_length", { type: "number", min: 16, placeholder: "the model's, at most 1024" }),
    eval_prompts: h("textarea", { id: "eval_prompts", name: "eval_prompts", rows: 3, placeholder: "one prompt a line" }),
    mlflow: input("mlflow", { type: "text", placeholder: "experiment name (optional)" }),
    wandb: input("wandb", { type: "text", placeholder: "W&B project (optional)" }),
  };
  form.append(
    h("fieldset", {}, h("legend", {}, "Data and model"), field("Base model", controls.base_model), field("Training dataset", controls.dataset), field("Validation dataset", controls.validation_dataset)),
    h(
      "fieldset",
      {},
      h("legend", {}, "Adapter"),
      field("Method", controls.method),
      field("Rank", controls.rank),
      field("Alpha", controls.alpha),
      field("Layers", controls.target_modules),
    ),
    h(
      "fieldset",
      {},
      h("legend", {}, "Training"),
      field("Length in", controls.length),
      field("How many", controls.length_value),
      field("Learning rate", controls.learning_rate),
      field("Batch size", controls.batch_size),
      field("Max sequence length", controls.max_seq_length),
    ),
    h(
      "fieldset",
      {},
      h("legend", {}, "Evaluation and trackers"),
      field("Evaluation prompts", controls.eval_prompts, "answered by the base model and by the adapter when training ends"),
      field("MLflow experiment", controls.mlflow),
      field("W&B project", controls.wandb),
    ),
    h("div", { class: "toolbar" }, check, submit),
  );

  function spec() {
    const c = controls;
    const value = (control) => control.value.trim();
    const number = (control) => (value(control) === "" ? undefined : Number(value(control)));
    const prompts = c.eval_prompts.value.split("\n").map((p) => p.trim()).filter(Boolean);
    const integrations = [];
    if (value(c.mlflow)) integrations.push({ type: "mlflow", mlflow: { experiment: value(c.mlflow) } });
    if (value(c.wandb)) integrations.push({ type: "wandb", wandb: { project: value(c.wandb) } });
    const body = {
      base_model: value(c.base_model),
      dataset: value(c.dataset),
      method: c.method.value,
      adapter: { rank: number(c.rank), alpha: number(c.alpha), target_modules: c.target_modules.value },
      hyperparameters: {
        [c.length.value]: number(c.length_value),
        learning_rate: number(c.learning_rate),
        batch_size: number(c.batch_size),
        max_seq_length: number(c.max_seq_length),
      },
      metadata: { source: "console" },
    };
    if (value(c.validation_dataset)) body.validation_dataset = value(c.validation_dataset);
    if (prompts.length) body.eval_prompts = prompts;
    if (integrations.length) body.integrations = integrations;
    return JSON.parse(JSON.stringify(body)); // drops the fields left empty
  }

  function markField(param) {
    for (const control of form.querySelectorAll(".invalid")) control.classList.remove("invalid");
    if (!param) return;
    const leaf = param.split(".").pop();
    const control = controls[leaf] || (param.startsWith("integrations") ? controls.mlflow : null);
    if (control) control.classList.add("invalid");
  }

  function showPlan(plan) {
    const result = plan.result || {};
    clear(
      planBox,
      h(
        "div",
        { class: `plan plan-${plan.status}`, dataset: { status: plan.status } },
        h("h2", {}, plan.status === "ready" ? "The plan: ready to submit" : `The plan: ${plan.status}`),
        planFacts(result),
        datasetTable(result),
        findings(result),
        plan.error ? errorBox(plan.error) : null,
      ),
    );
  }

  async function makePlan(body) {
    let answer = await api.post("/v1/plans", body);
    while (answer.status === 202 && !stopped) {
      await new Promise((resolve) => setTimeout(resolve, PLAN_POLL_MS));
      answer = { status: 200, body: await api.get(`/v1/plans/${answer.body.id}`) };
      if (answer.body.status !== "pending") break;
    }
    return answer.body;
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    submit.disabled = true;
    clear(message);
    markField(null);
    const body = spec();
    clear(planBox, h("p", { class: "muted" }, "A worker is reading the datasets and the model for the plan…"));
    try {
      const plan = await makePlan(body);
      showPlan(plan);
      planned = plan.status === "ready" ? JSON.stringify(body) : null;
      submit.disabled = planned === null;
    } catch (error) {
      if (error instanceof SignedOut) return;
      if (error instanceof ApiError && error.body && error.body.plan) {
        showPlan(error.body.plan);
      } else {
        clear(planBox, errorBox(error));
      }
      markField(error.param);
    }
  });
  form.addEventListener("input", () => {
    submit.disabled = planned === null || planned !== JSON.stringify(spec());
  });
  submit.addEventListener("click", async () => {
    const body = spec();
    submit.disabled = true;
    try {
      const created = await api.post("/v1/jobs", body);
      location.hash = `#/jobs/${created.body.id}`;
    } catch (error) {
      if (error instanceof SignedOut) return;
      clear(message, errorBox(error));
      markField(error.param);
    }
  });

  root.append(
    h("section", { class: "card" }, h("h1", {}, "New job"), h("p", { class: "muted" }, "Check the plan first: memory per GPU, parameters and refusals, from your data and model."), form),
    h("section", { class: "card" }, planBox, message),
  );

  (async () => {
    try {
      const [models, files] = await Promise.all([api.get("/v1/models"), api.get("/v1/files")]);
      if (stopped) return;
      const wanted = params.get("dataset");
      clear(controls.base_model, models.data.map((m) => h("option", { value: m.id }, m.id)));
      const choices = files.data.map((f) => h("option", { value: f.id, selected: f.id === wanted }, `${f.filename} · ${f.id} (${num(f.num_samples)} samples)`));
      clear(controls.dataset, choices.length ? choices : h("option", { value: "" }, "upload a file first"));
      clear(
        controls.validation_dataset,
        h("option", { value: "" }, "none"),
        files.data.map((f) => h("option", { value: f.id }, `${f.filename} · ${f.id}`)),
      );
    } catch (error) {
      if (!(error instanceof SignedOut)) clear(message, errorBox(error));
    }
  })();
  return () => {
    stopped = true;
  };
}
