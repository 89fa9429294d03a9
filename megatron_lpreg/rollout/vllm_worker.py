"""Code that runs inside vLLM's worker processes (``worker_extension_cls``), called through ``collective_rpc``.

vLLM mixes this class into its worker class, so the engine can call the method by name without pickling code
(``VLLM_ALLOW_INSECURE_SERIALIZATION`` stays off). Kept free of project imports: the worker only needs torch.
"""
from __future__ import annotations

import torch


class WeightSumsExtension:
    """Per-parameter float64 sums of the weights a vLLM worker actually holds (post-sync checksum check)."""

    def lpreg_weight_sums(self) -> dict[str, list[float]]:
        """``{vllm_param_name: [float64 sum, numel]}`` over this worker's shard of every parameter.

        Embedding/LM-head shards are summed over their original-vocabulary rows only: vLLM pads the vocabulary,
        and the padding rows are not part of the checkpoint. Linear weights that the CPU backend packed into a
        kernel (empty ``weight``) are read back through that kernel.
        """
        model = self.model_runner.get_model()  # type: ignore[attr-defined]  (the vLLM worker's attribute)
        org_rows = {
            f"{prefix}.weight" if prefix else "weight": int(module.shard_indices.num_org_elements)
            for prefix, module in model.named_modules()
            if hasattr(module, "shard_indices")
        }
        modules = dict(model.named_modules())
        sums: dict[str, list[float]] = {}
        with torch.no_grad():
            for name, param in model.named_parameters():
                prefix, _, leaf = name.rpartition(".")
                module = modules.get(prefix)
                if leaf == "weight" and param.numel() == 0 and hasattr(module, "cpu_linear"):
                    sums[name] = _packed_linear_sum(module, param.dtype)
                    continue
                tensor = param.detach()
                if name in org_rows:
                    tensor = tensor[: org_rows[name]]
                sums[name] = [float(tensor.double().sum()), float(tensor.numel())]
        return sums


def _packed_linear_sum(module: torch.nn.Module, dtype: torch.dtype, block: int = 256) -> list[float]:
    """[float64 sum, numel] of a linear weight that vLLM's CPU backend moved into a packed oneDNN/SGL kernel
    (the ``weight`` parameter is left empty). The kernel is applied to identity rows: each output element is one
    weight times 1 plus zeros, so the weight comes back exactly through the very kernel that generates."""
    in_features = int(module.input_size_per_partition)
    total, count = 0.0, 0
    for start in range(0, in_features, block):
        rows = min(block, in_features - start)
        eye = torch.zeros(rows, in_features, dtype=dtype)
        eye[torch.arange(rows), start + torch.arange(rows)] = 1
        out = module.cpu_linear(eye, module.weight, None)
        total += float(out.double().sum())
        count += out.numel()
    return [total, float(count)]
