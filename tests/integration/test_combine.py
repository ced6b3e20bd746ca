"""Merging, fusing and exporting finished adapters: the worker's real code on PostgreSQL and S3, with two LoRA
adapters trained on a tiny Llama for two different tasks (colors of things, reversing words)."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from shared.datasets import DatasetFormat, DatasetSummary
from shared.db import session_scope
from shared.models import DEFAULT_TEAM_ID, Job
from shared.schemas import JobSpec
from shared.services import artifacts as artifact_service
from shared.services import jobs as job_service
from shared.settings import ModelEntry, Settings
from shared.states import JobStatus
from shared.tenancy import TeamID
from tests.conftest import BUCKET, TINY_MODEL
from tests.helpers import color_prompt_completion, corpus, to_jsonl, upload_dataset
from worker import runner, validation
from worker.training.adapters import source_names
from worker.training.data import IGNORE, encode_dataset
from worker.training.recipes.base import TrainingContext
from worker.training.recipes.export import MERGE_TOLERANCE, ExportRecipe
from worker.training.recipes.fusion import FusionRecipe
from worker.training.recipes.merge import MERGE_SEED, MergeRecipe
from worker.training.toy_models import build_llama

TEAM = TeamID(DEFAULT_TEAM_ID)
PROBE = torch.tensor([[5, 17, 42, 99, 7, 130, 250, 64]])
WORDS = ["stone", "river", "cloud", "plant", "metal", "apple", "grass", "snow", "coal", "plum", "sky", "fox"]
RANK = 8
# The test model's random output head keeps its logits near zero, so no adapter can bring a loss far below
# ln(vocab size) and combinations barely differ. The same tiny Llama with its final norm scaled up has
# confident logits: the adapters learn their tasks and merges and fusion differ measurably.
MODEL = f"{TINY_MODEL}-sharp"
NORM_SCALE = 10.0


def reverse_prompt_completion(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = [rng.choice(WORDS) for _ in range(n)]
    return [{"prompt": f"Reverse {w}: ", "completion": w[::-1]} for w in words]


def mixed(n: int, seed: int) -> list[dict]:
    rows = color_prompt_completion(n // 2, seed=seed) + reverse_prompt_completion(n - n // 2, seed=seed)
    random.Random(seed).shuffle(rows)
    return rows


def upload(settings, store, rows: list[dict]) -> str:
    with session_scope(settings.database_url) as session:
        return upload_dataset(session, settings, store, to_jsonl(rows), team_id=TEAM).id


def run(settings, store, **spec) -> Job:
    """Submits a job, validates it and runs it in this process; returns the succeeded job."""
    with session_scope(settings.database_url) as session:
        job_id = job_service.create_job(
            session=session, settings=settings, store=store, team_id=TEAM, spec=JobSpec(**spec)
        ).id
    assert validation.validate_job(settings, job_id) is JobStatus.queued
    status = runner.run_job(settings, job_id)
    with session_scope(settings.database_url) as session:
        done = session.get(Job, job_id)
    assert status is JobStatus.succeeded, (done.error_code, done.error_message)
    return done


def download(settings, store, job_id: str, dest: Path, kind: str = "adapter") -> Path:
    with session_scope(settings.database_url) as session:
        artifacts = artifact_service.list_artifacts(session=session, team_id=TEAM, job_id=job_id, kind=kind)
    assert artifacts
    for artifact in artifacts:
        store.get_file(artifact.storage_key, dest / artifact.name, expected_sha256=artifact.sha256)
    return dest


def base_model(model_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    return model.eval()(PROBE).logits


def with_adapter(model_dir: Path, folder: Path) -> PeftModel:
    return PeftModel.from_pretrained(base_model(model_dir), folder).eval()


def with_all_active(model_dir: Path, folders: list[Path]) -> PeftModel:
    """The base with every adapter active at once (their changes add up)."""
    model = PeftModel.from_pretrained(base_model(model_dir), folders[0], adapter_name="a0")
    for i, folder in enumerate(folders[1:], start=1):
        model.load_adapter(folder, adapter_name=f"a{i}")
    model.base_model.set_adapter([f"a{i}" for i in range(len(folders))], inference_mode=True)
    return model.eval()


@torch.no_grad()
def mean_loss(model: torch.nn.Module, tokenizer, rows: list[dict]) -> float:
    """Mean cross-entropy over the completion tokens of `rows`."""
    encoded = encode_dataset(rows, DatasetFormat.prompt_completion, tokenizer, 128)
    total, count = 0.0, 0
    model.eval()
    for sample in encoded.samples:
        ids = torch.tensor([sample.input_ids])
        labels = torch.tensor(sample.labels[1:])
        out = model(ids).logits[0, :-1]
        mask = labels != IGNORE
        total += float(torch.nn.functional.cross_entropy(out[mask], labels[mask], reduction="sum"))
        count += int(mask.sum())
    return total / count


class Reporter:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, str]] = []

    def event(self, type, message, *, level="info", data=None) -> None:
        self.events.append((type, level, message))

    def metric(self, split, step, values) -> None:
        pass


def context(model_dir: Path, work_dir: Path, sources: list[Path], rows=None, **spec) -> TrainingContext:
    work_dir.mkdir(parents=True, exist_ok=True)
    data = None
    if rows is not None:
        data = DatasetSummary(DatasetFormat.prompt_completion, len(rows), len(rows), records=rows)
    return TrainingContext(
        job_id="ftjob-direct",
        spec=JobSpec(base_model=MODEL, **spec),
        model_dir=model_dir,
        work_dir=work_dir,
        reporter=Reporter(),
        should_stop=lambda: False,
        train_data=data,
        sources=sources,
    )


@pytest.fixture(scope="module")
def model_dir(work_dir, store, settings) -> Path:
    folder = work_dir / MODEL
    if not (folder / "config.json").exists():
        build_llama(folder, corpus=corpus())
        model = AutoModelForCausalLM.from_pretrained(folder)
        with torch.no_grad():
            model.model.norm.weight.mul_(NORM_SCALE)
        model.save_pretrained(folder)
    store.put_tree(f"models/{MODEL}", folder)
    return folder


@pytest.fixture(scope="module")
def job_settings(settings, model_dir) -> Settings:
    """The test settings with MODEL in the model registry too."""
    entry = ModelEntry(location=f"s3://{BUCKET}/models/{MODEL}", description="tiny Llama, confident logits")
    return settings.model_copy(update={"models": {**settings.models, MODEL: entry}})


@pytest.fixture(scope="module")
def adapters(job_settings, store, model_dir, tmp_path_factory) -> dict:
    """Two LoRA adapters of rank 8, trained by the real runner: colors (attention) and reversal (all-linear)."""
    trained = {}
    for task, rows, targets in (
        ("color", color_prompt_completion(64, seed=1), "attention"),
        ("reverse", reverse_prompt_completion(64, seed=1), "all-linear"),
    ):
        done = run(
            job_settings,
            store,
            base_model=MODEL,
            dataset=upload(job_settings, store, rows),
            method="lora",
            adapter={"rank": RANK, "target_modules": targets, "dropout": 0.0},
            hyperparameters={"max_steps": 40, "learning_rate": 1e-2, "batch_size": 8},
        )
        assert done.result["final_train_loss"] < done.result["first_train_loss"]
        folder = download(job_settings, store, done.id, tmp_path_factory.mktemp(task))
        trained[task] = {"job_id": done.id, "folder": folder}
    return trained


def sources_of(adapters: dict) -> list[dict]:
    return [{"job_id": adapters[task]["job_id"]} for task in ("color", "reverse")]


def folders_of(adapters: dict) -> list[Path]:
    return [adapters[task]["folder"] for task in ("color", "reverse")]


def merge_directly(model_dir: Path, work_dir: Path, folders: list[Path], **merge) -> Path:
    """Runs MergeRecipe in this process on local adapter folders; returns the output folder."""
    merge["sources"] = [{"job_id": f"src{i}"} for i in range(len(folders))]
    return MergeRecipe(context(model_dir, work_dir, folders, method="merge", merge=merge)).run().output_dir


def test_cat_merge_job_reproduces_both_adapters(job_settings, store, model_dir, adapters, tmp_path):
    merge = {"sources": sources_of(adapters), "combination_type": "cat", "weights": [1.0, 1.0]}
    done = run(job_settings, store, method="merge", merge=merge)
    assert done.base_model == MODEL  # filled in from the sources
    assert done.result == {"combination_type": "cat", "weights": [1.0, 1.0], "rank": 2 * RANK, "sources": 2}
    folder = download(job_settings, store, done.id, tmp_path / "merged")
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json"} <= {
        p.name for p in folder.iterdir()
    }
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 2 * RANK and not config["use_rslora"]
    assert config["base_model_name_or_path"] == MODEL
    # Only the new adapter's weights, under peft's names for a lone adapter.
    keys = list(load_file(folder / "adapter_model.safetensors"))
    assert keys and all("source_" not in k and ".default." not in k for k in keys)
    card = (folder / "README.md").read_text()
    assert "library_name: peft" in card and "| merge.combination_type | cat |" in card

    model = PeftModel.from_pretrained(base_model(model_dir), folder, is_trainable=True)
    assert (done.trainable_params, done.total_params) == model.get_nb_trainable_parameters()
    # cat with weights 1 is exact: the base with both adapters active at once.
    merged = logits(model)
    both = logits(with_all_active(model_dir, folders_of(adapters)))
    assert torch.allclose(merged, both, atol=1e-4), (merged - both).abs().max()
    assert not torch.allclose(merged, logits(base_model(model_dir)), atol=1e-3)


@pytest.mark.parametrize(
    ("combination_type", "weights"), [("linear", None), ("svd", [0.7, 0.7]), ("ties", [1.0, 1.0])]
)
def test_other_combinations_make_loadable_adapters(model_dir, adapters, tmp_path, combination_type, weights):
    merge: dict = {"combination_type": combination_type}
    if weights is not None:
        merge["weights"] = weights
    folder = merge_directly(model_dir, tmp_path, folders_of(adapters), **merge)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == RANK
    # The union of what the sources adapt: attention (color) and every linear layer (reverse).
    assert {name.rsplit(".", 1)[-1] for name in config["target_modules"]} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    before = logits(base_model(model_dir))
    after = logits(with_adapter(model_dir, folder))
    assert not torch.allclose(before, after, atol=1e-3)
    assert combination_type in (folder / "README.md").read_text()


def merge_with_peft(
    model_dir: Path, folders: list[Path], seed: int = MERGE_SEED, **merge
) -> dict[str, torch.Tensor]:
    """What peft's add_weighted_adapter makes of the same sources with the global RNG seeded to `seed`: the new
    adapter's weights, under the names a saved adapter has."""
    names = source_names(len(folders))
    model = PeftModel.from_pretrained(base_model(model_dir), folders[0], adapter_name=names[0])
    for folder, name in zip(folders[1:], names[1:], strict=True):
        model.load_adapter(folder, adapter_name=name)
    torch.manual_seed(seed)
    model.add_weighted_adapter(adapters=names, adapter_name="merged", **merge)
    return get_peft_model_state_dict(model, adapter_name="merged")


def assert_same_weights(saved: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert saved.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(saved[name], value), (name, (saved[name] - value).abs().max())


@pytest.mark.parametrize("combination_type", ["dare_ties", "dare_linear", "magnitude_prune"])
def test_density_merges_are_what_peft_computes(model_dir, adapters, tmp_path, combination_type):
    weights, density = [0.6, 0.9], 0.3
    merge = {"combination_type": combination_type, "weights": weights, "density": density}
    folders = folders_of(adapters)
    folder = merge_directly(model_dir, tmp_path / "merged", folders, **merge)
    saved = load_file(folder / "adapter_model.safetensors")
    assert_same_weights(saved, merge_with_peft(model_dir, folders, **merge))
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == RANK
    assert not torch.allclose(
        logits(with_adapter(model_dir, folder)), logits(base_model(model_dir)), atol=1e-3
    )
    card = (folder / "README.md").read_text()
    assert f"| merge.combination_type | {combination_type} |" in card

    # The MLP layers have one source (reverse): there the merge is that adapter, pruned and scaled by
    # sqrt(weight x scaling) (on A and on B), with dare's kept entries also divided by the density.
    source = load_file(folders[1] / "adapter_model.safetensors")
    source_config = json.loads((folders[1] / "adapter_config.json").read_text())
    scale = math.sqrt(weights[1] * source_config["lora_alpha"] / source_config["r"])
    mlp = [name for name in saved if ".mlp." in name]
    assert len(mlp) == 2 * 3 * 2  # gate, up, down in two layers; A and B
    kept_total = entries = 0
    for name in mlp:
        merged, original = saved[name], source[name]
        kept = merged != 0
        kept_total, entries = kept_total + int(kept.sum()), entries + merged.numel()
        factor = scale if combination_type == "magnitude_prune" else scale / density
        torch.testing.assert_close(merged[kept], original[kept] * factor, rtol=1e-5, atol=0)
        if combination_type == "magnitude_prune":
            # The largest entries by magnitude, exactly the density's share of them.
            assert int(kept.sum()) == int(density * merged.numel()), name
            assert original[kept].abs().min() >= original[~kept].abs().max(), name
    print(f"{combination_type}: kept {kept_total} of {entries} MLP adapter weights at density {density}")
    assert abs(kept_total / entries - density) < 0.03


def test_a_dare_merge_job_is_seeded(job_settings, store, model_dir, adapters, tmp_path):
    # DARE drops entries at random: the worker seeds the draws (MERGE_SEED), so the job's merge in its training
    # process is the one peft makes here with the same seed, and another seed makes another merge.
    merge = {"combination_type": "dare_ties", "weights": [1.0, 1.0], "density": 0.5}
    done = run(job_settings, store, method="merge", merge={"sources": sources_of(adapters), **merge})
    assert done.result == {**merge, "rank": RANK, "sources": 2}
    saved = load_file(
        download(job_settings, store, done.id, tmp_path / "merged") / "adapter_model.safetensors"
    )
    assert_same_weights(saved, merge_with_peft(model_dir, folders_of(adapters), **merge))
    other = merge_with_peft(model_dir, folders_of(adapters), seed=MERGE_SEED + 1, **merge)
    assert not all(torch.equal(saved[name], value) for name, value in other.items())


def test_merging_rslora_adapters_keeps_their_scaling(model_dir, adapters, tmp_path):
    # rsLoRA versions of the two adapters: the same weights, scaled by alpha/sqrt(r) instead of alpha/r.
    folders = []
    for task, folder in zip(("color", "reverse"), folders_of(adapters), strict=True):
        copy = shutil.copytree(folder, tmp_path / task)
        config = json.loads((copy / "adapter_config.json").read_text())
        config["use_rslora"] = True
        (copy / "adapter_config.json").write_text(json.dumps(config))
        folders.append(copy)
    output = merge_directly(model_dir, tmp_path / "cat", folders, weights=[1.0, 1.0], combination_type="cat")
    config = json.loads((output / "adapter_config.json").read_text())
    # The merged adapter carries the sources' scalings in its weights; its own scaling is 1 (not sqrt(16)).
    assert config["use_rslora"] is False and config["lora_alpha"] == config["r"] == 2 * RANK
    merged = logits(with_adapter(model_dir, output))
    both = logits(with_all_active(model_dir, folders))
    plain = logits(with_all_active(model_dir, folders_of(adapters)))
    assert not torch.allclose(both, plain, atol=1e-3)  # the rsLoRA scaling does change the model
    assert torch.allclose(merged, both, atol=1e-4), (merged - both).abs().max()

    # A linear merge folds sqrt(weight * scaling) into A and B: the new adapter must not rescale by sqrt(r).
    output = merge_directly(model_dir, tmp_path / "linear", folders, combination_type="linear")
    model = with_adapter(model_dir, output)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == 1.0
    sources = with_all_active(model_dir, folders).base_model.model.model.layers[0].self_attn.q_proj
    scalings = [sources.scaling[name] for name in ("a0", "a1")]
    assert scalings == [pytest.approx(16 / RANK**0.5)] * 2
    expected_a = sum(
        (0.5 * s) ** 0.5 * sources.lora_A[n].weight for s, n in zip(scalings, ("a0", "a1"), strict=True)
    )
    assert torch.allclose(layer.lora_A["default"].weight, expected_a, atol=1e-6)


def test_fusion_learns_weights_that_beat_a_uniform_merge(job_settings, store, model_dir, adapters, tmp_path):
    train_rows, eval_rows = mixed(64, seed=2), mixed(32, seed=3)
    fused_job = run(
        job_settings,
        store,
        base_model=MODEL,
        method="fusion",
        dataset=upload(job_settings, store, train_rows),
        fusion={"sources": sources_of(adapters)},
        hyperparameters={"max_steps": 30, "learning_rate": 5e-2, "batch_size": 8},
    )
    result = fused_job.result
    assert len(result["fusion_weights"]) == 2 and result["fusion_weights"] != [0.5, 0.5]
    assert result["rank"] == 2 * RANK and result["reproduction_max_logit_diff"] < 1e-4
    assert fused_job.trainable_params == 2  # one weight per adapter
    fused_dir = download(job_settings, store, fused_job.id, tmp_path / "fused")
    card = (fused_dir / "README.md").read_text()
    assert "## Fusion" in card and f"{result['fusion_weights'][0]:.6g}" in card

    # The uniform linear merge (weights 0.5 each, the default).
    linear_dir = merge_directly(
        model_dir, tmp_path / "linear", folders_of(adapters), combination_type="linear"
    )

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    fused_loss = mean_loss(with_adapter(model_dir, fused_dir), tokenizer, eval_rows)
    linear_loss = mean_loss(with_adapter(model_dir, linear_dir), tokenizer, eval_rows)
    base_loss = mean_loss(base_model(model_dir), tokenizer, eval_rows)
    print(
        f"eval loss on the mix: base {base_loss:.4f}, linear merge {linear_loss:.4f}, fused {fused_loss:.4f}"
    )
    print(f"learned weights: {result['fusion_weights']} in {result['train_runtime_seconds']}s")
    assert fused_loss < linear_loss < base_loss


def test_per_layer_fusion_is_saved_exactly(model_dir, adapters, tmp_path):
    ctx = context(
        model_dir,
        tmp_path / "work",
        folders_of(adapters),
        rows=mixed(32, seed=4),
        method="fusion",
        dataset="unused",
        fusion={"sources": [{"job_id": "a"}, {"job_id": "b"}], "per_layer": True},
        hyperparameters={"max_steps": 6, "learning_rate": 5e-2, "batch_size": 8},
    )
    recipe = FusionRecipe(ctx)
    try:
        recipe.setup()
        recipe.train()
        fused = logits(recipe.model)  # the in-memory fused model: sources active, scaled by the hooks
        result = recipe.save(tmp_path / "artifact")
    finally:
        recipe.cleanup()
    per_module = result.metrics["fusion_weights_per_module"]
    # color adapts q/k/v/o, reverse every linear layer: 2 layers x 7 modules, color absent from the MLPs.
    assert len(per_module) == 14 and result.trainable_params == 14 * 2
    assert per_module["model.layers.0.mlp.up_proj"][0] is None
    learned = [w for row in per_module.values() for w in row if w is not None]
    assert len(set(learned)) > 2 and all(w != 0.5 for w in learned)
    saved = logits(with_adapter(model_dir, result.output_dir))
    assert torch.allclose(saved, fused, atol=1e-4), (saved - fused).abs().max()
    assert not torch.allclose(saved, logits(with_all_active(model_dir, folders_of(adapters))), atol=1e-3)


def test_export_merges_the_adapter_into_a_sharded_model(job_settings, store, model_dir, adapters, tmp_path):
    source = adapters["reverse"]
    done = run(
        job_settings,
        store,
        method="export",
        export={"source": {"job_id": source["job_id"]}, "dtype": "float32", "max_shard_size": "100KB"},
    )
    assert done.result["merge_max_logit_diff"] < 1e-4 and done.result["within_tolerance"]
    folder = download(job_settings, store, done.id, tmp_path / "model", kind="merged")
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").exists()
    assert done.result["shards"] == len(shards)
    assert not (folder / "adapter_config.json").exists()
    card = (folder / "README.md").read_text()
    assert "library_name: transformers" in card and "## Verification" in card and "tolerance" in card

    merged = AutoModelForCausalLM.from_pretrained(folder)
    assert merged.dtype is torch.float32
    expected = logits(with_adapter(model_dir, source["folder"]))
    difference = float((logits(merged) - expected).abs().max())
    print(
        f"export max logit difference (float32): {difference:.3g}; recipe measured {done.result['merge_max_logit_diff']:.3g}"
    )
    assert difference < 1e-4
    assert not torch.allclose(logits(base_model(model_dir)), expected, atol=1e-3)
    assert AutoTokenizer.from_pretrained(folder).eos_token == "<|im_end|>"


def test_export_casts_to_bfloat16(model_dir, adapters, tmp_path):
    export = {"source": {"job_id": "a"}, "dtype": "bfloat16"}
    ctx = context(model_dir, tmp_path / "work", [adapters["color"]["folder"]], method="export", export=export)
    result = ExportRecipe(ctx).run()
    assert json.loads((result.output_dir / "config.json").read_text())["dtype"] == "bfloat16"
    assert result.metrics["shards"] == 1 and result.metrics["merge_max_logit_diff"] < 1e-4
    merged = AutoModelForCausalLM.from_pretrained(result.output_dir)
    assert merged.dtype is torch.bfloat16
    expected = logits(with_adapter(model_dir, adapters["color"]["folder"]))
    cast = float((logits(merged).float() - expected).abs().max())
    # The cast rounds the weights to 8 bits of mantissa: close, not exact (the recipe reports it, on its probe).
    assert 0 < cast < 0.05 * float(expected.abs().max())
    largest = result.metrics["merge_tolerance"] / MERGE_TOLERANCE  # the largest logit on the recipe's probe
    assert 0 < result.metrics["export_max_logit_diff"] < 0.05 * largest
