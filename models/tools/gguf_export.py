"""GGUF (llama family) -> optimum-layout fp32 ONNX + Hugging Face tokenizer files.

Usage: models/export-onnx MODEL.gguf OUT_DIR [--layout optimum|genai] [--check PROMPT]

Every tensor type the `gguf` package can dequantize is accepted. The tokenizer files are built
from the GGUF's own metadata, never from a Hub tokenizer: BOS only where the GGUF adds one, the
GGUF's pre-tokenizer (digit splitting included), its special tokens and chat template.
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))


def die(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    from gguf import GGUFValueType

    t = f.types[0]
    if t == GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8")
    if t == GGUFValueType.ARRAY:
        sub = f.types[1]
        if sub == GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8", errors="replace") for i in f.data]
        return [f.parts[i].tolist()[0] for i in f.data]
    return f.parts[f.data[0]].tolist()[0]


# llama.cpp pre-tokenizer names -> Hugging Face pre-tokenizer configs with the same regexes.
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def pre_tokenizer(pre):
    from tokenizers import Regex, pre_tokenizers as pt

    if pre in ("smollm", "starcoder", "refact", "codeshell"):
        return pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre in ("gpt2", "gpt-2", "default", "olmo", "mpt"):
        return pt.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("llama-bpe", "llama3", "smaug-bpe"):
        return pt.Sequence([pt.Split(Regex(LLAMA3_REGEX), behavior="isolated"), pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre == "qwen2":
        return pt.Sequence([pt.Split(Regex(QWEN2_REGEX), behavior="isolated"), pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    die(f"GGUF pre-tokenizer '{pre}' is not supported by this exporter (supported: smollm, gpt2, llama-bpe, qwen2)")


def build_tokenizer(reader):
    from tokenizers import AddedToken, Tokenizer, decoders, models

    model = field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        die(f"tokenizer model '{model}' is not supported (byte-level BPE 'gpt2' only)")
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges")]
    vocab = {t: i for i, t in enumerate(tokens)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tk.pre_tokenizer = pre_tokenizer(field(reader, "tokenizer.ggml.pre", "default"))
    tk.decoder = decoders.ByteLevel()
    specials = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3]
    users = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == 4]
    if specials:
        tk.add_special_tokens(specials)
    if users:
        tk.add_tokens(users)
    return tk, tokens


def load_weights(reader):
    from gguf.quants import dequantize

    from llama_onnx import Weights

    arch = field(reader, "general.architecture")
    if arch not in ("llama",):
        die(f"architecture '{arch}' is not supported (llama only)")
    t = {x.name: x for x in reader.tensors}

    def get(name):
        x = t.get(name)
        if x is None:
            die(f"tensor {name} is missing")
        try:
            a = dequantize(x.data, x.tensor_type)
        except (NotImplementedError, ValueError) as e:
            die(f"tensor {name} has type {x.tensor_type.name} that gguf cannot dequantize ({e})")
        return np.asarray(a, dtype=np.float32).reshape([int(d) for d in reversed(x.shape)])

    n_layer = field(reader, f"{arch}.block_count")
    cfg = {
        "hidden": field(reader, f"{arch}.embedding_length"),
        "n_heads": field(reader, f"{arch}.attention.head_count"),
        "n_kv_heads": field(reader, f"{arch}.attention.head_count_kv") or field(reader, f"{arch}.attention.head_count"),
        "rope_theta": float(field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "rms_eps": float(field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "context": field(reader, f"{arch}.context_length", 2048),
        "intermediate": field(reader, f"{arch}.feed_forward_length"),
    }
    cfg["head_dim"] = cfg["hidden"] // cfg["n_heads"]
    cfg["max_position"] = min(cfg["context"], 8192)
    layers = []
    for i in range(n_layer):
        p = f"blk.{i}."
        layers.append({
            "attn_norm": get(p + "attn_norm.weight"), "wq": get(p + "attn_q.weight"), "wk": get(p + "attn_k.weight"),
            "wv": get(p + "attn_v.weight"), "wo": get(p + "attn_output.weight"), "ffn_norm": get(p + "ffn_norm.weight"),
            "w_gate": get(p + "ffn_gate.weight"), "w_up": get(p + "ffn_up.weight"), "w_down": get(p + "ffn_down.weight"),
        })
    embed = get("token_embd.weight")
    lm_head = get("output.weight") if "output.weight" in t else embed
    cfg["vocab"] = embed.shape[0]
    return Weights(embed, layers, get("output_norm.weight"), lm_head, cfg), cfg, n_layer


def write_side_files(reader, out, cfg, n_layer, tk, tokens, layout):
    bos = field(reader, "tokenizer.ggml.bos_token_id")
    eos = field(reader, "tokenizer.ggml.eos_token_id")
    add_bos = bool(field(reader, "tokenizer.ggml.add_bos_token", False))
    tk.save(os.path.join(out, "tokenizer.json"))
    tok_cfg = {
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "bos_token": tokens[bos] if bos is not None else None,
        "eos_token": tokens[eos] if eos is not None else None,
        "model_max_length": cfg["context"],
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
    }
    tpl = field(reader, "tokenizer.chat_template")
    if tpl:
        tok_cfg["chat_template"] = tpl
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(tok_cfg, f, indent=2, ensure_ascii=False)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": cfg["hidden"], "num_attention_heads": cfg["n_heads"], "num_key_value_heads": cfg["n_kv_heads"],
        "num_hidden_layers": n_layer, "intermediate_size": cfg["intermediate"], "rms_norm_eps": cfg["rms_eps"],
        "rope_theta": cfg["rope_theta"], "max_position_embeddings": cfg["context"], "vocab_size": cfg["vocab"],
        "bos_token_id": bos, "eos_token_id": eos, "torch_dtype": "float32",
    }
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": bos, "eos_token_id": eos}, f, indent=2)
    if layout == "genai":
        genai = {"model": {"type": "llama", "context_length": cfg["context"], "vocab_size": cfg["vocab"],
                           "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": eos,
                           "decoder": {"filename": "model.onnx", "num_hidden_layers": n_layer,
                                       "num_attention_heads": cfg["n_heads"], "num_key_value_heads": cfg["n_kv_heads"],
                                       "head_size": cfg["head_dim"], "hidden_size": cfg["hidden"]}},
                 "search": {"past_present_share_buffer": True, "max_length": cfg["context"]}}
        with open(os.path.join(out, "genai_config.json"), "w") as f:
            json.dump(genai, f, indent=2)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf")
    ap.add_argument("out")
    ap.add_argument("--layout", choices=["optimum", "genai"], default="optimum")
    ap.add_argument("--check", metavar="PROMPT", help="run the export with onnxruntime and print top-5 after PROMPT")
    a = ap.parse_args()
    from gguf import GGUFReader

    import onnx
    from llama_onnx import build

    if not os.path.isfile(a.gguf):
        die(f"{a.gguf} not found")
    with open(a.gguf, "rb") as f:
        if f.read(4) != b"GGUF":
            die(f"{a.gguf} is not a GGUF file")
    try:
        reader = GGUFReader(a.gguf)
    except Exception as e:  # the gguf package raises plain exceptions on damaged files
        if "GGMLQuantizationType" in str(e):
            die(f"{a.gguf} holds a tensor type the gguf package does not know ({e}); requantize the model")
        die(f"{a.gguf} is truncated or corrupt: {e}")
    tk, tokens = build_tokenizer(reader)
    weights, cfg, n_layer = load_weights(reader)
    model = build(weights, a.layout)
    os.makedirs(a.out, exist_ok=True)
    tmp = os.path.join(a.out, ".model.onnx.partial")
    onnx.save(model, tmp)
    os.replace(tmp, os.path.join(a.out, "model.onnx"))
    write_side_files(reader, a.out, cfg, n_layer, tk, tokens, a.layout)
    print(a.out)
    if a.check:
        import onnxruntime as ort

        ids = tk.encode(a.check, add_special_tokens=False).ids
        s = ort.InferenceSession(os.path.join(a.out, "model.onnx"), providers=["CPUExecutionProvider"])
        feed = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
        if a.layout == "optimum":
            feed["position_ids"] = np.arange(len(ids), dtype=np.int64)[None]
        for i in range(n_layer):
            for kv in ("key", "value"):
                feed[f"past_key_values.{i}.{kv}"] = np.zeros((1, cfg["n_kv_heads"], 0, cfg["head_dim"]), np.float32)
        logits = s.run(["logits"], feed)[0][0, -1]
        top = np.argsort(-logits)[:5]
        print("ids", ids)
        print("top-5", [(int(t), tk.decode([int(t)]), float(logits[t])) for t in top])


if __name__ == "__main__":
    main()
