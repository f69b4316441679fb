"""Hugging Face Llama-family checkpoints in and out of tinylm: `load_hf` and `save_hf`.

A Hugging Face model folder holds config.json, the weights in one or more *.safetensors
files (several are listed in model.safetensors.index.json) and, usually, tokenizer.json.
tinylm's GPT is a Llama: pre-norm RMSNorm blocks, attention with RoPE, a SwiGLU MLP. So a
Llama checkpoint maps onto it name for name, with no arithmetic on the weights:

    model.embed_tokens                  -> tok_emb
    model.layers.i.input_layernorm      -> blocks.i.attn_norm
    model.layers.i.self_attn.q/k/v/o    -> blocks.i.attn.q/k/v/o_proj
    model.layers.i.post_attention_layernorm -> blocks.i.mlp_norm
    model.layers.i.mlp.gate/up/down     -> blocks.i.mlp.gate/up/down
    model.norm, lm_head                 -> norm, lm_head

RoPE layout: Meta's original Llama code rotates interleaved channel pairs (0,1), (2,3), ...
Hugging Face's conversion script permutes the rows of q_proj and k_proj so that its code can
rotate the half-split pairs (i, i + head_dim/2). tinylm's `rope_tables`/`rotate_half` use
that same half-split layout, so HF weights load as they are (the tests check the logits
against transformers). A checkpoint in Meta's layout would need that permutation; it is not
a Hugging Face folder and is not read here.

What tinylm does not implement is refused with a message naming the config field and the
fix, never silently ignored: RoPE scaling other than Llama 3's ("llama3", supported), a
sliding window shorter than the context, attention/MLP biases (Qwen2's q/k/v biases
included), a head_dim other than hidden_size / num_attention_heads, an activation other
than silu. Loading never runs pickled
code: only safetensors are read (pytorch_model.bin is refused), and the memory the weights
need is checked before anything is allocated.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from tinylm.checkpoint import _swap_into_place
from tinylm.config import GPTConfig
from tinylm.model import GPT
from tinylm.tokenizer import BPETokenizer
from tinylm.util import check_memory as util_check_memory

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"

# model_type -> what the architecture adds on top of Llama (checked in _check_config).
SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
# Config fields that only matter to training or to HF's own code paths.


class HFImportError(ValueError):
    """A Hugging Face folder or config that tinylm cannot load (the message says why and how)."""


# ----------------------------------------------------------------------------- config


def _check_config(hf: dict[str, Any], source: str) -> None:
    """Refuse every config field whose value tinylm does not implement, naming it and the fix."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_TYPES:
        raise HFImportError(
            f"{source}: model_type={model_type!r} is not a Llama-family architecture tinylm "
            f"can load (supported: {SUPPORTED_TYPES}, i.e. Llama 2/3, SmolLM/SmolLM2, "
            "TinyLlama, Mistral without sliding window); fix: pick such a model."
        )
    if model_type == "qwen2":
        raise HFImportError(
            f"{source}: Qwen2 adds biases to q_proj/k_proj/v_proj (always on, no config field "
            "turns them off) and tinylm's attention has no biases; fix: pick a Llama-family "
            "model without biases (e.g. SmolLM2, TinyLlama, Llama 3.2)."
        )
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise HFImportError(
            f"{source}: hidden_act={act!r}, but tinylm's MLP is SwiGLU with silu; fix: pick a "
            "model with hidden_act='silu'."
        )
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field):
            raise HFImportError(
                f"{source}: {field}=true, but tinylm's linear layers have no biases; fix: pick "
                f"a model with {field}=false."
            )
    _rope(hf, source)  # refuses RoPE scalings tinylm lacks
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim * heads != hidden:
        raise HFImportError(
            f"{source}: head_dim={head_dim}, but tinylm's heads have hidden_size / "
            f"num_attention_heads = {hidden} / {heads} = {hidden // heads} channels each; "
            "fix: pick a model whose head_dim equals that (or none is set)."
        )


_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _rope(hf: dict[str, Any], source: str) -> tuple[float, dict[str, Any] | None]:
    """(theta, GPTConfig.rope_scaling) from rope_theta + rope_scaling or (transformers 5)
    rope_parameters. Plain RoPE and Llama 3's scaling are implemented; others are refused."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if kind == "default":
        return theta, None
    if kind == "llama3" and all(k in scaling for k in _LLAMA3_KEYS):
        return theta, {"rope_type": "llama3", **{k: scaling[k] for k in _LLAMA3_KEYS}}
    field = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    raise HFImportError(
        f"{source}: {field}={scaling} ({kind!r} scaling of the RoPE frequencies) is not "
        "implemented in tinylm (it has plain RoPE and Llama 3's 'llama3' scaling); fix: pick "
        "a model with one of those (SmolLM2, TinyLlama, Llama 2, Llama 3.x), or add that "
        "scaling to tinylm.layers.rope_tables and here."
    )


def _context_length(hf: dict[str, Any], context_length: int | None, source: str) -> int:
    """The context to build the model with: the config's unless a shorter one is asked for."""
    trained = int(hf.get("max_position_embeddings", 2048))
    ctx = trained if context_length is None else int(context_length)
    if not 1 <= ctx <= trained:
        raise HFImportError(
            f"context_length={context_length} is outside 1 .. max_position_embeddings="
            f"{trained} of {source}; fix: pass a context_length in that range."
        )
    window = hf.get("sliding_window")
    uses_window = hf.get("use_sliding_window", True)  # Qwen2 switches it with this flag
    if window is not None and uses_window and window < ctx:
        raise HFImportError(
            f"{source}: sliding_window={window} < context {ctx}: beyond {window} tokens each "
            "token may only see the last sliding_window keys, which tinylm's attention does "
            f"not implement; fix: load_hf(..., context_length={window}) (exact within that "
            "context) or pick a model with sliding_window=null."
        )
    return ctx


def config_from_hf(
    hf: dict[str, Any], context_length: int | None = None, source: str = "config"
) -> GPTConfig:
    """The GPTConfig of a Hugging Face config.json dict (after refusing what tinylm lacks)."""
    _check_config(hf, source)
    heads = hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads") or heads
    attention = "mha" if kv_heads == heads else ("mqa" if kv_heads == 1 else "gqa")
    return GPTConfig(
        vocab_size=hf["vocab_size"],
        context_length=_context_length(hf, context_length, source),
        n_layer=hf["num_hidden_layers"],
        n_head=heads,
        n_embd=hf["hidden_size"],
        attention=attention,
        n_kv_head=kv_heads,
        mlp="dense",
        mlp_hidden=hf["intermediate_size"],
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=_rope(hf, source)[0],
        rope_scaling=_rope(hf, source)[1],
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def config_to_hf(config: GPTConfig, dtype: torch.dtype, eos_token_id: int | None) -> dict[str, Any]:
    """The LlamaForCausalLM config.json dict of a tinylm GPTConfig (dense MHA/GQA/MQA only)."""
    if config.attention == "mla" or config.mlp != "dense":
        raise HFImportError(
            f"save_hf: attention={config.attention!r}, mlp={config.mlp!r} has no "
            "LlamaForCausalLM equivalent (it has dense SwiGLU MLPs and MHA/GQA/MQA attention); "
            "fix: export a model with attention in ('mha', 'gqa', 'mqa') and mlp='dense'."
        )
    if config.position != "rope" or config.norm_placement != "pre":
        raise HFImportError(
            f"save_hf: position={config.position!r}, norm_placement={config.norm_placement!r} "
            "(chapter 03's ablation switches) has no LlamaForCausalLM equivalent (RoPE, "
            "pre-norm); fix: export a model trained with the defaults."
        )
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.mlp_hidden,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.context_length,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None if config.rope_scaling is None else dict(config.rope_scaling),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": None,
        "eos_token_id": eos_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


# ----------------------------------------------------------------------------- weight names

_HF_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn.q_proj.weight",
    "self_attn.k_proj.weight": "attn.k_proj.weight",
    "self_attn.v_proj.weight": "attn.v_proj.weight",
    "self_attn.o_proj.weight": "attn.o_proj.weight",
    "post_attention_layernorm.weight": "mlp_norm.weight",
    "mlp.gate_proj.weight": "mlp.gate.weight",
    "mlp.up_proj.weight": "mlp.up.weight",
    "mlp.down_proj.weight": "mlp.down.weight",
}
_HF_TOP = {
    "model.embed_tokens.weight": "tok_emb.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")


def hf_to_tinylm_name(name: str) -> str | None:
    """The tinylm state-dict name of an HF Llama weight name (None if it has none)."""
    if name in _HF_TOP:
        return _HF_TOP[name]
    m = _LAYER_RE.fullmatch(name)
    if m and m.group(2) in _HF_LAYER:
        return f"blocks.{m.group(1)}.{_HF_LAYER[m.group(2)]}"
    return None


def tinylm_to_hf_names(n_layer: int) -> dict[str, str]:
    """{tinylm name: HF Llama name} for every weight of an n_layer dense model."""
    names = {v: k for k, v in _HF_TOP.items()}
    for i in range(n_layer):
        for hf_name, ours in _HF_LAYER.items():
            names[f"blocks.{i}.{ours}"] = f"model.layers.{i}.{hf_name}"
    return names


# ----------------------------------------------------------------------------- files


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder (via the shard index if there is one)."""
    index = folder / WEIGHTS_INDEX
    if index.exists():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = [folder / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise HFImportError(
                f"{index} lists shard(s) {missing} that are not in the folder; fix: download "
                "the complete model (all shards)."
            )
        return files
    if (folder / WEIGHTS).exists():
        return [folder / WEIGHTS]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(
        p.name for p in folder.glob("*.pt*")
    )
    if pickles:
        raise HFImportError(
            f"{folder} has only pickled weights {pickles[:3]}; tinylm never loads pickles "
            "(loading one can run arbitrary code). Fix: use a model published as "
            "*.safetensors, or convert it once in a trusted environment (transformers: "
            "AutoModelForCausalLM.from_pretrained(folder).save_pretrained(out, "
            "safe_serialization=True))."
        )
    raise HFImportError(
        f"{folder} has no *.safetensors weights; fix: point load_hf at a Hugging Face model "
        "folder (config.json + model*.safetensors)."
    )


def _tensor_sizes(files: list[Path]) -> dict[str, tuple[Path, int]]:
    """{name: (file, numel)} from the safetensors headers, reading no tensor data."""
    sizes: dict[str, tuple[Path, int]] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                numel = 1
                for dim in f.get_slice(name).get_shape():
                    numel *= dim
                sizes[name] = (path, numel)
    return sizes


def check_memory(nbytes: int, what: str) -> None:
    """Raise MemoryError before allocating `nbytes` if they do not fit (tinylm.util's check)."""
    util_check_memory(
        nbytes, what, "load with dtype=torch.bfloat16 (half of float32), free memory, or pick a "
        "smaller model"
    )  # fmt: skip


def hf_folder(
    name_or_folder: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None = None,
    endpoint: str | None = None,
) -> Path:
    """The local folder of a model: a folder as it is; a hub id ("owner/name") from the HF
    cache, else downloaded with huggingface_hub (config, safetensors and tokenizer files only).
    """
    folder = Path(name_or_folder).expanduser()
    if folder.is_dir():
        return folder
    name = str(name_or_folder)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        raise HFImportError(
            f"{name!r} is neither a folder nor a Hugging Face hub id ('owner/name'); fix: "
            "pass the path of a model folder (config.json + *.safetensors) or a hub id."
        )
    from huggingface_hub import snapshot_download  # optional path: only for hub ids

    patterns = ["*.json", "*.safetensors", "tokenizer*"]
    try:  # the cache first: no network at all when the model is there
        return Path(
            snapshot_download(
                name, allow_patterns=patterns, cache_dir=cache_dir, local_files_only=True
            )
        )
    except Exception:  # noqa: BLE001 - not cached (any reason): try the network next
        pass
    try:
        return Path(
            snapshot_download(name, allow_patterns=patterns, cache_dir=cache_dir, endpoint=endpoint)
        )
    except Exception as err:  # noqa: BLE001 - offline, unknown id, gated: one clear message
        raise HFImportError(
            f"could not get {name!r} from the Hugging Face Hub ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'no details'}). It is not in the local "
            "cache and the download failed: offline, a misspelt id, or a gated model. Fix: "
            "download it once while online (`hf download "
            f"{name}`, logging in first for gated models) or pass a local folder."
        ) from None


# ----------------------------------------------------------------------------- tokenizer


class HFTokenizer:
    """A `tokenizers` tokenizer behind BPETokenizer's interface (encode, decode, vocab_size).

    encode adds no BOS/EOS (as BPETokenizer.encode); text that spells a special token maps
    to its id, as in BPETokenizer.
    """

    def __init__(self, tokenizer: Tokenizer, config: dict[str, Any] | None = None) -> None:
        self.tokenizer = tokenizer
        self.config = dict(config or {})
        self.special_tokens = {
            t.content: i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special
        }

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> HFTokenizer:
        """Read tokenizer.json (and tokenizer_config.json if present) from a folder."""
        folder = Path(folder)
        config_path = folder / TOKENIZER_CONFIG
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
        return cls(Tokenizer.from_file(str(folder / TOKENIZER)), config)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no BOS/EOS added)."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids (a list, or a torch/numpy array)."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def _token_id(self, key: str) -> int | None:
        token = self.config.get(key)
        if isinstance(token, dict):  # older configs store AddedToken dicts
            token = token.get("content")
        return None if token is None else self.tokenizer.token_to_id(token)

    @property
    def eot_id(self) -> int | None:
        """Id of the end-of-sequence token (tokenizer_config's eos_token), or None."""
        return self._token_id("eos_token")

    @property
    def bos_id(self) -> int | None:
        """Id of the beginning-of-sequence token (tokenizer_config's bos_token), or None."""
        return self._token_id("bos_token")

    def save(self, folder: str | os.PathLike[str]) -> None:
        """Write tokenizer.json and tokenizer_config.json into `folder`."""
        folder = Path(folder)
        self.tokenizer.save(str(folder / TOKENIZER))
        (folder / TOKENIZER_CONFIG).write_text(
            json.dumps(self.config, indent=2) + "\n", encoding="utf-8"
        )

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, eot_id={self.eot_id})"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which byte-level BPE vocabularies are spelt in.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes are shifted to 256+.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping, shifted = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


def bpe_to_hf(tokenizer: BPETokenizer) -> HFTokenizer:
    """tinylm's BPETokenizer as an equivalent `tokenizers` byte-level BPE (same ids).

    Ids 0..255 are the bytes, 256+ the merges in order (the lowest id merges first in both),
    then the special tokens. The pre-split regex becomes a Split pre-tokenizer.
    """
    to_char = _bytes_to_unicode()

    def spell(token_id: int) -> str:
        return "".join(to_char[b] for b in tokenizer.token_bytes(token_id))

    n_regular = tokenizer.vocab_size - len(tokenizer.special_tokens)
    vocab = {spell(i): i for i in range(n_regular)}
    merges = [(spell(a), spell(b)) for a, b in tokenizer.merges]
    for special, token_id in tokenizer.special_tokens.items():
        if special in vocab:
            raise HFImportError(
                f"special token {special!r} spells the same string as regular token "
                f"{vocab[special]}; the HF vocabulary cannot hold both. Fix: rename the special "
                "token."
            )
        vocab[special] = token_id
    hf = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(tokenizer.pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(list(tokenizer.special_tokens))
    eot = tokenizer.eot_id
    eos = None if eot is None else tokenizer.token_bytes(eot).decode("utf-8")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": eos,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    return HFTokenizer(hf, config)


# ----------------------------------------------------------------------------- load / save


def load_hf(
    name_or_folder: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
    context_length: int | None = None,
    device: torch.device | str = "cpu",
    cache_dir: str | os.PathLike[str] | None = None,
    endpoint: str | None = None,
) -> tuple[GPT, HFTokenizer | None]:
    """Load a Hugging Face Llama-family model into tinylm's GPT; return (model, tokenizer).

    name_or_folder: a local folder (config.json + *.safetensors, sharded or not) or a hub id
        ("owner/name"), taken from the HF cache or downloaded with huggingface_hub (the error
        says so clearly when offline and not cached).
    dtype: the weights' dtype in memory (float32 for CPU compute and exact parity).
    context_length: build for a shorter context than max_position_embeddings (smaller RoPE
        tables and default KV caches; also makes a Mistral sliding window moot).
    The tokenizer is None when the folder has no tokenizer.json. The model is in eval mode.
    """
    folder = hf_folder(name_or_folder, cache_dir, endpoint)
    config_path = folder / CONFIG
    if not config_path.exists():
        raise HFImportError(
            f"{folder} has no {CONFIG}; fix: point load_hf at a Hugging Face model folder "
            "(config.json + model*.safetensors)."
        )
    hf_config = json.loads(config_path.read_text(encoding="utf-8"))
    config = config_from_hf(hf_config, context_length, source=str(config_path))

    files = _weight_files(folder)
    sizes = _tensor_sizes(files)
    element = torch.empty((), dtype=dtype).element_size()
    check_memory(sum(n for _, n in sizes.values()) * element, f"loading {folder.name}")

    # Building the model allocates every parameter once (randomly initialised, then
    # overwritten); each tensor is then copied in from the file one at a time.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = GPT(config)
    finally:
        torch.set_default_dtype(previous)
    params = model.state_dict()
    loaded, unexpected = set(), []
    for name, (path, _) in sizes.items():
        ours = hf_to_tinylm_name(name)
        if config.tie_embeddings and ours == "lm_head.weight":
            continue  # tied: HF too uses the embedding as the head, whatever the file holds
        if ours is None or ours not in params:
            unexpected.append(name)
            continue
        with safe_open(str(path), framework="pt") as f:
            tensor = f.get_tensor(name)
        if tuple(tensor.shape) != tuple(params[ours].shape):
            raise HFImportError(
                f"{path.name}: {name} has shape {tuple(tensor.shape)} but config.json implies "
                f"{tuple(params[ours].shape)}; fix: the config and weights do not belong together."
            )
        with torch.no_grad():
            params[ours].copy_(tensor.to(dtype))
        loaded.add(ours)
    if unexpected:
        raise HFImportError(
            f"{folder}: weights {unexpected[:5]} have no place in tinylm's Llama (biases or an "
            "architecture config.json does not describe?); fix: pick a plain Llama-family model."
        )
    if config.tie_embeddings and "tok_emb.weight" in loaded:
        loaded.add("lm_head.weight")  # the same tensor
    missing = sorted(set(params) - loaded)
    if missing:
        hint = (
            " (lm_head.weight is absent: is tie_word_embeddings missing from config.json?)"
            if missing == ["lm_head.weight"]
            else ""
        )
        raise HFImportError(
            f"{folder}: weights {missing[:5]} are missing from the safetensors files{hint}; "
            "fix: download the complete model."
        )
    model = model.to(device=device, dtype=dtype).eval()  # the RoPE tables too
    tokenizer = None
    if (folder / TOKENIZER).exists():
        tokenizer = HFTokenizer.load(folder)
    elif (folder / "tokenizer.model").exists():
        warnings.warn(
            f"{folder} has only a SentencePiece tokenizer.model and no tokenizer.json, so no "
            "tokenizer is returned; fix: save it once as tokenizer.json with transformers "
            "(AutoTokenizer.from_pretrained(folder).save_pretrained(folder)).",
            stacklevel=2,
        )
    return model, tokenizer


def save_hf(
    model: GPT,
    tokenizer: BPETokenizer | HFTokenizer | None,
    folder: str | os.PathLike[str],
    dtype: torch.dtype | None = None,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write a tinylm GPT (and tokenizer) as a Hugging Face LlamaForCausalLM folder.

    transformers' AutoModelForCausalLM.from_pretrained(folder) reads it back. dtype: the
    saved weights' dtype (default: the model's). max_shard_bytes: split the weights into
    several files with a model.safetensors.index.json, as large HF models are. The folder
    is written atomically (a temporary sibling swapped into place).
    """
    if not isinstance(model, GPT):
        raise TypeError(f"save_hf takes a tinylm GPT, got {type(model).__name__}")
    config = model.config
    weight = model.lm_head.weight
    if not isinstance(weight, torch.nn.Parameter) or any(
        type(m).__name__.startswith("Quant") for m in model.modules()
    ):
        raise HFImportError(
            "save_hf: the model has quantised layers; HF Llama folders hold float weights. "
            "Fix: export the float model (quantise after loading it back)."
        )
    dtype = dtype or weight.dtype
    if isinstance(tokenizer, BPETokenizer):
        tokenizer = bpe_to_hf(tokenizer)
    eos = None if tokenizer is None else tokenizer.eot_id
    hf_config = config_to_hf(config, dtype, eos)

    names = tinylm_to_hf_names(config.n_layer)
    state = model.state_dict()
    tensors = {}
    for ours, hf_name in names.items():
        if config.tie_embeddings and ours == "lm_head.weight":
            continue  # tied: HF stores the embedding once and ties lm_head to it
        tensors[hf_name] = state[ours].detach().to("cpu", dtype).contiguous()

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    shards = _shard(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], tmp / WEIGHTS, metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, tmp / file, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    (tmp / CONFIG).write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
    generation = {"eos_token_id": eos} if eos is not None else {}
    (tmp / "generation_config.json").write_text(json.dumps(generation) + "\n", encoding="utf-8")
    if tokenizer is not None:
        tokenizer.config.setdefault("model_max_length", config.context_length)
        tokenizer.save(tmp)
    _swap_into_place(tmp, folder)
    return folder


def _shard(
    tensors: dict[str, torch.Tensor], max_bytes: int | None
) -> list[dict[str, torch.Tensor]]:
    """Split tensors, in order, into groups of at most max_bytes (one group if None)."""
    if max_bytes is None:
        return [tensors]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards
