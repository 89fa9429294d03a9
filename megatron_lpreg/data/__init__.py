"""Prompt datasets: verl-layout / plain problem files and the synthetic addition task, chat templates, length
filtering and a resumable shuffled cursor."""
from megatron_lpreg.data.char_tokenizer import CharTokenizer
from megatron_lpreg.data.dataset import PromptDataset, build_dataset, to_prompts
from megatron_lpreg.data.records import DatasetStats, Prompt, SourceRecord
from megatron_lpreg.data.sources import load_records, read_rows
from megatron_lpreg.data.synthetic import addition_problems, reference_response, split_synthetic
from megatron_lpreg.data.templates import TEMPLATES, decode, encode, render, stop_token_ids

__all__ = [
    "CharTokenizer", "DatasetStats", "Prompt", "PromptDataset", "SourceRecord", "TEMPLATES", "addition_problems",
    "build_dataset", "decode", "encode", "load_records", "read_rows", "reference_response", "render",
    "split_synthetic", "stop_token_ids", "to_prompts",
]
