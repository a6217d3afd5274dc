"""Writes an F16 GGUF (architecture `llama`) with the shape of a real model and random weights.

Benchmarking `logitprobe compare` at 1B and 8B sizes needs models of those sizes, but no
download is possible here (no Hugging Face Hub; the only real models come from PyPI wheels and
are ~100-250 MB). What a model costs per token depends on its shape, not on its weights: the
layer count, the matrix sizes, the KV heads and the vocabulary width (a 128,256-wide logit row
is what `compare` reads, sorts and diffs per position). So this writes the real shapes of
Llama-3.2-1B and Llama-3.1-8B with seeded random weights; llama-quantize then makes the
quantized ladder from the F16 file like it would from a real one (scripts/atlas-models).

The tokenizer is copied from another GGUF (SmolLM2's, the model we have) and padded up to the
shape's vocabulary with control tokens `<|reserved_special_token_N|>`, as Llama 3 pads its own:
text tokenizes like SmolLM2 and every logit row is as wide as Llama 3's. The padding tokens are
never produced from plain text, so they only make the rows wider.

Weights are N(0, std) (default 0.02) with all-ones norms: small enough that the residual stream
stays finite in F16, large enough that the logits are not flat (their spread is about
std * sqrt(hidden)). Such a model predicts nothing: its perplexity is about
vocab * exp(spread^2 / 2), e.g. ~200,000 for the 1B shape; what to check is that it is finite. The
Llama 3.1 RoPE scaling factors (`rope_freqs.weight`, optional in llama.cpp) are left out: they
do not change the cost and random weights have no long context to protect.

Tensors are generated and written one block of rows at a time, so memory stays at a few hundred
MB whatever the file size (the 8B file is ~16 GB). The file is written under OUT.part and
renamed at the end, so an interrupted run never leaves a file that looks finished.

Usage:
  models/python models/tools/shape_gguf.py --preset llama-3.2-1b \\
      --tokenizer-from ~/.cache/logitprobe/SmolLM2-135M-Instruct.Q4_1.gguf OUT.gguf
  presets: llama-3.2-1b, llama-3.1-8b, tiny (2 layers, hidden 64, vocab = the tokenizer's)
  overrides: --layers --hidden --ffn --heads --kv-heads --head-dim --vocab --context
             --tied/--untied --seed (default 0) --std (default 0.02)
"""

import argparse
import os
import sys
import time

import numpy as np

PRESETS = {
    # Llama-3.2-1B's config.json: tied embeddings, head dim 64.
    "llama-3.2-1b": dict(layers=16, hidden=2048, ffn=8192, heads=32, kv_heads=8, vocab=128256,
                         tied=True, rope_theta=500000.0, context=131072, rms_eps=1e-5),
    # Llama-3.1-8B's config.json: untied output, head dim 128.
    "llama-3.1-8b": dict(layers=32, hidden=4096, ffn=14336, heads=32, kv_heads=8, vocab=128256,
                         tied=False, rope_theta=500000.0, context=131072, rms_eps=1e-5),
    # For tests: loads in milliseconds; vocab None means the tokenizer's own size.
    "tiny": dict(layers=2, hidden=64, ffn=128, heads=4, kv_heads=2, vocab=None,
                 tied=True, rope_theta=500000.0, context=2048, rms_eps=1e-5),
}

# Elements generated at once: bounds the resident memory (float32 + float16 buffers, ~100 MB)
# independently of the largest tensor (the 8B's 128256 x 4096 embedding is 525M elements).
BLOCK = 1 << 24


class RandomTensor:
    """Stands in for a numpy array in GGUFWriter.write_tensor_data, which only reads `nbytes`
    and calls `tofile`: the tensor is produced block by block straight into the file, never
    whole in memory. (gguf is pinned in models/requirements.txt, so this duck typing is stable.)
    """

    def __init__(self, shape, std, rng):
        self.shape = shape
        self.size = int(np.prod(shape))
        self.nbytes = self.size * 2  # float16
        self.std = std
        self.rng = rng

    def tofile(self, f):
        buf32 = np.empty(min(self.size, BLOCK), dtype=np.float32)
        buf16 = np.empty(min(self.size, BLOCK), dtype=np.float16)
        done = 0
        while done < self.size:
            n = min(BLOCK, self.size - done)
            a, b = buf32[:n], buf16[:n]
            self.rng.standard_normal(dtype=np.float32, out=a)
            a *= self.std
            np.copyto(b, a, casting="same_kind")
            b.tofile(f)
            done += n


def read_tokenizer(path):
    """Every `tokenizer.*` key of a GGUF as (key, value, type, sub_type), strings as raw bytes so
    that nothing is re-encoded on the way through."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(path)
    out = []
    for name, f in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        vtype = f.types[0]
        if vtype == GGUFValueType.ARRAY:
            sub = f.types[-1]
            if sub == GGUFValueType.STRING:
                value = [bytes(f.parts[i]) for i in f.data]
            else:
                value = [f.parts[i].tolist()[0] for i in f.data]
            out.append((name, value, vtype, sub))
        elif vtype == GGUFValueType.STRING:
            out.append((name, bytes(f.parts[-1]), vtype, None))
        else:
            out.append((name, f.parts[-1].tolist()[0], vtype, None))
    return out


def pad_tokenizer(fields, vocab):
    """Pads tokens and token types to `vocab` entries with control tokens; returns the fields and
    the tokenizer's own size."""
    from gguf import TokenType

    fields = {key: [value, vtype, sub] for key, value, vtype, sub in fields}
    tokens = fields["tokenizer.ggml.tokens"][0]
    n = len(tokens)
    if vocab < n:
        sys.exit(f"shape_gguf: vocab {vocab} is smaller than the tokenizer's {n} tokens")
    extra = [f"<|reserved_special_token_{i}|>".encode() for i in range(vocab - n)]
    # llama.cpp aborts on duplicate token texts; a tokenizer that already has these names
    # (a Llama 3 one) would need another naming scheme.
    if not set(tokens).isdisjoint(extra):
        sys.exit("shape_gguf: the tokenizer already has <|reserved_special_token_N|> tokens")
    fields["tokenizer.ggml.tokens"][0] = tokens + extra
    fields["tokenizer.ggml.token_type"][0] += [int(TokenType.CONTROL)] * len(extra)
    return [(key, *rest) for key, rest in fields.items()], n


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--tokenizer-from", required=True, metavar="GGUF")
    for flag in ("layers", "hidden", "ffn", "heads", "kv-heads", "head-dim", "vocab", "context"):
        p.add_argument(f"--{flag}", type=int)
    tie = p.add_mutually_exclusive_group()
    tie.add_argument("--tied", dest="tied", action="store_true", default=None)
    tie.add_argument("--untied", dest="tied", action="store_false")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--std", type=float, default=0.02)
    p.add_argument("--name", help="general.name (default: '<preset>-shape (random weights)')")
    args = p.parse_args()

    from gguf import GGUFWriter, LlamaFileType

    cfg = dict(PRESETS[args.preset])
    for key in ("layers", "hidden", "ffn", "heads", "kv_heads", "vocab", "context", "tied"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    # The real models' head dim is hidden / heads; a test may decouple them.
    head_dim = args.head_dim or cfg["hidden"] // cfg["heads"]
    if cfg["heads"] % cfg["kv_heads"] or head_dim % 2 or min(cfg["layers"], head_dim) <= 0:
        sys.exit("shape_gguf: heads must be a multiple of kv-heads, head dim even and positive")

    tok_fields = read_tokenizer(args.tokenizer_from)
    n_tok = len(next(v for k, v, *_ in tok_fields if k == "tokenizer.ggml.tokens"))
    if cfg["vocab"] is None:
        cfg["vocab"] = n_tok
    tok_fields, n_tok = pad_tokenizer(tok_fields, cfg["vocab"])

    L, H, F, V = cfg["layers"], cfg["hidden"], cfg["ffn"], cfg["vocab"]
    q_dim, kv_dim = cfg["heads"] * head_dim, cfg["kv_heads"] * head_dim
    # numpy shapes (rows, cols); GGUF stores them reversed (ne0 = cols), which is how
    # llama.cpp's llama architecture expects them (e.g. token_embd is {hidden, vocab}).
    shapes = [("token_embd.weight", (V, H))]
    for i in range(L):
        b = f"blk.{i}."
        shapes += [
            (b + "attn_norm.weight", (H,)),
            (b + "attn_q.weight", (q_dim, H)),
            (b + "attn_k.weight", (kv_dim, H)),
            (b + "attn_v.weight", (kv_dim, H)),
            (b + "attn_output.weight", (H, q_dim)),
            (b + "ffn_norm.weight", (H,)),
            (b + "ffn_gate.weight", (F, H)),
            (b + "ffn_up.weight", (F, H)),
            (b + "ffn_down.weight", (H, F)),
        ]
    shapes.append(("output_norm.weight", (H,)))
    if not cfg["tied"]:
        shapes.append(("output.weight", (V, H)))

    tmp = args.out + ".part"
    w = GGUFWriter(tmp, "llama")
    w.add_name(args.name or f"{args.preset}-shape (random weights)")
    w.add_file_type(LlamaFileType.MOSTLY_F16)
    w.add_quantization_version(2)
    w.add_vocab_size(V)
    w.add_context_length(cfg["context"])
    w.add_embedding_length(H)
    w.add_block_count(L)
    w.add_feed_forward_length(F)
    w.add_head_count(cfg["heads"])
    w.add_head_count_kv(cfg["kv_heads"])
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_eps"])
    for key, value, vtype, sub in tok_fields:
        w.add_key_value(key, value, vtype, sub_type=sub)

    for name, shape in shapes:
        # Norms stay F32, as llama.cpp's converter keeps 1-D tensors.
        if len(shape) == 1:
            w.add_tensor_info(name, shape, np.dtype(np.float32), shape[0] * 4)
        else:
            w.add_tensor_info(name, shape, np.dtype(np.float16), int(np.prod(shape)) * 2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()

    t0 = time.time()
    n_params = 0
    for index, (name, shape) in enumerate(shapes):
        n_params += int(np.prod(shape))
        if len(shape) == 1:
            w.write_tensor_data(np.ones(shape, dtype=np.float32))
        else:
            # One stream per tensor: a tensor's values do not depend on the shapes before it.
            w.write_tensor_data(RandomTensor(shape, args.std, np.random.default_rng([args.seed, index])))
    w.close()
    os.replace(tmp, args.out)
    print(f"shape_gguf: {args.out}: {args.preset} {L} layers, hidden {H}, ffn {F}, heads "
          f"{cfg['heads']}/{cfg['kv_heads']} x {head_dim}, vocab {V} ({n_tok} from the tokenizer), "
          f"{'tied' if cfg['tied'] else 'untied'}, {n_params / 1e6:.1f} M params, "
          f"{os.path.getsize(args.out) / 1e9:.2f} GB in {time.time() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
