"""The OpenAI-compatible surface: /v1/fine_tuning, OpenAI's fine-tuning API over Tuneforge jobs, for code written against the `openai` client.

    client = openai.OpenAI(api_key=TUNEFORGE_KEY, base_url="https://tuneforge.example.com/v1")
    file = client.files.create(file=open("train.jsonl", "rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model="smollm2-135m-instruct",
        training_file=file.id,
        hyperparameters={"n_epochs": 2, "learning_rate_multiplier": 0.5},
        extra_body={"tuneforge": {"method": "dora", "adapter": {"rank": 16, "alpha": 32}}},
    )

Mapping onto a JobSpec (the job is an ordinary Tuneforge job, also visible under /v1/jobs):

- model -> base_model; training_file -> dataset; validation_file -> validation_dataset. A fine-tuned model's
  name (ft:<base>:<team>:<suffix>:<job id>, or a checkpoint's, ending :ckpt-step-<n>) as model -> base_model
  <base> and init_from {job, checkpoint_step}: the job continues from that adapter.
- hyperparameters (or method.supervised.hyperparameters, not both): n_epochs -> epochs, batch_size ->
  batch_size, learning_rate_multiplier -> learning_rate = BASE_LEARNING_RATE (2e-4) x multiplier; "auto" or
  left out keeps Tuneforge's default. seed -> hyperparameters.seed (default 42, not random: a retry with an
  Idempotency-Key must describe the same job).
- method.type "supervised" trains tuneforge.method (lora by default). "dpo" makes a method dpo job (preference
  pairs; beta from method.dpo.hyperparameters.beta, loss_type and label_smoothing from tuneforge.dpo) on the
  adapter tuneforge.method names: lora, dora (adapter.use_dora), rslora (adapter.use_rslora) or qlora (a 4-bit
  base). "reinforcement" is refused (400, param method.type).
- suffix -> suffix (JobSpec's): fine_tuned_model is ft:<base>:<team>:<suffix>:<job id>. Jobs made before
  JobSpec had it keep it in their metadata under `tuneforge.suffix`, hidden from this surface's `metadata`.
- integrations -> integrations, in OpenAI's shape: {"type": "wandb", "wandb": {project, name, entity, tags}};
  Tuneforge also takes {"type": "mlflow", "mlflow": {experiment, run_name}}.
- The `tuneforge` body field (the client's extra_body) carries the PEFT settings, each the JobSpec field of
  the same name: {"method": "lora|dora|rslora|qlora", "adapter": {...}, "quantization": {...}, "dpo": {...},
  "hyperparameters": {...any JobSpec hyperparameter, e.g. max_steps...}, "resources": {...}, "priority"}.
  A setting given through an OpenAI field may not be repeated there (epochs, batch_size, learning_rate,
  seed; max_steps clashes with n_epochs).

Jobs of other methods (merge, fusion, export) are Tuneforge-only: this surface neither lists nor shows them.
Errors here take OpenAI's shape {"error": {"message", "type", "param", "code"}} and name OpenAI's fields
(`model`, `training_file`, `tuneforge.adapter.rank`...); invalid requests are 400 (the native API says 422).

The package: `schemas` (OpenAI's objects), `translate` (request -> JobSpec), `errors` (OpenAI's error shape),
`routes` (the router). /v1/files serves OpenAI's files routes too (api/routers/files.py).
"""
