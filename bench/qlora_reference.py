"""The model both GPU training references start from (bench/gpu_train_reference.py and
bench/gpu_epoch_reference.py): the QLoRA recipe of transformers + peft + bitsandbytes.

BitsAndBytesConfig(load_in_4bit, nf4, double quant, compute dtype bfloat16), dtype bfloat16, on
cuda:0; optionally transformers' gradient checkpointing (non-reentrant, inputs requiring grad); a
fresh peft LoRA (rank, alpha, dropout 0, all 7 projections) or a saved adapter made trainable.
"""

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def qlora_model(path, rank, alpha, gradient_checkpointing=False, init_adapter=None):
    """Returns (model in train mode, its trainable parameters)."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    torch.manual_seed(0)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=q, dtype=torch.bfloat16,
                                                 device_map={"": 0})
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if init_adapter:
        model = PeftModel.from_pretrained(model, init_adapter, is_trainable=True)
    else:
        model = get_peft_model(model, LoraConfig(
            r=rank, lora_alpha=alpha, lora_dropout=0.0, task_type="CAUSAL_LM",
            target_modules=TARGET_MODULES))
    model.train()
    return model, [p for p in model.parameters() if p.requires_grad]
