"""Model Zoo keys that only matter on Cerebras hardware (or to its tooling): accepted, not used.

One table, mirrored by docs/params.md. ``mmgraph check`` lists every ignored key it met. Keys
here are removed from the file's mappings before validation, so a typo of them is still an
error (the did-you-mean lists the real keys).
"""

from __future__ import annotations

_CS = "Cerebras hardware / compiler setting; nothing to do on CPU/GPU"
_INIT = "initializer of a part mmgraph initializes with initializer_range (normal)"
_WORKERS = "loader tuning; mmgraph's loader reads in the training process"

# scope -> key -> why it is ignored. Scopes: the top level, each section, each sub-model.
IGNORED_KEYS: dict[str, dict[str, str]] = {
    "top": {
        "sparsity": "weight sparsity runs on Cerebras hardware only",
        "description": "free text",
    },
    "model": {
        "output_list": "intermediate outputs for debugging on Cerebras; mmgraph's dumps show every value",
        "image_start_idx": "llava: the H5 data's image positions place the image tokens",
        "compute_eval_metrics": "eval metrics are always computed by mmgraph run",
    },
    "vit": {
        "attention_module": "the ViT uses standard multi-head attention (aiayn_attention)",
        "attention_initializer": _INIT,
        "projection_initializer": _INIT,
        "position_embedding_initializer": _INIT,
        "cls_token_initializer": _INIT,
        "default_initializer": _INIT,
        "ffn_initializer": _INIT,
        "pooler_initializer": _INIT,
        "stochastic_depth_drop_prob_schedule": "used only with stochastic_depth_drop_prob > 0 (refused)",
        "stochastic_depth_mode": "used only with stochastic_depth_drop_prob > 0 (refused)",
        "mixed_precision": "the model section's mixed_precision decides",
        "fp16_type": "the model section's fp16_type decides",
        "use_bias_in_output": "the ViT classifier head is not part of an image encoder",
        "num_classes": "the ViT classifier head is not part of an image encoder",
        "use_dinov2_classifier": "the ViT classifier head is not part of an image encoder",
    },
    "ffn": {
        "output_layer_initializer": _INIT,
        "device": _CS,
    },
    "text_model": {
        "fp16_type": "the model section's fp16_type decides",
        "mixed_precision": "the model section's mixed_precision decides",
        "loss_scaling": "the model section's loss_scaling decides",
        "loss_weight": "the model section's loss_weight decides",
        "pos_scaling_type": "used only with pos_scaling_factor != 1.0 (refused)",
        "pos_scaling_extra_args": "used only with pos_scaling_factor != 1.0 (refused)",
        "attention_sliding_window_length": "null only: sliding-window attention is not implemented",
        "embedding_initializer": _INIT,
        "initializer": _INIT,
        "output_layer_initializer": _INIT,
        "attention_kernel": _CS,
        "fixed_sparse_attention": "null only: sparse attention runs on Cerebras hardware",
    },
    "input": {
        "prefetch_factor": _WORKERS,
        "persistent_workers": _WORKERS,
        "use_worker_cache": _WORKERS,
        "mixed_precision": "the model section's mixed_precision decides",
        "fp16_type": "the model section's fp16_type decides",
        "vocab_size": "derived from text_model.vocab_size",
        "num_patches": "derived from the image encoders",
    },
    "runconfig": {
        "num_csx": _CS, "num_workers_per_csx": _CS, "mgmt_address": _CS, "mgmt_namespace": _CS,
        "credentials_path": _CS, "compile_dir": _CS, "compile_only": _CS, "validate_only": _CS,
        "precision_opt_level": _CS, "execute_crd_memory_gi": _CS, "compile_crd_memory_gi": _CS,
        "wrk_memory_gi": _CS, "act_memory_gi": _CS, "cmd_memory_gi": _CS, "job_labels": _CS,
        "mount_dirs": _CS, "python_paths": _CS, "log_input_summaries": _CS, "mode": "--mode decides",
        "target_device": "mmgraph run CPU|GPU decides", "autoload_last_checkpoint":
        "mmgraph run always resumes from the latest checkpoint in model_dir",
        "enable_distributed": "torchrun decides", "dist_backend": "torchrun decides",
        "use_cs_grad_accum": _CS, "experimental_api": _CS, "log_steps_summary": _CS,
    },
    "optimizer": {
        "log_summaries": "Cerebras summaries; mmgraph logs metrics.jsonl and TensorBoard",
        "adjust_learning_rate": "per-layer learning-rate scaling (Cerebras option): not applied",
    },
    # the trainer layout (Model Zoo 2.4 and later)
    "trainer.init": {
        "backend": "the Cerebras backend; mmgraph run CPU|GPU decides",
        "device": "mmgraph run CPU|GPU decides",
        "loggers": "mmgraph logs metrics.jsonl and TensorBoard",
        "autorestart": _CS,
        "sparsity": "weight sparsity runs on Cerebras hardware only",
    },
    "trainer.precision": {
        "log_loss_scale": "the loss scale is logged when it is dynamic",
        "precision_opt_level": _CS,
    },
    "trainer.loop": {
        "steps_per_epoch": "epochs are counted from the data",
        "grad_accum_steps": "micro_batch_size sets gradient accumulation",
    },
    "trainer.checkpoint": {
        "autoload_last_checkpoint": "mmgraph run always resumes from the latest checkpoint in model_dir",
        "checkpoint_root": "checkpoints go to model_dir", "checkpoint_name": "mmgraph names ckpt-N",
        "strict_version": "mmgraph checkpoints carry their own format",
    },
    "trainer.logging": {"log_level": _CS, "wsc_log_level": _CS, "enable_act_frequency": _CS},
    # callbacks ignored as a whole (name -> why)
    "trainer.callbacks": {
        "ComputeNorm": "the gradient norm is logged when max_gradient_norm is set",
        "GlobalFlags": _CS, "DebugArgsPath": _CS, "ModelZooParamsMetadata": "run metadata",
        "CheckLoss": "mmgraph stops on a non-finite loss", "RateProfiler": "mmgraph logs throughput",
        "DurationProfiler": "mmgraph logs step time", "FlopUtilization": "mmgraph compile reports utilization",
        "SavePerformanceData": _CS, "LogOptimizerParamGroup": "learning rate is logged",
    },
    # flags of ScopedTrainFlags / ScopedValidateFlags other than csx.performance.micro_batch_size
    "trainer.flags": {},
}


# Ignored keys that would change the model when set otherwise: accepted only at these values.
HARMLESS_ONLY: dict[tuple[str, str], tuple] = {
    ("vit", "attention_module"): ("aiayn_attention",),
    ("text_model", "attention_sliding_window_length"): (None,),
    ("text_model", "fixed_sparse_attention"): (None,),
    ("text_model", "attention_kernel"): (None, "default", "optimized"),
    ("optimizer", "adjust_learning_rate"): (None, {}),
}


def strip_ignored(scope: str, mapping: dict, where: str, out: list[tuple[str, str]],
                  refused: list[tuple[str, str]] | None = None) -> dict:
    """A copy of ``mapping`` without the keys ``scope`` ignores; each one recorded in ``out``.

    A key of ``HARMLESS_ONLY`` set to another value goes to ``refused`` (location, why).
    """
    table = IGNORED_KEYS.get(scope, {})
    kept = {}
    for key, value in mapping.items():
        loc = f"{where}.{key}" if where else str(key)
        allowed = HARMLESS_ONLY.get((scope, key))
        if key in table and allowed is not None and value not in allowed:
            if refused is not None:
                refused.append((loc, f"only {', '.join(repr(a) for a in allowed)} is supported "
                                     f"(got {value!r})"))
        elif key in table:
            out.append((loc, table[key]))
        else:
            kept[key] = value
    return kept
