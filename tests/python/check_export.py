"""Loads an `aligner export` file the way TRL, OpenRLHF and LLaMA-Factory do (Hugging Face
`datasets`) and checks its columns: prompt/chosen/rejected for DPO, prompt/completion for SFT,
plain strings or conversational [{role, content}] lists.

    python3 tests/python/check_export.py FILE dpo|sft plain|conversational
"""
import sys

from datasets import load_dataset


def is_messages(value) -> bool:
    return isinstance(value, list) and all(set(m) == {"role", "content"} for m in value)


def main() -> None:
    path, kind, style = sys.argv[1:4]
    builder = "parquet" if path.endswith(".parquet") else "json"
    ds = load_dataset(builder, data_files=path, split="train")
    columns = {"dpo": ["prompt", "chosen", "rejected"], "sft": ["prompt", "completion"]}[kind]
    missing = [c for c in columns if c not in ds.column_names]
    assert not missing, f"missing columns {missing}; have {ds.column_names}"
    for row in ds:
        for c in columns:
            v = row[c]
            if style == "conversational":
                assert is_messages(v), f"{c} is not a message list: {v!r}"
                if c != "prompt":
                    assert v[-1]["role"] == "assistant", v
            else:
                assert isinstance(v, str) and v, f"{c} is not a non-empty string: {v!r}"
    print(f"ok {len(ds)} rows, columns {ds.column_names}")


if __name__ == "__main__":
    main()
