"""Writing a merged Hugging Face causal LM as a GGUF file (the format llama.cpp, Ollama and LM Studio run).

The writer is the maintained `gguf` package's GGUFWriter; tensor names come from its tensor name map
for the architecture (Llama and Mistral as llama, Qwen2 as qwen2), and for llama the query/key rows
are permuted the way llama.cpp's converter does, weights and biases alike (HF stores rotary halves
split, llama.cpp's llama graph expects them interleaved; its qwen2 graph takes HF's layout). f16 and
q8_0 are made with `gguf.quants` (numpy). q4_K_M (a K-quant, which gguf-py
cannot make) is made from the f16 file by llama.cpp's own quantizer through llama-cpp-python's
`llama_model_quantize`, when that is installed.

The metadata mirrors a llama.cpp conversion (the default model's shipped GGUF has the same keys):
architecture hyperparameters, the gpt2-style BPE vocabulary (tokens, types, merges, special ids,
`tokenizer.ggml.pre` read from the tokenizer's pre-tokenizer), the run's chat template and, as EOS,
EOT and EOM, the ids tunesmith's generation stops at (models/tokens.py `stop_ids`); a tokenizer with
more stop ids than those three keys hold is refused, so llama.cpp never decodes past one the run stops at.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from tunesmith.errors import InputError, TunesmithError
from tunesmith.models.tokens import stop_ids

QUANTS = ("f16", "q8_0", "q4_K_M")
DEFAULT_QUANT = "q8_0"
# HF architecture -> gguf MODEL_ARCH name (llama.cpp's converter writes Mistral as llama). Others are
# refused by name (see check_architecture).
ARCHITECTURES = {"LlamaForCausalLM": "LLAMA", "MistralForCausalLM": "LLAMA", "Qwen2ForCausalLM": "QWEN2"}
# The gguf architectures whose query/key rows llama.cpp's converter permutes (its rotary pairs are
# interleaved); Qwen2 runs NeoX-style rotary on HF's own layout.
PERMUTED_ROTARY = {"LLAMA"}
# llama.cpp's name for a byte-level BPE pre-tokenizer, by the shape of the HF tokenizer's pre_tokenizer,
# and for a Split+ByteLevel one by the Split step's regex (Qwen2's, as its tokenizer.json and transformers'
# tokenization_qwen2.py hold it). Others (Llama 3's regex, SentencePiece tokenizers) are refused.
PRE_TOKENIZERS = {("ByteLevel",): "gpt-2", ("Digits", "ByteLevel"): "smollm"}
SPLIT_PATTERNS = {
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""":  # noqa: E501
        "qwen2",
}
SUPPORTED_TOKENIZERS = "byte-level BPE with the GPT-2 / SmolLM / Qwen2 pre-tokenizer"
LLAMA_FTYPE_Q4_K_M = 15  # llama.h: LLAMA_FTYPE_MOSTLY_Q4_K_M


def gguf_name(quant: str) -> str:
    """The file name an export of `quant` gets: model-<quant>.gguf."""
    return f"model-{quant}.gguf"


def check_architecture(model) -> str:
    """The gguf architecture name of a plain HF model, or a located InputError naming what is unsupported."""
    arch, config = type(model).__name__, model.config
    if arch not in ARCHITECTURES:
        raise InputError(f"GGUF export does not support the {arch} architecture", "--format gguf",
                         f"supported: {', '.join(ARCHITECTURES)}; use --format hf")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise InputError(f"GGUF export does not support rope scaling ({rope.get('rope_type')})", "--format gguf",
                         "use --format hf")
    # llama.cpp's llama and qwen2 graphs attend to the whole context: a window shorter than it would
    # give other answers past the window.
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    # A config with per-layer types says which layers slide (Qwen2: those from max_window_layers on).
    sliding = "sliding_attention" in (getattr(config, "layer_types", None) or ["sliding_attention"])
    if window and sliding and window < config.max_position_embeddings:
        raise InputError(f"GGUF export does not support sliding-window attention (window {window} < context "
                         f"{config.max_position_embeddings})", "--format gguf", "use --format hf")
    return ARCHITECTURES[arch]


def llama_cpp_available() -> bool:
    """Whether llama-cpp-python (llama.cpp's quantizer and reader) imports."""
    try:
        import llama_cpp  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken native build is as good as none
        return False
    return True


def write_gguf(model, tokenizer, path: Path, quant: str = DEFAULT_QUANT, name: str = "tunesmith-export") -> Path:
    """Write `model` (a plain HF causal LM) with `tokenizer`'s vocabulary and chat template to `path`.

    Raises:
        InputError: an architecture, pre-tokenizer, set of stop ids or quantization this writer does not
            support (raised before anything is written).
        TunesmithError: llama.cpp failed to quantize to q4_K_M (exit 1).
    """
    if quant not in QUANTS:
        raise InputError(f"unknown GGUF quantization '{quant}'", "--quant", f"supported: {', '.join(QUANTS)}")
    if quant == "q4_K_M":
        return _write_q4_k_m(model, tokenizer, Path(path), name)
    import gguf

    arch = getattr(gguf.MODEL_ARCH, check_architecture(model))
    pre, stops = pre_tokenizer(tokenizer), gguf_stops(tokenizer)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    try:
        _add_general(writer, name, quant)
        _add_hparams(writer, model.config)
        _add_vocab(writer, tokenizer, model.config.vocab_size, pre, stops)
        _add_tensors(writer, model, arch, quant)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    except OSError as e:
        if e.errno is None and "requested and" in str(e):  # numpy's tofile: a short write, no errno given
            raise OSError(errno.ENOSPC, f"a short write: {e}", str(path)) from e
        raise
    finally:
        writer.close()
    return Path(path)


def _write_q4_k_m(model, tokenizer, path: Path, name: str) -> Path:
    """q4_K_M: an f16 GGUF quantized by llama.cpp's own quantizer (llama-cpp-python)."""
    if not llama_cpp_available():
        raise InputError("--quant q4_K_M needs llama.cpp's quantizer, which is not installed", "--quant",
                         "pip install llama-cpp-python (or use --quant q8_0 / f16)")
    import llama_cpp

    f16 = path.with_name(path.name + ".f16.tmp")
    try:
        write_gguf(model, tokenizer, f16, "f16", name)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = LLAMA_FTYPE_Q4_K_M
        params.nthread = max(1, (os.cpu_count() or 1))
        log = path.with_name(path.name + ".log.tmp")
        with _stderr_to(log):  # llama.cpp logs every tensor from C; kept only to explain a failure
            status = llama_cpp.llama_model_quantize(str(f16).encode(), str(path).encode(), params)
        if status != 0:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no log"]
            # The f16 file was written by this module: llama.cpp refusing it is a defect (or a broken
            # llama.cpp build), not bad input.
            raise TunesmithError(f"llama.cpp could not quantize the model to q4_K_M (status {status}: {tail[0]})",
                                 "--quant q4_K_M", "report this as a bug (run with --debug), or use --quant q8_0")
    finally:
        f16.unlink(missing_ok=True)
        path.with_name(path.name + ".log.tmp").unlink(missing_ok=True)
    return path


@contextmanager
def _stderr_to(path: Path):
    """Send file descriptor 2 (what C libraries write to) to `path` for the duration."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "wb") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _add_general(writer, name: str, quant: str) -> None:
    import gguf

    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_hparams(writer, config) -> None:
    """The llama hyperparameters llama.cpp reads (names as its converter writes them)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_rope_dimension_count(head_dim)
    # llama.cpp assumes hidden_size / heads per head unless these say otherwise (models with head_dim set).
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)


def pre_tokenizer(tokenizer) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for the tokenizer's byte-level BPE pre-tokenizer, read from its
    structure (so the GGUF splits text as the run's tokenizer did); InputError when it is not one."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    name = _pre_name(steps) if model.get("type") == "BPE" else None
    # llama.cpp normalises nothing: a normaliser other than NFC (Qwen2's, a no-op on NFC text, which
    # most text is) would change what the model sees.
    normalizer = (spec.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC"):
        raise InputError(f"GGUF export cannot carry the tokenizer's {normalizer} normalizer (llama.cpp "
                         "normalises nothing)", "--format gguf", "use --format hf")
    if name is None:
        shape = "+".join(str(s.get("type")) for s in steps if s) or "none"
        raise InputError(f"GGUF export supports {SUPPORTED_TOKENIZERS} only (this tokenizer: "
                         f"{model.get('type')} with pre-tokenizer {shape})", "--format gguf", "use --format hf")
    return name


def _pre_name(steps: list[dict]) -> str | None:
    """llama.cpp's name for these pre-tokenizer steps (tokenizer.json form), or None."""
    shape = tuple(s.get("type") for s in steps)
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    if shape in PRE_TOKENIZERS:  # ByteLevel splitting with GPT-2's own regex (and SmolLM's single digits)
        plain = (all(s.get("use_regex", True) for s in byte_level)
                 and all(s.get("individual_digits") for s in steps if s.get("type") == "Digits"))
        return PRE_TOKENIZERS[shape] if plain else None
    if shape == ("Split", "ByteLevel") and not byte_level[0].get("use_regex", True):
        split = steps[0]  # the regex does all the splitting; ByteLevel only maps bytes to characters
        if split.get("behavior") == "Isolated" and not split.get("invert"):
            return SPLIT_PATTERNS.get((split.get("pattern") or {}).get("Regex"))
    return None


def _add_vocab(writer, tokenizer, vocab_size: int, pre: str, stops: list[int]) -> None:
    """Tokens, types, merges, special ids, chat template; EOS/EOT/EOM = `stops` (gguf_stops)."""
    import gguf

    tokens, types = vocab_tokens(tokenizer, vocab_size)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    _add_stops(writer, stops)
    for key, tid in ((gguf.Keys.Tokenizer.BOS_ID, tokenizer.bos_token_id),
                     (gguf.Keys.Tokenizer.UNK_ID, tokenizer.unk_token_id),
                     (gguf.Keys.Tokenizer.PAD_ID, tokenizer.pad_token_id)):
        if tid is not None:
            writer.add_uint32(key, tid)
    probe = tokenizer("a")["input_ids"]  # does the tokenizer itself put BOS first? (chat templates write their own)
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id])
    writer.add_add_space_prefix(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def gguf_stops(tokenizer) -> list[int]:
    """The ids generation stops at (models/tokens.py `stop_ids`) as the GGUF stores them: EOS first,
    then EOT and EOM (llama.cpp ends generation at all three). InputError for a tokenizer with none or
    with more than those three keys hold."""
    stops = stop_ids(tokenizer)
    if not stops:
        raise InputError("the tokenizer has no EOS or end-of-turn token to stop generation at", "--format gguf",
                         "use --format hf")
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else stops[0]
    ordered = [eos, *(i for i in stops if i != eos)]
    if len(ordered) > 3:
        names = ", ".join(tokenizer.convert_ids_to_tokens(ordered))
        raise InputError(f"the tokenizer stops generation at {len(ordered)} tokens ({names}); a GGUF holds at "
                         "most 3 (EOS, EOT, EOM)", "--format gguf", "use --format hf")
    return ordered


def _add_stops(writer, stops: list[int]) -> None:
    for add, tid in zip((writer.add_eos_token_id, writer.add_eot_token_id, writer.add_eom_token_id), stops):
        add(tid)


def vocab_tokens(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """(token strings by id, gguf token types): special added tokens CONTROL, other added tokens
    USER_DEFINED, the BPE vocabulary NORMAL, ids the tokenizer lacks UNUSED placeholders."""
    import gguf

    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(reverse[i])
        if i in added:
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _add_tensors(writer, model, arch, quant: str) -> None:
    """Every weight under its gguf name; 1-D tensors (norms) in f32, matrices in the export's type."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    arch_name = ARCHITECTURES[type(model).__name__]
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
            continue  # llama.cpp uses token_embd for the output when output.weight is absent
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise InputError(f"GGUF export cannot map the tensor {hf_name}", "--format gguf", "use --format hf")
        data = tensor.detach().float().cpu().numpy()
        permuted = arch_name in PERMUTED_ROTARY
        if permuted and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = permute_rotary(data, n_head, n_head)
        elif permuted and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = permute_rotary(data, n_head, n_kv)
        _add_tensor(writer, name, data, quant)


def _add_tensor(writer, name: str, data: np.ndarray, quant: str) -> None:
    import gguf

    if data.ndim == 1:
        writer.add_tensor(name, data.astype(np.float32))
    elif quant == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        q = gguf.quants.quantize(data.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:  # f16, and q8_0 rows that are not a whole number of 32-value blocks
        writer.add_tensor(name, data.astype(np.float16))


def permute_rotary(weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """Reorder query/key rows (a weight matrix or a bias vector) from HF's split rotary halves to
    llama.cpp's interleaved pairs (the permutation llama.cpp's converter applies to llama q_proj/k_proj
    weights and biases)."""
    heads = n_head_kv if n_head_kv != n_head else n_head
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))
