#!/usr/bin/env python3
"""One DPO round with TRL, as an `aligner` train command (see pipelines/dpo-command.yaml).

aligner fills in the arguments: the round's pairs ({data}, TRL's prompt/chosen/rejected
columns), the model to train ({base_model}), the DPO reference ({ref_model}) and where the
checkpoint must go ({output_dir}). Requires `pip install trl transformers datasets torch`.
"""
import argparse

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
    a = p.parse_args()

    data = load_dataset("json" if a.data.endswith(".jsonl") else "parquet", data_files=a.data, split="train")
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model)
    ref = AutoModelForCausalLM.from_pretrained(a.ref_model)
    loss = "sigmoid" if a.loss == "sigmoid_nll" else a.loss
    config = DPOConfig(
        output_dir=a.output_dir,
        beta=a.beta,
        loss_type=loss,
        rpo_alpha=1.0 if a.loss == "sigmoid_nll" else None,
        learning_rate=a.lr,
        num_train_epochs=a.epochs,
        per_device_train_batch_size=a.batch_size,
        gradient_accumulation_steps=a.grad_accum,
        max_length=a.max_length,
        warmup_ratio=a.warmup_ratio,
        lr_scheduler_type="cosine",
        logging_steps=1,
        save_strategy="no",
    )
    trainer = DPOTrainer(model=model, ref_model=ref, args=config, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(a.output_dir)
    tokenizer.save_pretrained(a.output_dir)


if __name__ == "__main__":
    main()
