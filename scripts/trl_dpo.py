#!/usr/bin/env python3
"""One DPO round with TRL, as an `aligner` train command (see pipelines/dpo-command.yaml).

aligner fills in the arguments: the round's pairs ({data}, TRL's prompt/chosen/rejected
columns), the model to train ({base_model}), the DPO reference ({ref_model}) and where the
checkpoint must go ({output_dir}). Requires `pip install trl transformers datasets torch`
(and `peft` for `--use-peft`).

With `--use-peft` the checkpoint is a LoRA adapter on the original weights, which vLLM loads at
run time (`rounds.train.serve: {kind: vllm_lora}`). Later rounds get the previous round's
adapter as `--model`: it is trained further on the same base (vLLM serves one adapter over the
base, not a stack), and the reference is the base with the adapter switched off, i.e. the
initial model (`reference: initial`).
"""
import argparse
import dataclasses
import json
import os

import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--ref-model", required=True)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--loss", default="sigmoid")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--use-peft", action="store_true", help="train (or continue) a LoRA adapter")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    a = p.parse_args()

    data = load_dataset("json" if a.data.endswith(".jsonl") else "parquet", data_files=a.data, split="train")
    peft_config = None
    adapter = os.path.join(a.model, "adapter_config.json")
    if a.use_peft and os.path.exists(adapter):
        from peft import PeftModel

        base = json.load(open(adapter))["base_model_name_or_path"]
        tokenizer = AutoTokenizer.from_pretrained(a.model)
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), a.model, is_trainable=True)
        ref = None
    elif a.use_peft:
        from peft import LoraConfig

        tokenizer = AutoTokenizer.from_pretrained(a.model)
        model = AutoModelForCausalLM.from_pretrained(a.model)
        ref = None
        peft_config = LoraConfig(r=a.lora_r, lora_alpha=a.lora_alpha, target_modules="all-linear", task_type="CAUSAL_LM")
    else:
        tokenizer = AutoTokenizer.from_pretrained(a.model)
        model = AutoModelForCausalLM.from_pretrained(a.model)
        ref = AutoModelForCausalLM.from_pretrained(a.ref_model)
    # `sigmoid_nll` is DPO plus an NLL term on the chosen answers (RPO): TRL before 1.0 spells
    # it `rpo_alpha`, later TRL as a second loss, `sft`, weighted beside `sigmoid`.
    fields = {f.name for f in dataclasses.fields(DPOConfig)}
    gpu = torch.cuda.is_available()
    loss_args = {"loss_type": a.loss}
    if a.loss == "sigmoid_nll":
        if "rpo_alpha" in fields:
            loss_args = {"loss_type": "sigmoid", "rpo_alpha": 1.0}
        else:
            loss_args = {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 1.0]}
    config = DPOConfig(
        output_dir=a.output_dir,
        beta=a.beta,
        learning_rate=a.lr,
        num_train_epochs=a.epochs,
        per_device_train_batch_size=a.batch_size,
        gradient_accumulation_steps=a.grad_accum,
        max_length=a.max_length,
        lr_scheduler_type="cosine",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        # bf16 on a GPU that has it; f32 on the CPU (a smoke test, or a machine without GPUs).
        bf16=gpu and torch.cuda.is_bf16_supported(),
        use_cpu=not gpu,
        **loss_args,
        # transformers 5 takes the ratio as a float `warmup_steps`; earlier ones as `warmup_ratio`.
        **({"warmup_ratio": a.warmup_ratio} if "warmup_ratio" in fields else {"warmup_steps": a.warmup_ratio}),
    )
    trainer = DPOTrainer(
        model=model, ref_model=ref, args=config, train_dataset=data, processing_class=tokenizer, peft_config=peft_config
    )
    trainer.train()
    trainer.save_model(a.output_dir)
    tokenizer.save_pretrained(a.output_dir)


if __name__ == "__main__":
    main()
