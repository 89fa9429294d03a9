"""Qwen2/Qwen2.5/Qwen3 on megatron-core: the per-architecture facts and config.json writer (families.py), HF
directory reading/writing (hf_dir.py), configs and layer specs (qwen.py), HF<->mcore weight mappings (mappings.py,
bridge.py), checkpoints (checkpoint.py, manifest.py), conversion jobs (convert.py), the offline tiny model (tiny.py)
and HF parity (parity.py). Submodules are imported on demand so that ``import megatron_lpreg.models`` stays cheap."""
