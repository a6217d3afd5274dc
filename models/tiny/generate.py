"""Writes the tiny twin models, deterministically from a seed.

One tiny llama-architecture model (byte-level BPE of a few hundred tokens trained on
models/corpus/genesis-kjv.txt, hidden 64, 2 layers, 4 heads, 2 KV heads, RoPE, RMSNorm,
SwiGLU) in every form the engines need:

  tiny-f32.gguf, tiny-q8_0.gguf        llama.cpp
  optimum/   model.onnx (+ tokenizer and config files)        ONNX, optimum layout, fp32
  genai/     model.onnx, genai_config.json (+ tokenizer ...)  ONNX, onnxruntime-genai layout
  fp16/      model.onnx (float16 KV cache and logits)         ONNX, optimum layout

Q and K weights are drawn directly in llama.cpp's row order (interleaved RoPE pairs), as a
Hugging Face -> GGUF conversion would store them; the genai graph un-permutes them.

Usage: models/python models/tiny/generate.py [OUT_DIR] [--check]
"""

import json
import os
import shutil
import sys

os.environ["RAYON_NUM_THREADS"] = "1"  # single-threaded BPE training: the same merges every run
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tools"))

SEED = 20261127
VOCAB = 384
HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 64, 2, 4, 2, 128
HEAD_DIM = HIDDEN // HEADS
CONTEXT = 512
ROPE_THETA = 10000.0
RMS_EPS = 1e-5
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = open(os.path.join(HERE, "..", "corpus", "genesis-kjv.txt"), encoding="utf-8").read()
    tk = Tokenizer(models.BPE(fuse_unk=False))
    # The same pre-tokenizer as llama.cpp's "smollm": single digits, then GPT-2's regex.
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tk.train_from_iterator(text.split("\n\n"), trainer=trainer)
    return tk


def tokenizer_tables(tk):
    j = json.loads(tk.to_str())
    vocab = j["model"]["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    merges = [m if isinstance(m, str) else " ".join(m) for m in j["model"]["merges"]]
    types = [3 if t in SPECIALS else 1 for t in tokens]
    return tokens, types, merges


def draw_weights():
    from llama_onnx import Weights

    rng = np.random.default_rng(SEED)

    def mat(out, inp, gain=1.0):
        return (rng.standard_normal((out, inp)) * gain / np.sqrt(inp)).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    embed = (rng.standard_normal((VOCAB, HIDDEN)) * 0.5).astype(np.float32)
    layers = []
    for _ in range(LAYERS):
        layers.append({
            "attn_norm": norm(HIDDEN),
            "wq": mat(HEADS * HEAD_DIM, HIDDEN, 2.0),
            "wk": mat(KV_HEADS * HEAD_DIM, HIDDEN, 2.0),
            "wv": mat(KV_HEADS * HEAD_DIM, HIDDEN),
            "wo": mat(HIDDEN, HEADS * HEAD_DIM),
            "ffn_norm": norm(HIDDEN),
            "w_gate": mat(FFN, HIDDEN),
            "w_up": mat(FFN, HIDDEN),
            "w_down": mat(HIDDEN, FFN),
        })
    # Logit spread ~2.5 nats: distributions neither flat nor one-hot.
    lm_head = mat(VOCAB, HIDDEN, 2.5)
    cfg = {"hidden": HIDDEN, "n_heads": HEADS, "n_kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "rope_theta": ROPE_THETA,
           "rms_eps": RMS_EPS, "vocab": VOCAB, "max_position": CONTEXT, "context": CONTEXT, "intermediate": FFN}
    return Weights(embed, layers, norm(HIDDEN), lm_head, cfg)


def write_gguf(path, w, tokens, types, merges, quant):
    import gguf
    from gguf.quants import quantize

    wr = gguf.GGUFWriter(path, "llama")
    wr.add_name("logitprobe-tiny")
    wr.add_context_length(CONTEXT)
    wr.add_embedding_length(HIDDEN)
    wr.add_block_count(LAYERS)
    wr.add_feed_forward_length(FFN)
    wr.add_head_count(HEADS)
    wr.add_head_count_kv(KV_HEADS)
    wr.add_rope_freq_base(ROPE_THETA)
    wr.add_layer_norm_rms_eps(RMS_EPS)
    wr.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quant else gguf.LlamaFileType.ALL_F32)
    wr.add_vocab_size(VOCAB)
    wr.add_rope_dimension_count(HEAD_DIM)
    wr.add_tokenizer_model("gpt2")
    wr.add_tokenizer_pre("smollm")
    wr.add_token_list(tokens)
    wr.add_token_types(types)
    wr.add_token_merges(merges)
    wr.add_bos_token_id(SPECIALS.index("<|im_start|>"))
    wr.add_eos_token_id(SPECIALS.index("<|im_end|>"))
    wr.add_pad_token_id(SPECIALS.index("<|endoftext|>"))
    wr.add_add_bos_token(False)
    wr.add_chat_template(CHAT_TEMPLATE)

    def add(name, a):
        if quant and a.ndim == 2:
            q = quantize(a, gguf.GGMLQuantizationType.Q8_0)
            wr.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            wr.add_tensor(name, a)

    add("token_embd.weight", w.embed)
    for i, L in enumerate(w.layers):
        p = f"blk.{i}."
        for key, name in [("attn_norm", "attn_norm"), ("wq", "attn_q"), ("wk", "attn_k"), ("wv", "attn_v"),
                          ("wo", "attn_output"), ("ffn_norm", "ffn_norm"), ("w_gate", "ffn_gate"), ("w_up", "ffn_up"),
                          ("w_down", "ffn_down")]:
            add(p + name + ".weight", L[key])
    add("output_norm.weight", w.norm)
    add("output.weight", w.lm_head)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()


def write_folder(out, model, tk, layout):
    import onnx

    os.makedirs(out, exist_ok=True)
    onnx.save(model, os.path.join(out, "model.onnx"))
    tk.save(os.path.join(out, "tokenizer.json"))
    bos, eos = SPECIALS.index("<|im_start|>"), SPECIALS.index("<|im_end|>")
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"add_bos_token": False, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                   "pad_token": "<|endoftext|>", "model_max_length": CONTEXT, "chat_template": CHAT_TEMPLATE,
                   "tokenizer_class": "PreTrainedTokenizerFast"}, f, indent=2)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
                   "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
                   "intermediate_size": FFN, "rms_norm_eps": RMS_EPS, "rope_theta": ROPE_THETA,
                   "max_position_embeddings": CONTEXT, "vocab_size": VOCAB, "bos_token_id": bos,
                   "eos_token_id": eos, "tie_word_embeddings": False}, f, indent=2)
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": bos, "eos_token_id": [eos, 0]}, f, indent=2)
    if layout == "genai":
        with open(os.path.join(out, "genai_config.json"), "w") as f:
            json.dump({"model": {"type": "llama", "context_length": CONTEXT, "vocab_size": VOCAB, "bos_token_id": bos,
                                 "eos_token_id": [eos, 0], "pad_token_id": 0,
                                 "decoder": {"filename": "model.onnx", "num_hidden_layers": LAYERS,
                                             "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
                                             "head_size": HEAD_DIM, "hidden_size": HIDDEN}},
                       "search": {"past_present_share_buffer": True, "max_length": CONTEXT}}, f, indent=2)
        with open(os.path.join(out, "chat_template.jinja"), "w") as f:
            f.write(CHAT_TEMPLATE)


def check(out, tk):
    """Loads each ONNX in onnxruntime: finite, non-degenerate distributions, layouts agree."""
    import onnxruntime as ort

    prompts = ["In the beginning God created the heaven and the earth.", "And Noah was 500 years old",
               "<|im_start|>user\nWho made the light?<|im_end|>\n<|im_start|>assistant\n"]
    results = {}
    for name in ("optimum", "genai", "fp16"):
        s = ort.InferenceSession(os.path.join(out, name, "model.onnx"), providers=["CPUExecutionProvider"])
        kv_type = np.float16 if name == "fp16" else np.float32
        rows = []
        for p in prompts:
            ids = tk.encode(p, add_special_tokens=False).ids
            feed = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
            if name != "genai":
                feed["position_ids"] = np.arange(len(ids), dtype=np.int64)[None]
            for i in range(LAYERS):
                for kv in ("key", "value"):
                    feed[f"past_key_values.{i}.{kv}"] = np.zeros((1, KV_HEADS, 0, HEAD_DIM), kv_type)
            logits = s.run(["logits"], feed)[0][0].astype(np.float64)
            assert np.isfinite(logits).all(), f"{name}: non-finite logits"
            rows.append(logits)
        results[name] = rows
    lo, hi = 0.5, np.log(VOCAB) - 0.5
    ents = []
    for rows in results["optimum"]:
        lp = rows - rows.max(-1, keepdims=True)
        lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
        ents.extend((-(np.exp(lp) * lp).sum(-1)).tolist())
    inside = np.mean([(lo <= e <= hi) for e in ents])
    assert inside >= 0.8, f"only {inside:.0%} of positions have entropy in [{lo:.2f}, {hi:.2f}]"

    def logprobs(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    for other, tol in (("genai", 1e-4), ("fp16", 1e-2)):
        d = max(np.abs(logprobs(a) - logprobs(b)).max() for a, b in zip(results["optimum"], results[other]))
        assert d <= tol, f"optimum vs {other}: max |dlogprob| {d}"
        print(f"optimum vs {other}: max |dlogprob| = {d:.2e}")
    print(f"entropy: {inside:.0%} of {len(ents)} positions in [{lo:.2f}, {hi:.2f}] nats, mean {np.mean(ents):.2f}")


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    out = args[0] if args else HERE
    from llama_onnx import build

    tk = train_tokenizer()
    assert tk.get_vocab_size() == VOCAB, tk.get_vocab_size()
    tokens, types, merges = tokenizer_tables(tk)
    w = draw_weights()
    os.makedirs(out, exist_ok=True)
    write_gguf(os.path.join(out, "tiny-f32.gguf"), w, tokens, types, merges, quant=False)
    write_gguf(os.path.join(out, "tiny-q8_0.gguf"), w, tokens, types, merges, quant=True)
    write_folder(os.path.join(out, "optimum"), build(w, "optimum"), tk, "optimum")
    write_folder(os.path.join(out, "genai"), build(w, "genai"), tk, "genai")
    write_folder(os.path.join(out, "fp16"), build(w, "optimum", fp16=True), tk, "optimum")
    if "--check" in sys.argv:
        check(out, tk)
    print(out)


if __name__ == "__main__":
    main()
