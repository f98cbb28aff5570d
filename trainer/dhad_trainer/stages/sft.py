"""SFT stage (AceGPT step 2): TRL SFTTrainer on the weighted mix of instruction datasets.

- Loss: assistant turns only (content + <|im_end|>, from the template's {% generation %} block), and
  completion-only when every dataset is prompt-completion (then even assistantOnlyLoss=false trains
  just the completions, which is what that layout means).
- Packing: best-fit decreasing ("bfd") with padding-free batches: documents share a row but carry
  their own position_ids, from which transformers builds a block-diagonal causal mask (sdpa, eager,
  flash), so no token attends across documents (tests/unit/test_sft_tokens.py checks the logits).
- Chat template: the model's own, Dhad's ChatML (adding <|im_start|>/<|im_end|> if the vocabulary
  lacks them) or a custom one; the final tokenizer carries it, so later stages render alike.
- LoRA through peft when training.lora is set; merged into the base weights at the end if lora.merge:
  every rank saves the adapter (HF gathers ZeRO-3/FSDP shards for it), then rank 0 alone loads the base
  model whole on CPU (outside ZeRO-3's partitioning), folds the adapter in and writes a plain model. The
  trained model itself is never touched on one rank: under ZeRO-3 its parameters are partitions.
"""

from __future__ import annotations

import contextlib
import logging

from dhad_api.jobs import SFTJobSpec
from dhad_api.stages import SFTDataset, SFTSchema, SFTTraining
from dhad_trainer.data.conversations import load_sft_mix
from dhad_trainer.runtime import tracking
from dhad_trainer.stages.alignment import (
    barrier,
    load_dtype,
    resume_arg,
    save_final,
    set_chat_template,
    stage_arguments,
)
from dhad_trainer.stages.base import StageResult, StageRun, save_model

log = logging.getLogger("dhad.sft")
PACKING_STRATEGY = "bfd"


def sft_config(run: StageRun, t: SFTTraining, completion_only: bool):
    from trl import SFTConfig

    return SFTConfig(**stage_arguments(
        run, t,
        max_length=t.sequence_length,
        packing=t.packing,
        packing_strategy=PACKING_STRATEGY,
        padding_free=t.packing,
        assistant_only_loss=t.assistant_only_loss,
        completion_only_loss=True if completion_only else None,
    ))


def as_prompt_completion(dataset):
    """messages -> prompt (all but the last turn) + completion (the last, assistant, turn)."""
    return dataset.map(lambda r: {"prompt": r["messages"][:-1], "completion": r["messages"][-1:]},
                       remove_columns=["messages"])


def lora_config(t: SFTTraining, new_token_ids: list[int]):
    from peft import LoraConfig

    lora = t.lora
    extra = {"trainable_token_indices": {"embed_tokens": new_token_ids}, "modules_to_save": ["lm_head"]} if new_token_ids else {}
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=list(lora.target_modules), task_type="CAUSAL_LM", **extra)


def prepare_model(run: StageRun, t: SFTTraining):
    """(model, tokenizer, ids of tokens the template added) with eos = the template's end of turn."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run.model_dir)
    added = set_chat_template(tokenizer, t.chat_template)
    model = AutoModelForCausalLM.from_pretrained(run.model_dir, dtype=load_dtype(run))
    if added:
        model.resize_token_embeddings(len(tokenizer))
    eos = tokenizer.eos_token_id
    model.config.eos_token_id = eos
    stop = model.generation_config.eos_token_id
    stop = [stop] if isinstance(stop, int) else list(stop or [])
    model.generation_config.eos_token_id = [eos, *[s for s in stop if s != eos]]
    return model, tokenizer, tokenizer.convert_tokens_to_ids(added)


def respond_datasets(run: StageRun) -> list[SFTDataset]:
    """The teacher's answers from the respond sub-stage, when it ran (its side files are skipped)."""
    folder = run.inputs.get("respond")
    if folder is None:
        return []
    from dhad_trainer.stages.respond import dataset_glob

    return [SFTDataset(uri=dataset_glob(folder), schema=SFTSchema.MESSAGES)]


def build_trainer(run: StageRun):
    """The configured SFTTrainer and tokenizer; split out so tests can inspect batches without training."""
    from trl import SFTTrainer

    spec: SFTJobSpec = run.spec
    t = spec.training
    datasets = list(spec.data) + respond_datasets(run)
    dataset, counts = load_sft_mix(datasets, run.data_store, system_prompt=t.system_prompt, seed=t.seed)
    completion_only = all(ds.schema_ is SFTSchema.PROMPT_COMPLETION for ds in datasets)
    if completion_only:
        dataset = as_prompt_completion(dataset)
    model, tokenizer, new_ids = prepare_model(run, t)
    trainer = SFTTrainer(
        model=model,
        args=sft_config(run, t, completion_only),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(t, new_ids) if t.lora else None,
        callbacks=list(run.callbacks),
    )
    tracking.integrations_last(trainer)
    return trainer, tokenizer, counts


@contextlib.contextmanager
def whole_models():
    """`from_pretrained` without ZeRO-3's zero.Init partitioning, for work one rank does alone (a
    partitioned load would wait for the other ranks). transformers keeps the switch in a module global."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def merge_lora(trainer, run: StageRun, t: SFTTraining) -> None:
    """The adapter (saved by every rank) folded into a freshly loaded base model on rank 0."""
    adapter = run.work_dir / "adapter"
    save_model(trainer, adapter)
    barrier(run)
    if run.is_main:
        from peft import PeftModel

        with whole_models():
            base, tokenizer, _ = prepare_model(run, t)  # same template tokens, resize and eos as training
            merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
        merged.save_pretrained(run.output_dir, safe_serialization=True)
        tokenizer.save_pretrained(run.output_dir)
    barrier(run)


def run(run: StageRun) -> StageResult:
    trainer, tokenizer, counts = build_trainer(run)
    result = trainer.train(resume_from_checkpoint=resume_arg(run))
    lora = run.spec.training.lora
    if lora is not None and lora.merge:  # the output is a plain model any runtime loads
        merge_lora(trainer, run, run.spec.training)
    else:  # full fine-tuning: the model; unmerged LoRA: the adapter (peft format) + tokenizer
        save_final(trainer, tokenizer, run)
    metrics = {
        "train_loss": result.training_loss,
        "steps": trainer.state.global_step,
        "train_rows": len(trainer.train_dataset),
        "processes": trainer.args.world_size,
        "packing": f"{PACKING_STRATEGY}+padding_free" if run.spec.training.packing else "none",
        "datasets": counts,
    }
    log.info("sft: %s", metrics)
    return StageResult(metrics=metrics, model_dir=run.output_dir)
